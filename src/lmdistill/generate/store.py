"""Append-only JSONL with durable appends, so a killed `generate` resumes without losing or duplicating a sample.

Each append writes whole lines, then fsyncs: after it returns the records survive a crash; a write that a full
disk cuts short is truncated back to the last whole record before the error is raised. A kill
during a write can leave a torn last line (no newline, or not JSON); `load` drops it and truncates the file to the last
complete record, so the next append starts on a clean line. A bad line anywhere else is not a torn write, and is
reported rather than silently dropped.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import IO, Any

from lmdistill.errors import DataError
from lmdistill.io import append_durably, open_locked

log = logging.getLogger(__name__)


class JsonlStore:
    """One JSONL file owned by one writer (an exclusive lock refuses a second process on the same file).

    Args:
        path: the file; parent directories are created.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fh: IO[bytes] | None = None

    def open(self, overwrite: bool = False) -> list[dict[str, Any]]:
        """Lock the file for appending and return the complete records already in it (after dropping a torn tail)."""
        self._fh = fh = open_locked(self.path, "another `lmdistill generate`")
        if overwrite:
            fh.truncate(0)
            os.fsync(fh.fileno())
            return []
        records, good_bytes = read_records(self.path)
        size = self.path.stat().st_size
        if good_bytes < size:
            log.warning("dropped a torn last line (%d bytes) from `%s`, left by a killed run", size - good_bytes, self.path)
            fh.truncate(good_bytes)
            os.fsync(fh.fileno())
        return records

    def append(self, records: list[dict[str, Any]]) -> None:
        """Write records as whole lines, then fsync; a failed write (a full disk) is cut back to the last whole record
        and raised as one `OutputWriteError`."""
        if self._fh is None:
            raise RuntimeError("JsonlStore.open() first")
        payload = "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in records)
        append_durably(self._fh.fileno(), payload.encode("utf-8"), "generated records", self.path)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()  # closing releases the lock
            self._fh = None

    def __enter__(self) -> JsonlStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_records(path: str | Path) -> tuple[list[dict[str, Any]], int]:
    """(complete records, byte length of the complete prefix). A torn last line is excluded from both.

    Raises:
        DataError: a line other than the last is not a JSON object.
    """
    path = Path(path)
    if not path.exists():
        return [], 0
    data = path.read_bytes()
    lines = data.split(b"\n")
    # After split, the final element is what follows the last newline: empty for a clean file, else torn.
    complete, tail = lines[:-1], lines[-1]
    records: list[dict[str, Any]] = []
    good = 0
    for number, line in enumerate(complete, start=1):
        if not line.strip():
            good += len(line) + 1
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if number == len(complete) and not tail:
                # The newline made it but the bytes before it did not (e.g. zero-filled after a crash): still torn.
                return records, good
            raise DataError(
                f"`{path}` line {number} is not a JSON record ({e}); only a torn last line is repaired automatically. "
                "Delete that line, or rerun with overwrite=true to start over"
            ) from None
        records.append(record)
        good += len(line) + 1
    return records, good
