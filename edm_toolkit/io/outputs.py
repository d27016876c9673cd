"""Output files: one writer for everything the toolkit writes into a user's directory.

A file is written to a hidden temporary file next to it, then renamed over its name, so a reader or an
interrupted run never sees a half-written file. The temporary file is created with mode 0666 and the process
umask applies, exactly as for a file opened with ``open(path, "wb")`` (the usual umask 022 gives 0644, EDM's
mode); ``tempfile.mkstemp`` would give 0600. Temporary names record this host and process,
``.NAME.HOST.PID.RANDOM.tmp``, so that the next run into a directory can remove what a killed run left there
(:func:`remove_stale_temp_files`) without touching the files a live run on the same host is writing.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import socket
import stat
from pathlib import Path
from typing import BinaryIO, Callable

import psutil

from ..errors import EDMToolkitError

_HOST = hashlib.sha1(socket.gethostname().encode("utf-8", "surrogateescape")).hexdigest()[:8]
_TEMP = re.compile(r"\.(?P<name>.+)\.(?P<host>[0-9a-f]{8})\.(?P<pid>[0-9]{1,10})\.[0-9a-f]{8}\.tmp")


def temp_name(path: Path) -> Path:
    """The hidden temporary file ``path`` is written to before it is renamed into place."""
    return path.with_name(f".{path.name}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def check_output_path(path: str | Path) -> None:
    """Refuses to replace something that is not a regular file (a directory, a FIFO, a device node, ...)."""
    if os.path.lexists(path) and not Path(path).is_file():
        kind = "a directory" if Path(path).is_dir() else "not a regular file"
        raise EDMToolkitError(f"{path} exists and is {kind}; refusing to replace it: give the path of a new or "
                              "regular file")


def write_atomically(path: str | Path, write: Callable[[BinaryIO], None], *, sync: bool = False) -> Path:
    """Calls ``write(file)`` on a temporary file next to ``path`` and renames it to ``path`` (replacing a file of
    that name); on any failure or interrupt the temporary file is removed and ``path`` is untouched. With
    ``sync`` the data reach the disk before the rename (a training state must survive a power loss too)."""
    path = Path(path)
    check_output_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def remove_stale_temp_files(directory: str | Path) -> list[Path]:
    """Removes the temporary files that dead processes of this host left in ``directory``; returns them.

    A temporary file of a live process is kept (another rank of a torchrun job, another run into the same
    directory); so is one of another host (its processes cannot be checked from here). Call it before this
    process writes into ``directory``: its own process id counts as dead (in a container every run may have it).
    """
    removed = []
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        match = _TEMP.fullmatch(entry.name)
        if match is None or match["host"] != _HOST:
            continue
        pid = int(match["pid"])
        if pid != os.getpid() and psutil.pid_exists(pid):
            continue
        try:
            if stat.S_ISREG(entry.stat(follow_symlinks=False).st_mode):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except FileNotFoundError:  # removed meanwhile by another run
            pass
    return removed
