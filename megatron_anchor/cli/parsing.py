"""Argument parsing for the tools: a bad flag is one line and exit status 2, not usage + error.

argparse's own `error()` prints the whole usage block and raises `SystemExit(2)`. A tool built
on `ToolParser` raises `UsageError` instead, and `run_tool(prog, body, argv)` prints it as the one line ``prog: error: <what to change> (see
--help)`` with status 2 (rank 0 only under torchrun). `--help` still prints and returns 0.
"""

from __future__ import annotations

import argparse
import textwrap
from typing import List

from megatron_anchor.cli.common import UsageError


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
    """An `ArgumentParser` whose errors are `UsageError`s (one line, no usage block)."""

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
