"""The one base class of every error that is the user's to fix.

A `UserError` means "what was asked for cannot be done as asked": a bad flag, a bad file,
a damaged checkpoint, an impossible parallel layout. Its message is one line that names
what and where. Command-line tools print it as ``prog: error: <message>`` with exit status
2 (`megatron_anchor.tooling.run_tool`); any other exception is a bug and keeps its
traceback. Each module defines its own subclass (`LayoutError`, `CheckpointError`, ...), so
library callers can catch precisely while the tools catch one type.

This module imports nothing, so every layer of the package can use it.
"""


class UserError(ValueError):
    """Something the user asked for that cannot be done; the message says what to change."""


class UsageError(UserError):
    """A flag that argparse cannot accept (unknown, missing, wrong type, out of choices)."""
