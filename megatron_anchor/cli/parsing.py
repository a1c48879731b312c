"""Argument parsing for the tools: a bad flag is one line and exit status 2, not usage + error.

argparse's own `error()` prints the whole usage block and raises `SystemExit(2)`. A tool built
on `ToolParser` raises `UsageError` instead, and `run(prog, body, argv)` (a `run_tool` that
also knows `UsageError`) prints it as the one line ``prog: error: <what to change> (see
--help)`` with status 2 (rank 0 only under torchrun). `--help` still prints and returns 0.
"""

from __future__ import annotations

import argparse
import textwrap
from typing import Callable, List, Optional

from megatron_anchor.cli.common import fail, run_tool


class UsageError(ValueError):
    """A flag that argparse cannot accept (unknown, missing, wrong type, out of choices)."""


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


def run(prog: str, body: Callable[[Optional[List[str]]], int],
        argv: Optional[List[str]] = None, errors: tuple = ()) -> int:
    """`cli.common.run_tool`, plus: a `UsageError` (or one of the tool's own `errors` types)
    is one line and status 2; `--help` is status 0."""

    def guarded(args: Optional[List[str]]) -> int:
        try:
            return body(args)
        except (UsageError,) + tuple(errors) as err:
            return fail(prog, " ".join(str(err).split("\n")) or type(err).__name__)
        except SystemExit as done:  # argparse's --help / --version
            if done.code in (0, None):
                return 0
            raise

    return run_tool(prog, guarded, argv)
