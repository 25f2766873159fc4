"""Read a soft-label cache: sparse teacher targets for training batches, with nothing trusted unchecked.

:class:`CachedTeacher` opens a cache for one split and checks, before any training step, that it was written for
*this* run: the tokenizer fingerprint, the tokenised data (split fingerprint; on a mismatch the differing data
settings are named), the temperature the loss asks for, and that every shard file exists with its recorded size.
Each shard's sha256 is checked the first time a batch touches it, and every batch's blocks are compared to the
per-block digests stored at labelling time, so a corrupt shard, a truncated file or a misaligned batch raises a
CacheError naming the shard instead of training on garbage.

Shards are memory-mapped (safetensors ``safe_open``): a batch reads only the rows of its blocks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from lmdistill.cache.format import (
    Manifest,
    ShardEntry,
    block_digests,
    contained_shard_path,
    decode_values,
    differing_fields,
    read_manifest,
    sha256_file,
    unpack_ids,
)
from lmdistill.data import IGNORE, TokenBlocks
from lmdistill.errors import CacheError
from lmdistill.losses import sparse_divergence
from lmdistill.losses.sparse import SparseTargets
from lmdistill.teachers import SparseTeacher

_TEMPERATURE_TOL = 1e-6


class _Shard:
    """One open shard: its small per-block arrays in memory, the rest memory-mapped."""

    def __init__(self, root: Path, entry: ShardEntry, kind: str) -> None:
        self.entry, self.path = entry, contained_shard_path(root, entry.file)
        try:
            self.handle = safe_open(str(self.path), framework="pt")
            self.digest = self.handle.get_tensor("block_digest")
            self.row_offsets = self.handle.get_tensor("row_offsets")
            # sampled rows hold a variable number of ids: their offsets into the flat arrays
            self.id_offsets = None
            if kind == "sampled":
                n_ids = self.handle.get_tensor("n_ids").to(torch.int64)
                self.id_offsets = torch.cat([torch.zeros(1, dtype=torch.int64), n_ids.cumsum(0)])
        except Exception as e:  # noqa: BLE001  (safetensors raises several types for a damaged file)
            raise CacheError(f"shard `{self.path}` cannot be read ({e}); {_RELABEL}") from None

    def rows(self, name: str, lo: int, hi: int) -> Tensor:
        try:
            return self.handle.get_slice(name)[lo:hi]
        except Exception as e:  # noqa: BLE001
            raise CacheError(f"shard `{self.path}` has no readable `{name}` ({e}); {_RELABEL}") from None


_RELABEL = "delete it and rerun the same `lmdistill label` command, which relabels missing shards"


class CachedTeacher:
    """Sparse teacher targets from a cache, aligned to batches by their block indices.

    Args:
        root: cache directory written by `lmdistill label`.
        split: "train" or "eval".
        tokenizer: the student's tokenizer; its fingerprint must equal the cache's.
        blocks: the split's blocks as the trainer built them; their fingerprint must equal the cache's.
        data_params: the student's DataConfig as a dict, to name what differs when the data do not match.
        temperature: the loss temperature; must equal the cache's, except for a top-k cache without a tail, whose
            log-probs are rescaled (the loss renormalises the top-k, so that is exact).
        kind: the divergence the loss uses; a sampled cache serves only forward_kl.
        verify_checksums: hash each shard on first use (on by default; the cost is one read of the file).

    Raises:
        CacheError: a missing/incomplete cache, a missing split or shard file, a size mismatch (truncation), a
            tokenizer, data or temperature mismatch, or a divergence the encoding cannot serve.
    """

    def __init__(self, root: str | Path, split: str = "train", *, tokenizer: Any | None = None,
                 blocks: TokenBlocks | None = None, data_params: dict[str, Any] | None = None,
                 temperature: float | None = None, kind: str | None = None, verify_checksums: bool = True) -> None:
        self.manifest: Manifest = read_manifest(root)
        self.root, self.split_name = self.manifest.root, split
        self.info = self.manifest.split(split)
        self.enc = self.manifest.encoding
        self.kind = self.enc["kind"]
        self.verify_checksums = verify_checksums
        self.entries = {e.index: e for e in self.manifest.shards_of(split)}
        self._open: dict[int, _Shard] = {}
        self._check_files()
        if tokenizer is not None:
            self._check_tokenizer(tokenizer)
        if blocks is not None:
            self._check_data(blocks, data_params)
        self.scale = 1.0
        if temperature is not None:
            self._check_temperature(temperature)
        if kind is not None and self.kind != "topk" and kind != "forward_kl":
            raise CacheError(
                f"cache `{self.root}` holds {self.kind} targets (sampled draws), which give an unbiased estimate of "
                f"forward KL only; loss.kind={kind} needs a top-k cache (`lmdistill label --cache.encoding topk`) or "
                "loss.kind=forward_kl"
            )

    # -- checks at open -----------------------------------------------------------------------------------------------
    def _check_files(self) -> None:
        expected = -(-self.info["blocks"] // self.manifest.shard_blocks)
        missing = [j for j in range(expected) if j not in self.entries]
        if missing:
            raise CacheError(f"cache `{self.root}` manifest lists no shard {missing[:5]} of split `{self.split_name}`; "
                             "relabel it with `lmdistill label`")
        for e in self.entries.values():
            path = contained_shard_path(self.root, e.file)
            if not path.is_file():
                raise CacheError(f"shard `{path}` is missing; rerun the same `lmdistill label` command to relabel it")
            size = path.stat().st_size
            if size != e.bytes:
                raise CacheError(f"shard `{path}` is truncated or altered: {size} bytes, the manifest records "
                                 f"{e.bytes}; {_RELABEL}")

    def _check_tokenizer(self, tokenizer: Any) -> None:
        from lmdistill.models import tokenizer_fingerprint

        want = self.manifest.header["tokenizer"]
        got = tokenizer_fingerprint(tokenizer)
        if got != want["fingerprint"]:
            fix = ("train across tokenizers from this cache with `--loss.cross_tokenizer hybrid` (or uld)"
                   if self.enc.get("cross_tokenizer") else
                   "relabel with `lmdistill label --cache.cross_tokenizer true` and train with "
                   "`--loss.cross_tokenizer hybrid`")
            raise CacheError(
                f"tokenizer mismatch: cache `{self.root}` was labelled with a tokenizer of {want['vocab']} tokens "
                f"(fingerprint {want['fingerprint'][:12]}), the student's has {len(tokenizer)} tokens (fingerprint "
                f"{got[:12]}); cached ids would mean other tokens. Use the teacher's tokenizer, or {fix}"
            )

    def _check_data(self, blocks: TokenBlocks, data_params: dict[str, Any] | None) -> None:
        # the fingerprint hashes bytes only: blocks of 16 and 24 cut from one stream can share it, so compare shapes too
        shape = (len(blocks), int(blocks.input_ids.shape[1]))
        if blocks.fingerprint() == self.info["fingerprint"] and shape == (self.info["blocks"], self.info["block_size"]):
            return
        cached = self.manifest.header["data"]["params"]
        diff = differing_fields(cached, data_params) if data_params is not None else []
        what = (f"the data settings differ ({'; '.join(diff)}) (cache != yours)" if diff else
                "the settings are equal but the tokenised blocks are not (did the dataset files change?)")
        raise CacheError(
            f"data mismatch: cache `{self.root}` split `{self.split_name}` was labelled on {self.info['blocks']} blocks "
            f"(fingerprint {self.info['fingerprint'][:12]}), this run has {len(blocks)} (fingerprint "
            f"{blocks.fingerprint()[:12]}): {what}. Use the cache's data settings or relabel"
        )

    def _check_temperature(self, temperature: float) -> None:
        cached = float(self.enc["temperature"])
        if abs(temperature - cached) <= _TEMPERATURE_TOL:
            return
        if self.kind == "topk" and not self.enc["tail"]:
            # p^(Tc/Ts) renormalised over the stored ids is exactly the tempered top-k distribution
            self.scale = cached / temperature
            return
        what = {"topk": "the tail mass", "sampled": "the sampled draws", "topk_sampled": "the tail mass and its draws"}
        why = f"{what.get(self.kind, 'the targets')} were computed at T={cached:g}"
        raise CacheError(
            f"temperature mismatch: cache `{self.root}` holds teacher log-probs at temperature {cached:g} and "
            f"loss.temperature={temperature:g} asks for another; {why} and cannot be re-tempered. Set "
            f"loss.temperature={cached:g}, or relabel with --cache.temperature {temperature:g} (a top-k cache with "
            "--cache.tail false serves any temperature)"
        )

    # -- reading ------------------------------------------------------------------------------------------------------
    def _shard(self, index: int) -> _Shard:
        shard = self._open.get(index)
        if shard is None:
            entry = self.entries[index]
            if self.verify_checksums:
                digest = sha256_file(contained_shard_path(self.root, entry.file))
                if digest != entry.sha256:
                    raise CacheError(f"shard `{self.root / entry.file}` is corrupt: sha256 {digest[:16]}... differs "
                                     f"from the manifest's {entry.sha256[:16]}...; {_RELABEL}")
            shard = _Shard(self.root, entry, self.kind)
            if len(self._open) >= 8:  # a handful of open maps is plenty for sequential or shuffled access
                self._open.pop(next(iter(self._open)))
            self._open[index] = shard
        return shard

    def shard_tensors(self, index: int, names: tuple[str, ...]) -> dict[str, Tensor]:
        """Whole tensors `names` of shard `index` as stored (checksum verified on first use of the shard)."""
        shard = self._shard(index)
        out = {}
        for name in names:
            try:
                out[name] = shard.handle.get_tensor(name)
            except Exception as e:  # noqa: BLE001  (safetensors raises several types)
                raise CacheError(f"shard `{shard.path}` has no readable `{name}` ({e}); {_RELABEL}") from None
        return out

    def verify(self) -> None:
        """Hash every shard of the split now (otherwise each is checked on first use)."""
        for j in self.entries:
            self._shard(j)

    def targets(self, batch: dict[str, Tensor]) -> SparseTargets:
        """Sparse targets for a batch of whole blocks (a `TokenBlocks.batch` dict with `index`).

        Returns:
            SparseTargets with ids [B, T, K] int64 (-1 where nothing is stored), logprobs [B, T, K] fp32 at the
            loss temperature, and tail_logprob [B, T] (top-k with tail) or weights [B, T, K] (sampled), on the
            batch's device.

        Raises:
            CacheError: a block whose content differs from the labelled one, or a corrupt shard.
        """
        if "index" not in batch:
            raise CacheError("the batch has no `index` (block indices); build it with TokenBlocks.batch(indices)")
        index = batch["index"].cpu().tolist()
        labels = batch["labels"].cpu()
        mask = labels != IGNORE
        digests = block_digests(batch["input_ids"].cpu(), labels, batch["attention_mask"].cpu())
        S = self.manifest.shard_blocks
        per_block: list[dict[str, Tensor]] = []
        for b, gi in enumerate(index):
            if not 0 <= gi < self.info["blocks"]:
                raise CacheError(f"block {gi} is outside the cache's `{self.split_name}` split "
                                 f"({self.info['blocks']} blocks)")
            shard = self._shard(gi // S)
            local = gi - shard.entry.blocks[0]
            if not torch.equal(shard.digest[local], digests[b]):
                raise CacheError(
                    f"block {gi} of this batch differs from the block labelled in shard `{shard.path}` (input ids, "
                    "labels or mask); the cache belongs to other data. Relabel with this run's data settings"
                )
            r0, r1 = int(shard.row_offsets[local]), int(shard.row_offsets[local + 1])
            if r1 - r0 != int(mask[b].sum()):
                raise CacheError(f"shard `{shard.path}` stores {r1 - r0} rows for block {gi}, which has "
                                 f"{int(mask[b].sum())} target positions; {_RELABEL}")
            per_block.append(self._read_rows(shard, r0, r1))
        out = self._assemble(per_block, mask)
        device = batch["input_ids"].device
        return SparseTargets(
            ids=out["ids"].to(device), logprobs=out["logprobs"].to(device),
            tail_logprob=None if "tail" not in out else out["tail"].to(device),
            weights=None if "weights" not in out else out["weights"].to(device),
            estimator="topk" if self.kind == "topk" else "sampled",
        )

    def _read_rows(self, shard: _Shard, r0: int, r1: int) -> dict[str, Tensor]:
        enc, c = self.enc, self.enc.get("int8_range", 0.0)
        if self.kind == "topk":
            out = {"ids": unpack_ids(shard.rows("ids", r0, r1), enc["id_bytes"]),
                   "logprobs": decode_values(shard.rows("logprobs", r0, r1), enc["values"], c)}
            if enc["tail"]:
                out["tail"] = decode_values(shard.rows("tail_logprob", r0, r1), enc["values"], c)
            return out
        if self.kind == "topk_sampled":
            return self._read_topk_sampled(shard, r0, r1)
        assert shard.id_offsets is not None
        s0, s1 = int(shard.id_offsets[r0]), int(shard.id_offsets[r1])
        return {"n": shard.id_offsets[r0 + 1 : r1 + 1] - shard.id_offsets[r0:r1],
                "ids": unpack_ids(shard.rows("ids", s0, s1), enc["id_bytes"]),
                "logprobs": decode_values(shard.rows("logprobs", s0, s1), enc["values"], c),
                "counts": shard.rows("counts", s0, s1).to(torch.float32)}

    def _read_topk_sampled(self, shard: _Shard, r0: int, r1: int) -> dict[str, Tensor]:
        """Head and tail mass as top-k; the n tail draws per row ([rows, n], ascending, repeats allowed) as distinct
        ids with counts, as a sampled shard stores them; a draw equal to a head id is the "no draw" filler."""
        enc, c = self.enc, self.enc.get("int8_range", 0.0)
        head = unpack_ids(shard.rows("ids", r0, r1), enc["id_bytes"])
        draws = unpack_ids(shard.rows("tail_ids", r0, r1), enc["id_bytes"])
        if draws.shape != (r1 - r0, int(enc["draws"])):
            raise CacheError(f"shard `{shard.path}` holds tail_ids of shape {tuple(draws.shape)}, the manifest says "
                             f"{enc['draws']} draws per row; {_RELABEL}")
        real = ~(draws.unsqueeze(-1) == head.unsqueeze(-2)).any(-1)
        vocab = int(enc["vocab"])
        keys = (torch.arange(r1 - r0).unsqueeze(-1) * vocab + draws)[real]  # sorted: rows in order, ids ascending
        uniq, counts = torch.unique_consecutive(keys, return_counts=True)
        n = torch.bincount(uniq // vocab, minlength=r1 - r0)
        # every draw of a row carries the row's mean tail log-prob (only the loss value reads it)
        mean = decode_values(shard.rows("tail_mean_logprob", r0, r1), enc["values"], c)
        return {"n": n, "ids": uniq % vocab, "logprobs": torch.repeat_interleave(mean, n),
                "counts": counts.to(torch.float32), "head_ids": head,
                "head_logprobs": decode_values(shard.rows("logprobs", r0, r1), enc["values"], c),
                "tail": decode_values(shard.rows("tail_logprob", r0, r1), enc["values"], c)}

    def _assemble(self, per_block: list[dict[str, Tensor]], mask: Tensor) -> dict[str, Tensor]:
        """Scatter stored rows (target positions only) back to [B, T, K]; -1 ids elsewhere."""
        B, T = mask.shape
        if self.kind == "topk":
            k = self.enc["k"]
            ids = torch.full((B, T, k), -1, dtype=torch.int64)
            lp = torch.zeros(B, T, k)
            ids[mask] = torch.cat([p["ids"] for p in per_block])
            lp[mask] = torch.cat([p["logprobs"] for p in per_block]) * self.scale
            out = {"ids": ids, "logprobs": lp}
            if self.enc["tail"]:
                tail = torch.zeros(B, T)
                tail[mask] = torch.cat([p["tail"] for p in per_block])
                out["tail"] = tail
            return out
        n = torch.cat([p["n"] for p in per_block])  # distinct ids of each target row
        k = max(int(n.max()) if n.numel() else 1, 1)
        # ragged rows -> padded [rows, k]: entry e of row r goes to column e - start(r)
        starts = torch.cat([torch.zeros(1, dtype=torch.int64), n.cumsum(0)[:-1]])
        row = torch.repeat_interleave(torch.arange(n.numel()), n)
        col = torch.arange(int(n.sum())) - starts[row]
        flat = {key: torch.cat([p[key] for p in per_block]) for key in ("ids", "logprobs", "counts")}
        ids_r = torch.full((n.numel(), k), -1, dtype=torch.int64)
        lp_r, w_r = torch.zeros(n.numel(), k), torch.zeros(n.numel(), k)
        ids_r[row, col] = flat["ids"]
        lp_r[row, col] = flat["logprobs"]
        w_r[row, col] = flat["counts"] / float(self.enc["draws"])
        if self.kind == "topk_sampled":
            ids_r, lp_r, w_r = self._with_head(per_block, ids_r, lp_r, w_r)
            k = ids_r.shape[-1]
        ids, lp, w = torch.full((B, T, k), -1, dtype=torch.int64), torch.zeros(B, T, k), torch.zeros(B, T, k)
        ids[mask], lp[mask], w[mask] = ids_r, lp_r, w_r
        return {"ids": ids, "logprobs": lp, "weights": w}

    @staticmethod
    def _with_head(per_block: list[dict[str, Tensor]], tail_ids: Tensor, tail_lp: Tensor,
                   tail_frac: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """topk_sampled rows as one sampled target: the head ids with weight p_T(v), then the tail draws with weight
        m * c_v / n (m = tail mass), all renormalised so the weights sum to 1 (stored values are rounded).

        Args:
            tail_ids, tail_lp, tail_frac: [rows, D] padded tail draws (-1 ids), their log-probs and c_v / n.

        Returns:
            ids, log-probs and weights [rows, K + D]; the log-probs shifted by the same renormalisation.
        """
        head_ids = torch.cat([p["head_ids"] for p in per_block])
        head_lp = torch.cat([p["head_logprobs"] for p in per_block])
        tail = torch.cat([p["tail"] for p in per_block])
        # stored mass of each row: head probabilities + tail mass; log of it renormalises both parts
        log_z = torch.logaddexp(torch.logsumexp(head_lp, -1), tail)
        has_draws = tail_frac.sum(-1) > 0
        # a row without draws (k = V, or a tail too small to keep) gets no tail term: its head alone is renormalised
        log_z = torch.where(has_draws, log_z, torch.logsumexp(head_lp, -1))
        head_w = (head_lp - log_z.unsqueeze(-1)).exp()
        tail_w = torch.where(tail_ids >= 0, (tail - log_z).exp().unsqueeze(-1) * tail_frac, torch.zeros_like(tail_frac))
        ids = torch.cat([head_ids, tail_ids], -1)
        lp = torch.cat([head_lp, tail_lp], -1) - log_z.unsqueeze(-1)
        return ids, torch.where(ids >= 0, lp, torch.zeros_like(lp)), torch.cat([head_w, tail_w], -1)

    def close(self) -> None:
        self._open.clear()


@torch.no_grad()
def evaluate_with_cache(student: nn.Module, cached: SparseTeacher, blocks: TokenBlocks, *, n_vocab: int,
                        batch_size: int = 4, max_batches: int | None = None,
                        byte_lengths: Tensor | None = None) -> dict[str, float]:
    """Held-out metrics of `student` with the teacher side read from a cache (no teacher model).

    ce / perplexity / ece (and bits_per_byte, with the student tokenizer's `byte_lengths` table) are against the
    ground truth. ``kl_to_teacher`` is the forward KL against the *cached*
    targets: for top-k with a tail, KL between the (K+1)-bucket coarsenings (a lower bound of the full KL, equal to
    it at K = V); without a tail, KL to the renormalised top-k; for a sampled cache, the unbiased RS-KD estimate of
    the full KL. ``agreement``: the student's top-1 equals the teacher's most probable stored id (for top-k, exactly
    the teacher's top-1).
    """
    from lmdistill.evaluate import MetricSums, held_out_batches

    if len(blocks) == 0:
        return {}
    was_training = student.training
    student.eval()
    device = next(student.parameters()).device
    sums = MetricSums()
    kl, agree = 0.0, 0.0
    for batch in held_out_batches(blocks, batch_size, max_batches, device):
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[..., :n_vocab]
        labels = batch["labels"]
        sums.add(logits, labels, byte_lengths=byte_lengths)
        t = cached.targets(batch)
        mask = labels != IGNORE
        kl += float(sparse_divergence(
            logits, t.ids, t.logprobs, "forward_kl", tail_logprob=t.tail_logprob, target_weights=t.weights,
            estimator=t.estimator, mask=mask, reduction="sum"))
        best = t.logprobs.masked_fill(t.ids < 0, float("-inf")).argmax(-1, keepdim=True)
        teacher_top1 = t.ids.gather(-1, best).squeeze(-1)
        agree += float(((logits.argmax(-1) == teacher_top1) & mask).sum())
    out = sums.result()
    n = max(sums.tokens, 1)
    out.update(kl_to_teacher=kl / n, agreement=agree / n)
    student.train(was_training)
    return out
