"""What every command-line entry point shares: its parser class, one-line errors, exit status.

A tool's `main(argv)` parses its flags, calls typed library functions, prints or plots, and
returns an exit status. `run_tool` turns a `UserError` (bad flags, bad data, bad
checkpoints, impossible layouts) into one line on stderr and status 2. Under torchrun only
rank 0 prints it; every rank exits 2. Any other exception is a bug and keeps its traceback.

It sits below both the library and `megatron_anchor.cli`: the trainer's own flag layer
(`training/arguments.py`, like Megatron-LM's `megatron/training/arguments.py`) and every
tool in `cli/` use it, and nothing here imports either of them.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
from typing import Callable, List, Optional

from megatron_anchor import runtime
from megatron_anchor.errors import UsageError, UserError

_OTHER_RANKS_WAIT_S = 5.0


# ----------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the option help (where there is one to tell); descriptions and epilogs
    wrapped line by line, so their own line breaks stay."""

    def _get_help_string(self, action: argparse.Action) -> str:
        # No "(default: None)" / "(default: False)", nor a second default where the help
        # already names one.
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n".join(textwrap.fill(line, width, initial_indent=indent,
                                        subsequent_indent=indent) if line.strip() else ""
                         for line in text.splitlines())


class ToolParser(argparse.ArgumentParser):
    """An `ArgumentParser` whose errors are `UsageError`s (one line, no usage block).

    argparse's own `error()` prints the whole usage block and raises `SystemExit(2)`;
    `run_tool` prints a `UsageError` as ``prog: error: <what to change> (see --help)``.
    `--help` still prints and returns 0.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UsageError(f"{message} (see --help)")


def int_list(text: str) -> List[int]:
    """`type=` for comma-separated integers ("0,100,500")."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of "
                                         "integers") from None


def names(text: str) -> List[str]:
    """A comma-separated list of names ("anchor,full"), blanks dropped."""
    return [s.strip() for s in str(text).split(",") if s.strip()]


def flag_given(argv: List[str], flag: str) -> bool:
    """Whether `flag` is on the command line (as `--flag value` or `--flag=value`)."""
    return any(a == flag or a.startswith(flag + "=") for a in argv)


# ----------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------

def fail(prog: str, message: str) -> int:
    """One line on stderr, status 2; under torchrun, one line for the whole job.

    Every rank usually meets the same bad argument. Rank 0 says it and exits at once, and
    torchrun then stops the other ranks, which wait a moment before speaking: they are
    heard only when the error is theirs alone.
    """
    rank = runtime.rank()
    if rank == 0:
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    else:
        time.sleep(_OTHER_RANKS_WAIT_S)
        print(f"{prog}: error (rank {rank}): {message}", file=sys.stderr, flush=True)
    return 2


def run_tool(prog: str, body: Callable[[Optional[List[str]]], int],
             argv: Optional[List[str]] = None) -> int:
    """Run a tool's body: a `UserError` becomes one line and exit status 2; `--help` is
    status 0. Any other exception is a bug and keeps its traceback."""
    try:
        return int(body(argv) or 0)
    except UserError as err:
        return fail(prog, " ".join(str(err).split("\n")) or type(err).__name__)
    except SystemExit as done:  # argparse's --help
        if done.code in (0, None):
            return 0
        raise
    except KeyboardInterrupt:
        return fail(prog, "interrupted")


# ----------------------------------------------------------------------------------------
# Architecture flags (the trainer and the parity tool)
# ----------------------------------------------------------------------------------------

# Megatron-LM's names for the ModelConfig fields a tool can set: flag -> (type, help). With a
# checkpoint the architecture is the checkpoint's (`Checkpoint.architecture`), so a tool
# parses these with default None, to tell a flag the user gave from one left out, and fills
# in its own defaults only when it builds a model from nothing.
ARCHITECTURE_FLAGS = {
    "--num-layers": (int, "transformer layers"),
    "--hidden-size": (int, "model width"),
    "--ffn-hidden-size": (int, "SwiGLU inner width (None: 8/3 x hidden, rounded up to 64)"),
    "--num-attention-heads": (int, "query heads"),
    "--num-query-groups": (int, "key/value heads for grouped-query attention (None: = heads)"),
    "--rotary-base": (float, "RoPE base (paper: 1e6 at 16K, 5e6 at 64K, 1e7 at 128K)"),
    "--norm-epsilon": (float, "RMSNorm epsilon"),
    "--init-method-std": (float, "weight init std"),
    "--make-vocab-size-divisible-by": (int, "pad the vocabulary to a multiple of this "
                                            "(independent of TP)"),
    "--vocab-size": (int, "vocabulary size (None: the tokenizer's, where there is one; "
                          "NullTokenizer: its ids)"),
}


def _field(flag: str) -> str:
    return flag[2:].replace("-", "_")


def add_architecture_flags(group, defaults: dict) -> None:
    """The architecture flags named in `defaults` (flag -> default without a checkpoint)."""
    for flag, default in defaults.items():
        kind, text = ARCHITECTURE_FLAGS[flag]
        group.add_argument(flag, type=kind, default=None, help=f"{text} (default: {default})")


def architecture_flags_given(args: argparse.Namespace, defaults: dict) -> dict:
    """ModelConfig field -> value for the architecture flags given on the command line."""
    return {_field(flag): getattr(args, _field(flag)) for flag in defaults
            if getattr(args, _field(flag)) is not None}


def architecture_from_flags(args: argparse.Namespace, defaults: dict) -> dict:
    """ModelConfig field -> value: the flag where given, else the tool's default."""
    return {_field(flag): (getattr(args, _field(flag)) if getattr(args, _field(flag))
                           is not None else default) for flag, default in defaults.items()}
