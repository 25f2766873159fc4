"""Atomic, pickle-free training checkpoints that any recipe (one model or two) can write and resume from.

Layout of `<output_dir>/checkpoints/step-00000050/`:
  model-<name>.safetensors      trainable parameters of each model (frozen ones are rebuilt identically at start-up)
  optimizer-<name>.pt           optimizer state (tensors and numbers only; loaded with weights_only=True)
  rng.safetensors               torch RNG state(s)
  state.json                    step, schedulers, recipe extras, format version, sha256 of every other file; last

A checkpoint is written under `.tmp-step-*`, fsynced and renamed, so a directory named `step-*` is complete; a kill
mid-write leaves only a `.tmp-*` directory that resume ignores with a warning. A `step-*` directory damaged after
that (a missing or torn file, a checksum that does not match) is reported on resume and the previous good one is used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmdistill import __version__
from lmdistill.errors import CheckpointError
from lmdistill.io import atomic_dir

log = logging.getLogger(__name__)
FORMAT_VERSION = 1


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
        raise CheckpointError(
            f"checkpoint `{where}` does not fit this model (missing {missing}, unexpected {extra}); resume with the "
            "same student config, or start a fresh output_dir"
        )
    with torch.no_grad():
        for name, value in state.items():
            if params[name].shape != value.shape:
                raise CheckpointError(
                    f"checkpoint `{where}`: `{name}` has shape {tuple(value.shape)}, the model expects "
                    f"{tuple(params[name].shape)}; resume with the same student config"
                )
            params[name].copy_(value.to(params[name].dtype))


class CheckpointManager:
    def __init__(self, output_dir: str | Path, keep: int = 2) -> None:
        self.root = Path(output_dir) / "checkpoints"
        self.keep = keep

    def save(self, step: int, *, models: dict[str, nn.Module | dict[str, torch.Tensor]],
             optimizers: dict[str, torch.optim.Optimizer | dict[str, Any]], schedulers: dict[str, Any],
             extra: dict[str, Any] | None = None) -> Path:
        """Write checkpoint `step` atomically. A model or optimizer may be given as a ready state dict (sharded
        engines gather theirs first, see lmdistill.train.distributed)."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"step-{step:08d}"
        with atomic_dir(final, "checkpoint") as tmp:  # written as .tmp-step-N, which _complete skips
            for name, model in models.items():
                tensors = trainable_state(model) if isinstance(model, nn.Module) else model
                save_file(tensors, str(tmp / f"model-{name}.safetensors"))
            for name, opt in optimizers.items():
                torch.save(opt if isinstance(opt, dict) else opt.state_dict(), tmp / f"optimizer-{name}.pt")
            rng = {"cpu": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state()
            save_file(rng, str(tmp / "rng.safetensors"))
            files = {f.name: _sha256(f) for f in sorted(tmp.iterdir()) if f.is_file()}
            state = {
                "format_version": FORMAT_VERSION,
                "lmdistill_version": __version__,
                "step": step,
                "schedulers": {k: s.state_dict() for k, s in schedulers.items()},
                "extra": extra or {},
                "files": files,
            }
            (tmp / "state.json").write_text(json.dumps(state, indent=1))
        self._prune()
        return final

    def _complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        for partial in self.root.glob(".tmp-step-*"):
            log.warning("ignoring half-written checkpoint %s (the run was stopped while saving it)", partial)
        return sorted(p for p in self.root.glob("step-*") if (p / "state.json").is_file())

    def _prune(self) -> None:
        for old in self._complete()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def latest(self) -> Path | None:
        done = self._complete()
        return done[-1] if done else None

    def verify(self, path: Path) -> str | None:
        """Why checkpoint `path` cannot be resumed from (None: it is intact): state.json unreadable, a file listed
        in it missing, or a file whose sha256 differs from the one recorded when it was written."""
        try:
            state = json.loads((path / "state.json").read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            return f"unreadable state.json ({e})"
        if not isinstance(state, dict):
            return "state.json is not a JSON object"
        for name, digest in (state.get("files") or {}).items():
            f = path / name
            if not f.is_file():
                return f"`{name}` is missing"
            try:
                actual = _sha256(f)
            except OSError as e:
                return f"`{name}` is unreadable ({e})"
            if actual != digest:
                return f"`{name}` does not match its checksum (torn or altered after it was written)"
        return None

    def latest_good(self) -> Path | None:
        """The newest intact checkpoint; each damaged newer one is reported with a warning and skipped.

        Raises:
            CheckpointError: checkpoints exist but none is intact.
        """
        done = self._complete()
        damaged: list[str] = []
        for path in reversed(done):
            why = self.verify(path)
            if why is None:
                return path
            log.warning("checkpoint %s is damaged: %s; falling back to the previous one", path, why)
            damaged.append(f"`{path.name}` is damaged: {why}")
        if damaged:
            raise CheckpointError(
                f"no intact checkpoint in `{self.root}`: {'; '.join(damaged)}. A damaged checkpoint is skipped to "
                "resume from an older one, but none is intact here: start a fresh output_dir, or rerun without "
                "--train.resume true"
            )
        return None

    def load(self, path: Path, *, models: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
             schedulers: dict[str, Any]) -> dict[str, Any]:
        """Restore everything saved at `path`; returns the state dict (step, extra)."""
        try:
            state = json.loads((path / "state.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"checkpoint `{path}` has an unreadable state.json ({e}); delete it to fall back") from None
        version = state.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint `{path}` has format version {version}, this lmdistill ({__version__}) reads version "
                f"{FORMAT_VERSION}; resume with the lmdistill that wrote it, or start a fresh output_dir"
            )
        try:
            for name, model in models.items():
                load_trainable_state(model, load_file(str(path / f"model-{name}.safetensors")), str(path))
            for name, opt in optimizers.items():
                opt.load_state_dict(torch.load(path / f"optimizer-{name}.pt", weights_only=True))
            rng = load_file(str(path / "rng.safetensors"))
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001
            raise _damaged(path, e) from None
        for name, sched in schedulers.items():
            sched.load_state_dict(state["schedulers"][name])
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        return state

    def read_states(self, path: Path, name: str) -> tuple[dict[str, torch.Tensor], Any]:
        """(model tensors, optimizer state) of `name` at `path`, unapplied: for engines that restore through their
        own API (FSDP). Call `load(path, models={}, optimizers={}, ...)` too, for schedulers and RNG."""
        try:
            tensors = load_file(str(path / f"model-{name}.safetensors"))
            optim = torch.load(path / f"optimizer-{name}.pt", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise _damaged(path, e) from None
        return tensors, optim


# Fields a resumed run may change: they decide how long the run goes on, how often it logs, evaluates and saves, and
# where its outputs go, not what a step computes. Any field named `output_dir` or `output` is an output path too.
RESUME_SAFE_FIELDS = frozenset({
    "train.max_steps", "train.eval_every", "train.eval_batches", "train.log_every", "train.save_every",
    "train.keep_checkpoints", "train.progress", "train.resume", "train.output_dir", "progress", "train.prepare_workers",
    "cache_align_workers", "cache_align_store",  # how a cache is aligned across tokenizers, not what it gives
})


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.removesuffix("."): obj}


def config_fingerprint(config: dict[str, Any]) -> str:
    """sha256 of the resolved config without its resume-safe fields."""
    kept = {k: v for k, v in _flatten(config).items() if not _resume_safe(k)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def _resume_safe(name: str) -> bool:
    return name in RESUME_SAFE_FIELDS or name.rsplit(".", 1)[-1] in ("output_dir", "output")


# How one global batch is split: these may change together with the number of processes as long as the global batch
# (micro_batch_size x grad_accum x processes) stays the same; the steps then see the same data.
BATCH_SPLIT_FIELDS = frozenset({"train.micro_batch_size", "train.grad_accum"})


def global_batch(config: dict[str, Any], world_size: int) -> int | None:
    train = config.get("train")
    if not isinstance(train, dict):
        return None
    try:
        return int(train["micro_batch_size"]) * int(train["grad_accum"]) * int(world_size)
    except (KeyError, TypeError, ValueError):
        return None


def config_changes(old: dict[str, Any], new: dict[str, Any], *, same_global_batch: bool = False) -> list[str]:
    """`dotted.name: old -> new` for every field that differs between two resolved configs, safe ones left out (and
    the batch split, when `same_global_batch`: the run's global batch is unchanged)."""
    a, b = _flatten(old), _flatten(new)
    missing = object()
    changes = []
    for key in sorted(set(a) | set(b)):
        if _resume_safe(key) or (same_global_batch and key in BATCH_SPLIT_FIELDS):
            continue
        x, y = a.get(key, missing), b.get(key, missing)
        if x != y:
            show = [("(absent)" if v is missing else json.dumps(v, default=str)) for v in (x, y)]
            changes.append(f"{key}: {show[0]} -> {show[1]}")
    return changes


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _damaged(path: Path, err: Exception) -> CheckpointError:
    return CheckpointError(f"checkpoint `{path}` is damaged ({err}); delete it to resume from an older one")
