"""Durable output: atomic writes of a file or a whole directory, directory fsync, one-writer locks, and stopping on
purpose (SIGTERM/SIGINT) only between units of work.

An atomic write fills a temporary sibling (`.NAME.tmp` for a file, `.tmp-NAME/` for a directory), fsyncs it, renames it
over the target and fsyncs the parent directory, so a reader or a resumed run sees the old target or the complete new
one, never a partial write. A write that fails removes its temporary and raises one `OutputWriteError` naming what was
being written (`lmdistill.errors.write_failure`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
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
        with contextlib.suppress(OSError):  # the temporary may not exist, or its parent may not be a directory
            tmp.unlink(missing_ok=True)
        raise write_failure(what, path, e) from None


def write_text(path: str | Path, text: str, what: str) -> None:
    """`text` as UTF-8 to `path`, all-or-nothing."""
    write_bytes(path, text.encode("utf-8"), what)


def write_json(path: str | Path, obj: Any, what: str, *, indent: int = 2, sort_keys: bool = False) -> None:
    """`obj` as JSON with a trailing newline to `path`, all-or-nothing."""
    write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n", what)


def append_durably(fd: int, data: bytes, what: str, path: str | Path) -> None:
    """Append `data` to the file open at `fd` (unbuffered, so nothing is left to flush later), then fsync. A write
    that fails part-way (a full disk) is cut back to the old end, so the file never ends in a half-written record,
    and raised as one `write_failure` naming `what`."""
    start = os.lseek(fd, 0, os.SEEK_END)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, start)
            os.fsync(fd)
        raise write_failure(what, path, e) from None


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


class DirLock:
    """A held directory lock; `close()` empties the pid from `.lock` (the file stays: removing it would let two
    processes lock two different files of one name) and releases it."""

    def __init__(self, fh: IO[bytes]) -> None:
        self._fh: IO[bytes] | None = fh

    def close(self) -> None:
        if self._fh is None:
            return
        try:
            self._fh.seek(0)
            self._fh.truncate()
            self._fh.flush()
        except OSError:
            pass
        finally:
            self._fh.close()  # closing the last descriptor releases the flock
            self._fh = None


def lock_dir(directory: str | Path, what: str) -> DirLock:
    """Take the exclusive lock of `directory` (its `.lock` file, holding the owner's pid while held) until the
    returned lock is closed or the process ends. It is an flock, so the kernel drops it with the process, kill -9
    included (the stale pid then left in the file is overwritten by the next run).

    Raises:
        ConfigError: another live process holds it; the message names that process's pid.
    """
    path = Path(directory) / ".lock"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "ab+")  # noqa: SIM115  (held for as long as the run writes)
    except OSError as e:
        raise write_failure(f"{what} lock file", path, e) from None
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        owner = fh.read().decode(errors="replace").strip() or "unknown"
        fh.close()
        raise ConfigError(
            f"`{directory}` is in use by another lmdistill run (pid {owner}) writing its {what}; two runs cannot "
            "write one directory. Wait for it to end (or stop it), or choose another output directory"
        ) from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n".encode())
    fh.flush()
    return DirLock(fh)


class StopFlag:
    """Set by the first SIGTERM/SIGINT inside `stop_on_signals`: the work in flight finishes, then the run stops."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""


def worker_signals() -> None:
    """A forked helper process's signals (a pool's initializer): SIGTERM ends it at once, as the pool's terminate()
    expects, instead of the parent's finish-then-stop handler it inherited; SIGINT is ignored, since Ctrl-C reaches
    the whole process group and the parent, which owns the work, decides and ends its helpers."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextmanager
def stop_on_signals(what: str) -> Iterator[StopFlag]:
    """Within the block, the first SIGTERM or SIGINT only sets the yielded flag (the caller finishes `what` is in
    flight, saves, and raises `Interrupted`); a second one stops the process at once, by that signal's default
    action. Handlers are installed only in the main thread (elsewhere the flag never sets) and restored afterwards.
    """
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    wanted = (signal.SIGTERM, signal.SIGINT)
    previous = {s: signal.getsignal(s) for s in wanted}

    def handler(signum: int, frame: FrameType | None) -> None:
        if flag.signum is not None:  # the second signal: stop now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        flag.signum = signum
        try:
            print(f"\n{signal.Signals(signum).name}: finishing the {what} in flight, then stopping (send it again to "
                  "stop at once)", file=sys.stderr, flush=True)
        except (OSError, ValueError):
            pass

    for s in wanted:
        signal.signal(s, handler)
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def resume_command(flag: str | None = None) -> str:
    """The command line of this process as a user would retype it (`lmdistill VERB ...`), with `flag` (e.g.
    `--train.resume`) set to true in place of any value it had."""
    args = list(sys.argv[1:])
    if flag is not None:
        kept: list[str] = []
        skip = False
        for a in args:
            if skip:
                skip = False
                continue
            if a == flag:
                skip = True
                continue
            if a.startswith(flag + "="):
                continue
            kept.append(a)
        args = [*kept, flag, "true"]
    return shlex.join(["lmdistill", *args])
