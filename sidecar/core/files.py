"""Reading small files that someone else may have replaced with something hostile.

A key or verdict path can be a FIFO (open blocks until a writer comes), a device or a symlink
to /dev/zero (read never ends), a directory, or a huge file. Each is refused with a sentence,
never by hanging or by exhausting memory. The type is checked before opening (so a device is
never opened) and again on the opened descriptor (so a swap in between is caught); the open
never blocks (O_NONBLOCK), and the read stops one byte past the limit.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

_TYPES = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISLNK, "a symbolic link"),
)


class UnsafeFileError(Exception):
    """The path exists but is not a small regular file; the message says what it is instead."""


def _describe(mode: int) -> str:
    for test, name in _TYPES:
        if test(mode):
            return name
    return "not a regular file"


def _check(st: os.stat_result, limit: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeFileError(f"is {_describe(st.st_mode)}, not a regular file")
    if st.st_size > limit:
        raise UnsafeFileError(f"is {st.st_size} bytes; at most {limit} are allowed")


def read_small_file(path: Path | str, limit: int, *, follow_symlinks: bool = True) -> bytes:
    """Return the bytes of a regular file of at most `limit` bytes.

    Raises `UnsafeFileError` for anything else, and `OSError` (e.g. FileNotFoundError) when the
    path cannot be opened. With `follow_symlinks=False` a symlink is refused (O_NOFOLLOW):
    use that for files the sidecar writes itself; keys mounted from a Kubernetes Secret or
    ConfigMap are symlinks by design, so they are followed and the target is checked.
    """
    before = os.stat(path, follow_symlinks=follow_symlinks)
    _check(before, limit)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        _check(st, limit)  # the file opened may not be the one checked above
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise UnsafeFileError(f"grew past {limit} bytes while being read")
        return b"".join(chunks)
    finally:
        os.close(fd)
