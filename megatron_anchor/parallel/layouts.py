"""Parallel layouts (``tp2cp2``) and switching Megatron-Core's process groups between them.

One world of N ranks runs every layout in turn: Megatron's model-parallel groups are
destroyed and re-created with TP×CP ranks per model replica and DP = N/(TP·CP) replicas.
Nothing about the world (torch.distributed, the launcher) changes between layouts.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from megatron.core import parallel_state

from megatron_anchor import runtime

_LAYOUT_RE = re.compile(r"^tp(\d+)cp(\d+)$")


@dataclass(frozen=True)
class Layout:
    tp: int
    cp: int

    @property
    def name(self) -> str:
        return f"tp{self.tp}cp{self.cp}"


def parse_layouts(text: str) -> list[Layout]:
    """``"tp1cp1,tp2cp1"`` -> [Layout(1, 1), Layout(2, 1)]; order kept (the first is the reference)."""
    layouts = []
    for item in (s.strip() for s in text.split(",")):
        match = _LAYOUT_RE.match(item)
        if not match:
            raise ValueError(f"bad layout {item!r}: write tp<N>cp<M>, e.g. tp2cp1")
        layout = Layout(int(match.group(1)), int(match.group(2)))
        if layout.tp < 1 or layout.cp < 1:
            raise ValueError(f"bad layout {item!r}: sizes must be >= 1")
        if layout in layouts:
            raise ValueError(f"layout {item} is listed twice")
        layouts.append(layout)
    if len(layouts) < 2:
        raise ValueError("give at least two layouts to compare, e.g. --layouts tp1cp1,tp2cp1")
    return layouts


def common_cp_multiple(layouts) -> int:
    """The CP size to pack for: every layout's 2·CP divides 2·lcm, so one batch fits all."""
    return math.lcm(*(layout.cp for layout in layouts))


def check_world_size(layouts, world_size: int) -> None:
    runtime.check_world_size(world_size, *((layout.tp, layout.cp) for layout in layouts))


def use_layout(layout: Layout, cpu, seed: int) -> None:
    """Make `layout` Megatron's current parallel state (world already initialised or not)."""
    runtime.initialize(layout.tp, layout.cp, cpu=cpu, seed=seed)


def is_first_replica() -> bool:
    """Data-parallel replicas compute the same numbers; only replica 0 runs the check."""
    return parallel_state.get_data_parallel_rank() == 0
