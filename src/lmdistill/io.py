"""Durable output: atomic writes of a file or a whole directory, directory fsync, and a one-writer file lock.

An atomic write fills a temporary sibling (`.NAME.tmp` for a file, `.tmp-NAME/` for a directory), fsyncs it, renames it
over the target and fsyncs the parent directory, so a reader or a resumed run sees the old target or the complete new
one, never a partial write. A write that fails removes its temporary and raises one `OutputWriteError` naming what was
being written (`lmdistill.errors.write_failure`).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from lmdistill.errors import ConfigError, write_failure


def fsync_dir(path: str | Path) -> None:
    """Make a rename or a new entry in directory `path` durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: str | Path, data: bytes, what: str) -> None:
    """Write `data` to `path` all-or-nothing; `what` names the file in the error of a failed write."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_failure(what, path, e) from None


def write_text(path: str | Path, text: str, what: str) -> None:
    """`text` as UTF-8 to `path`, all-or-nothing."""
    write_bytes(path, text.encode("utf-8"), what)


def write_json(path: str | Path, obj: Any, what: str, *, indent: int = 2, sort_keys: bool = False) -> None:
    """`obj` as JSON with a trailing newline to `path`, all-or-nothing."""
    write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n", what)


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(path)


@contextmanager
def atomic_dir(final: Path, what: str) -> Iterator[Path]:
    """Write a directory all-or-nothing: yields an empty temporary sibling of `final` to fill; when the block ends it
    is fsynced and renamed over `final` (replacing an older one). On any error it is removed and the error becomes one
    `write_failure` naming `what`, so a kill or a full disk never leaves a half-written `final` that looks finished.
    """
    tmp = final.with_name(f".tmp-{final.name}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        yield tmp
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(final.parent)
    except Exception as e:  # noqa: BLE001  (a full disk surfaces as OSError, SafetensorError or RuntimeError)
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_failure(what, final, e) from None


def open_locked(path: str | Path, writer: str) -> IO[bytes]:
    """Open `path` for appending and reading (created if absent) under an exclusive lock, held until it is closed.

    Raises:
        ConfigError: another process holds the lock; `writer` names the likely one in the message.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "ab+")  # noqa: SIM115  (the caller keeps it open for as long as it writes)
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise ConfigError(
            f"`{path}` is being written by another process ({writer}?); wait for it, or choose another output"
        ) from None
    return fh
