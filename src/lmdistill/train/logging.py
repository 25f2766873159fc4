"""Run logs: JSON lines (always), TensorBoard (when installed), and a rich progress bar."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from lmdistill.errors import write_failure
from lmdistill.io import append_durably, write_text


class RunLogger:
    """Appends one JSON object per line to `<output_dir>/log.jsonl`; on resume drops lines past the resumed step."""

    def __init__(self, output_dir: str | Path, *, enabled: bool = True, resume_step: int | None = None) -> None:
        self.path = Path(output_dir) / "log.jsonl"
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            keep = [ln for ln in self.path.read_text().splitlines() if _step_of(ln) <= resume_step]
            write_text(self.path, "".join(ln + "\n" for ln in keep), "training log")
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))
        except Exception:  # noqa: BLE001  (tensorboard is optional)
            self._tb = None

    def log(self, step: int, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **record}
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            raise write_failure("training log", self.path, e) from None
        try:  # a full disk cuts the half-written line back off: the log holds whole lines only
            append_durably(fd, (json.dumps(row) + "\n").encode("utf-8"), "training log", self.path)
        finally:
            os.close(fd)
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, int | float):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # a torn line from a kill: drop it


def read_log(path: str | Path) -> list[dict[str, Any]]:
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def make_progress(enabled: bool, console: Console | None = None) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console or Console(stderr=True),
        disable=not enabled,
        transient=False,
    )
