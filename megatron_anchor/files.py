"""Writing files so that a reader never sees half of one: a temporary file, then a rename.

Every file the project writes for someone else to read (datasets, index caches, checkpoint
JSON and markers, tokenizers, reports, figures) goes through `atomic_path`: the data is
written to a temporary file in the same directory (so the rename is atomic on POSIX), synced
to disk, and renamed over the target only when the write succeeded. A failed write (an
exception, a full disk, a signal) removes the temporary file and leaves the old target, if
any, untouched. The temporary name carries the process id, so ranks writing the same file
do not collide.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Iterator


def fsync_directory(directory: str) -> None:
    """Make a rename inside `directory` durable (a node that dies right after keeps it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot sync a directory; the rename still happened
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "") -> Iterator[str]:
    """Yield a temporary path beside `path`; on success it replaces `path`.

    `suffix` ends the temporary name, for writers that pick the format from the extension
    (matplotlib: ".png", numpy: ".npz").
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}{suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fsync_directory(directory)


def write_text(path: str, text: str) -> str:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return path


def write_json(path: str, value, indent: int = 2) -> str:
    return write_text(path, json.dumps(value, indent=indent) + "\n")


def copy_file(source: str, path: str) -> str:
    with atomic_path(path) as tmp:
        shutil.copyfile(source, tmp)
    return path
