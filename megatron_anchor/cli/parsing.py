"""Argument parsing for the tools: a bad flag is one line and exit status 2, not usage + error.

argparse's own `error()` prints the whole usage block and raises `SystemExit(2)`. A tool built
on `ToolParser` raises `UsageError` instead, and `run(prog, body, argv)` (a `run_tool` that
also knows `UsageError`) prints it as the one line ``prog: error: <what to change> (see
--help)`` with status 2 (rank 0 only under torchrun). `--help` still prints and returns 0.
"""

from __future__ import annotations

import argparse
from typing import Callable, List, Optional

from megatron_anchor.cli.common import fail, run_tool


class UsageError(ValueError):
    """A flag that argparse cannot accept (unknown, missing, wrong type, out of choices)."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the option help; descriptions and epilogs kept as written."""


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
