r"""Write a soft-label cache: encode teacher distributions sparsely, shard by global block range, resume, merge.

Shards are defined by the data, not by the run: shard ``j`` of a split holds blocks ``[j*S, (j+1)*S)``, and rank
``r`` of ``W`` writes the shards with ``j % W == r``. Each shard is encoded from the teacher's log-probs of its own
blocks, in batches that start at the shard's first block, and a sampled shard draws from its own seeded generator,
so its bytes do not depend on which process wrote it, how many there were, or whether the run was interrupted.

A run proceeds, per rank: check that any existing cache was written with the same settings; keep the shards it owns
whose files still match their recorded sha256; label the missing ones in order, each written under a temporary name,
fsynced, renamed, then recorded in the rank's journal (``manifest.rank-R-of-W.json``, rewritten atomically); finally
rank 0 merges the journals into ``manifest.json``. Killed at any moment, the next run resumes at the first missing
shard.

**Sampled encoding (Random-Sampling KD, Anshumann et al. 2025).** Per position, ``n`` ids are drawn i.i.d. from the
teacher's distribution at the cache temperature; the cache keeps the distinct ids ``i``, their counts ``c_i`` and the
teacher's log-probs ``log p_T(i)``. With weights ``w_i = c_i / n``, ``E[w_i] = p_T(i)`` for every id (drawn or not),
so ``sum_i w_i (log p_T(i) - log p_S(i))`` is an unbiased estimate of ``KL(p_T || p_S)`` and of its gradient
(:mod:`lmdistill.losses.sparse` has the derivation). Storage grows with the number of *distinct* ids, which for a
confident teacher is far below ``n``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_save
from torch import Tensor

from lmdistill.cache.format import (
    FORMAT,
    JOURNAL_GLOB,
    MANIFEST,
    Manifest,
    ShardEntry,
    block_digests,
    count_dtype,
    differing_fields,
    encode_values,
    format_version,
    id_bytes,
    identity,
    journal_name,
    n_shards,
    pack_ids,
    row_offsets_of,
    sha256_file,
    shard_name,
)
from lmdistill.config import CacheConfig
from lmdistill.data import IGNORE, ChatBlocks, TokenBlocks
from lmdistill.errors import CacheError, ConfigError
from lmdistill.io import atomic_dir, write_bytes, write_json

log = logging.getLogger(__name__)

LogitsFn = Callable[[dict[str, Tensor]], Tensor]


# ---------------------------------------------------------------------------------------------------------------------
# encodings: full log-probs [R, V] of the target positions -> sparse rows


def topk_rows(logprobs: Tensor, k: int, tail: bool) -> dict[str, Tensor]:
    """The k most probable ids per row (descending), their log-probs, and the log of the mass outside them.

    Args:
        logprobs: [R, V] fp32 teacher log-probs at the cache temperature.

    Returns:
        ids [R, K] int64, logprobs [R, K] fp32, and tail_logprob [R] fp32 (-inf when k = V) if `tail`.
    """
    values, ids = torch.topk(logprobs, k, dim=-1)
    out = {"ids": ids, "logprobs": values}
    if tail:
        # log of the complement's mass straight from its entries: log1p(-sum p_k) would round a tiny tail to 0
        rest = logprobs.scatter(-1, ids, float("-inf"))
        out["tail_logprob"] = torch.logsumexp(rest, dim=-1)
    return out


def sampled_rows(logprobs: Tensor, draws: int, generator: torch.Generator) -> dict[str, Tensor]:
    """`draws` i.i.d. samples per row from exp(logprobs), kept as distinct ids (ascending) with counts.

    Args:
        logprobs: [R, V] fp32 teacher log-probs at the cache temperature.

    Returns:
        n_ids [R] int64 (distinct ids per row), and flat over rows: ids [S], counts [S], logprobs [S] (S = sum n_ids).
        Weights for the loss are counts / draws.
    """
    rows, vocab = logprobs.shape
    if rows == 0:
        z = torch.zeros(0, dtype=torch.int64, device=logprobs.device)
        return {"n_ids": z, "ids": z, "counts": z, "logprobs": logprobs.new_zeros(0)}
    draws_ = torch.multinomial(logprobs.exp(), draws, replacement=True, generator=generator)  # [R, n]
    # one sorted key per (row, id): unique_consecutive then yields every row's distinct ids and their counts
    keys = (torch.arange(rows, device=logprobs.device).unsqueeze(-1) * vocab + draws_).sort(dim=-1).values.reshape(-1)
    uniq, counts = torch.unique_consecutive(keys, return_counts=True)
    row, ids = uniq // vocab, uniq % vocab
    return {"n_ids": torch.bincount(row, minlength=rows), "ids": ids, "counts": counts,
            "logprobs": logprobs[row, ids]}


def topk_sampled_rows(logprobs: Tensor, k: int, draws: int, generator: torch.Generator) -> dict[str, Tensor]:
    """The exact top-k head (as :func:`topk_rows` with a tail) plus `draws` systematic samples of the tail.

    The tail is the teacher's distribution outside the k ids, renormalised: ``r(v) = p_T(v) / m`` with ``m`` the tail
    mass. Systematic sampling draws one uniform ``u`` per row and takes the ids at the points ``(i + u) / n`` of the
    tail's cumulative distribution (ids in vocabulary order), ``i = 0 .. n-1``: each id's count ``c_v`` is then
    ``floor(n r(v))`` or ``ceil(n r(v))`` with ``E[c_v] = n r(v)`` (unbiased, like i.i.d. draws, and with far less
    variance: an id with ``n r(v) >= 1`` is never missed). Weights ``m c_v / n`` next to the head's ``p_T(v)`` thus
    have expectation ``p_T(v)`` for every id, which is what the sampled forward-KL estimator needs
    (:mod:`lmdistill.losses.sparse`).

    Stored per draw: its id only (``n`` per row, ascending, an id drawn twice appears twice), because a tail is flat
    enough that most ids are drawn once, where an id + count pair costs more. The draws' own log-probs are not kept:
    the estimator's gradient never uses them, and its value needs only ``sum_v m r(v) log p_T(v)`` over the tail,
    which one number per row gives exactly: the tail's mean log-prob ``sum_v r(v) log p_T(v)``, assigned to every
    draw (the draws' weights sum to ``m``). A row whose tail mass is 0 (k = V) stores its top-1 id ``n`` times: a
    tail draw equal to a head id means "no draw" to the reader.

    Args:
        logprobs: [R, V] fp32 teacher log-probs at the cache temperature.

    Returns:
        ids [R, K], logprobs [R, K], tail_logprob [R] (as topk), tail_mean_logprob [R] (0 without a tail), and the
        draws tail_ids [R, n] int64 (ascending within a row).
    """
    out = topk_rows(logprobs, k, tail=True)
    rows, vocab = logprobs.shape
    rest = logprobs.scatter(-1, out["ids"], float("-inf"))
    has_tail = torch.isfinite(out["tail_logprob"])
    # the tail's cumulative distribution; a row without a tail gets a harmless uniform one, and its draws are dropped
    r = torch.where(has_tail.unsqueeze(-1), (rest - out["tail_logprob"].unsqueeze(-1)).exp(),
                    torch.full_like(rest, 1.0 / vocab))
    cdf = r.cumsum(-1)
    cdf = cdf / cdf[:, -1:].clamp_min(1e-30)  # exactly 1 at the end, whatever the float sum
    u = torch.rand(rows, 1, generator=generator, device=logprobs.device, dtype=torch.float64)
    points = ((torch.arange(draws, device=logprobs.device, dtype=torch.float64) + u) / draws).to(cdf.dtype)
    picked = torch.searchsorted(cdf, points.contiguous(), right=True).clamp_max(vocab - 1)  # [R, n], ascending
    # float rounding can land a point on an id of zero tail mass (a head id or a -inf one): move it to its left
    # neighbour with mass, which is where the rounded cdf step came from
    bad = r.gather(-1, picked) <= 0
    if bool(bad.any()):
        last_with_mass = torch.where(r > 0, torch.arange(vocab, device=r.device), -1).cummax(-1).values
        picked = torch.where(bad, last_with_mass.gather(-1, picked).clamp_min(0), picked)
    picked = torch.where(has_tail.unsqueeze(-1), picked, out["ids"][:, :1])
    mean = torch.where(r > 0, r * rest, torch.zeros_like(r)).sum(-1)  # r = 0 where rest = -inf: no 0 * inf
    out.update(tail_ids=picked, tail_mean_logprob=torch.where(has_tail, mean, torch.zeros_like(mean)))
    return out


def shard_seed(seed: int, split: str, index: int) -> int:
    """A 63-bit seed per (cache seed, split, shard): shards draw independently of which rank writes them."""
    digest = hashlib.sha256(f"{seed}/{split}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# ---------------------------------------------------------------------------------------------------------------------
# fingerprints and the header


def teacher_fingerprint(model: Any, name_or_path: str) -> dict[str, str]:
    """Model id/path, sha256 of its config (volatile keys dropped) and sha256 of its state dict.

    The weights hash runs over the loaded state dict (sorted names, dtype, shape, raw bytes), not over files: it works
    for hub ids and local directories alike and reflects the precision the teacher actually ran in. For a 135M-param
    model it takes about a second.
    """
    cfg = model.config.to_dict()
    for key in ("_name_or_path", "transformers_version", "architectures", "_commit_hash", "dtype", "torch_dtype"):
        cfg.pop(key, None)
    config_sha = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    weights_sha = h.hexdigest()
    return {"name_or_path": name_or_path, "config_sha256": config_sha, "weights_sha256": weights_sha,
            "fingerprint": hashlib.sha256(f"{name_or_path}|{config_sha}|{weights_sha}".encode()).hexdigest()}


def conversation_tensors(conversations: list[list[dict[str, str]]]) -> dict[str, Tensor]:
    """A chat shard's conversations, one JSON text per block: `conversations` (uint8, the UTF-8 bytes of all of them)
    and `conversation_offsets` [n_blocks + 1] (int64)."""
    texts = [json.dumps(m, ensure_ascii=False, separators=(",", ":")).encode("utf-8") for m in conversations]
    offsets = torch.zeros(len(texts) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor([len(t) for t in texts], dtype=torch.int64).cumsum(0)
    data = torch.tensor(list(b"".join(texts)), dtype=torch.uint8)
    return {"conversations": data, "conversation_offsets": offsets}


def check_cross_tokenizer(cfg: CacheConfig, data_params: dict[str, Any]) -> None:
    """Refuse `cache.cross_tokenizer` where a reader of another tokenizer could not rebuild the text or the spans."""
    if cfg.encoding == "sampled":
        raise ConfigError("cache.cross_tokenizer needs the teacher's top-k per position: use --cache.encoding topk "
                          "(or topk_sampled), not sampled")
    if cfg.temperature != 1.0:
        raise ConfigError(
            f"cache.cross_tokenizer stores the log-prob of each actual token, which the span loss reads at "
            f"temperature 1 (a span's probability is the product of its tokens'); got cache.temperature="
            f"{cfg.temperature:g}: set --cache.temperature 1"
        )


TOKENIZER_DIR = "tokenizer"  # a cross-tokenizer cache's copy of the teacher's tokenizer (save_pretrained)


def save_tokenizer(root: str | Path, tokenizer: Any, fingerprint: str) -> Path:
    """Write the teacher's tokenizer into `root/tokenizer` (atomically) unless a copy with this fingerprint is there:
    a reader of another tokenizer spells the cached token ids with it, with no teacher model at hand."""
    from lmdistill.models import load_tokenizer, tokenizer_fingerprint

    out = Path(root).expanduser() / TOKENIZER_DIR
    if out.is_dir():
        try:
            if tokenizer_fingerprint(load_tokenizer(str(out))) == fingerprint:
                return out
        except Exception:  # noqa: BLE001  (an unreadable copy is rewritten)
            pass
    with atomic_dir(out, "the teacher tokenizer of the soft-label cache") as tmp:
        tokenizer.save_pretrained(tmp)
    return out


def split_info(blocks: TokenBlocks) -> dict[str, Any]:
    return {"blocks": len(blocks), "block_size": int(blocks.input_ids.shape[1]),
            "target_tokens": blocks.n_target_tokens, "fingerprint": blocks.fingerprint()}


def build_header(*, teacher: dict[str, str], tokenizer_fingerprint: str, vocab: int, data_params: dict[str, Any],
                 splits: dict[str, TokenBlocks], cfg: CacheConfig) -> dict[str, Any]:
    """Everything manifest.json holds besides the shard list."""
    if cfg.encoding in ("topk", "topk_sampled") and cfg.k > vocab:
        raise ConfigError(f"cache.k={cfg.k} is larger than the vocabulary ({vocab} tokens); use k <= {vocab}")
    encoding: dict[str, Any] = {"kind": cfg.encoding, "values": cfg.values, "temperature": cfg.temperature,
                                "id_bytes": id_bytes(vocab), "vocab": vocab}
    if cfg.values == "int8":
        encoding["int8_range"] = cfg.int8_range
    if cfg.encoding == "topk":
        encoding.update(k=cfg.k, tail=cfg.tail)
    elif cfg.encoding == "topk_sampled":
        encoding.update(k=cfg.k, tail=True, draws=cfg.draws, seed=cfg.seed)
    else:
        encoding.update(draws=cfg.draws, seed=cfg.seed)
    if cfg.cross_tokenizer:
        check_cross_tokenizer(cfg, data_params)
        encoding["cross_tokenizer"] = True  # only when on: a cache without it keeps its bytes and manifest
    return {
        "format": FORMAT,
        "version": format_version(cfg.encoding),
        "teacher": teacher,
        "tokenizer": {"fingerprint": tokenizer_fingerprint, "vocab": vocab},
        "data": {"params": data_params, "splits": {name: split_info(b) for name, b in splits.items()}},
        "encoding": encoding,
        "shard_blocks": cfg.shard_blocks,
        "batch_size": cfg.batch_size,
    }


# ---------------------------------------------------------------------------------------------------------------------
# the writer


class CacheWriter:
    """Writes this rank's shards of a cache directory and, on rank 0, merges every rank's journal at the end.

    Args:
        root: the cache directory.
        header: from :func:`build_header`; must equal (in :func:`~lmdistill.cache.format.identity`) any cache already
            in `root`, else CacheError naming the differing fields.
        rank, world_size: this process's share: shards with ``index % world_size == rank``.
    """

    def __init__(self, root: str | Path, header: dict[str, Any], *, rank: int = 0, world_size: int = 1) -> None:
        self.root = Path(root).expanduser()
        self.header, self.rank, self.world = header, rank, world_size
        self.enc = header["encoding"]
        self._check_existing()
        self.done: dict[tuple[str, int], ShardEntry] = self._verified_done()
        self._write_journal()

    # -- resume -------------------------------------------------------------------------------------------------------
    def _existing(self) -> list[tuple[str, dict[str, Any]]]:
        """(file name, parsed JSON) of manifest.json and every journal already in the directory."""
        found = []
        for path in [self.root / MANIFEST, *sorted(self.root.glob(JOURNAL_GLOB))]:
            if path.is_file():
                try:
                    found.append((path.name, json.loads(path.read_text())))
                except (json.JSONDecodeError, UnicodeDecodeError):
                    # atomic writes never leave a torn file; a hand-damaged one only costs relabelling its shards
                    log.warning("ignoring unreadable %s", path)
        return found

    def _check_existing(self) -> None:
        mine = identity(self.header)
        for name, raw in self._existing():
            other = raw.get("header", raw)
            try:
                theirs = identity(other)
            except KeyError:
                theirs = other
            if theirs != mine:
                diff = differing_fields(theirs, mine)
                raise CacheError(
                    f"`{self.root}` already holds a cache written with other settings ({name}: "
                    f"{'; '.join(diff[:6])}{' ...' if len(diff) > 6 else ''}) (existing != requested); choose another "
                    "cache.output_dir, or delete that directory to relabel"
                )

    def _candidates(self) -> dict[tuple[str, int], list[ShardEntry]]:
        out: dict[tuple[str, int], list[ShardEntry]] = {}
        for _, raw in self._existing():
            for shard in raw.get("shards", []):
                entry = ShardEntry.from_json(shard)
                out.setdefault((entry.split, entry.index), []).append(entry)
        return out

    def _verified_done(self) -> dict[tuple[str, int], ShardEntry]:
        """This rank's shards recorded by an earlier run whose files still hash to the recorded sha256."""
        done = {}
        for key, entries in self._candidates().items():
            if key[1] % self.world != self.rank:
                continue
            path = self.root / entries[0].file
            if not path.is_file():
                continue
            size = path.stat().st_size
            sized = [e for e in entries if e.bytes == size]
            digest = sha256_file(path) if sized else None
            match = next((e for e in sized if e.sha256 == digest), None)
            if match is not None:
                done[key] = match
            else:
                log.warning("shard %s does not match its recorded checksum; it will be labelled again", path)
        return done

    def _write_journal(self) -> None:
        shards = [e.to_json() for e in sorted(self.done.values(), key=lambda e: (e.split, e.index))]
        write_json(self.root / journal_name(self.rank, self.world),
                   {"header": self.header, "rank": self.rank, "world_size": self.world, "shards": shards},
                   "soft-label cache journal", indent=1, sort_keys=True)

    def pending(self, split: str) -> list[int]:
        """Indices of this rank's shards of `split` still to label, in order."""
        total = n_shards(self.header["data"]["splits"][split]["blocks"], self.header["shard_blocks"])
        return [j for j in range(self.rank, total, self.world) if (split, j) not in self.done]

    # -- labelling ----------------------------------------------------------------------------------------------------
    def write_split(self, split: str, blocks: TokenBlocks, logits_fn: LogitsFn,
                    on_batch: Callable[[int], None] | None = None, stop: Callable[[], bool] | None = None) -> int:
        """Label this rank's missing shards of `split`; returns the number of target tokens labelled.

        Args:
            blocks: the split's blocks, as the trainer builds them (their fingerprint must match the header).
            logits_fn: batch (TokenBlocks.batch dict) -> [B, T, V] teacher logits, V = the cache's vocab.
            on_batch: called with each batch's target-token count (progress bars).
            stop: asked after each finished shard; true ends the split there (the shard in flight is kept).
        """
        info = self.header["data"]["splits"][split]
        if len(blocks) != info["blocks"]:
            raise CacheError(f"split `{split}` has {len(blocks)} blocks but the cache header says {info['blocks']}")
        tokens = 0
        for j in self.pending(split):
            tokens += self._write_shard(split, j, blocks, logits_fn, on_batch)
            if stop is not None and stop():
                break
        return tokens

    def _write_shard(self, split: str, j: int, blocks: TokenBlocks, logits_fn: LogitsFn,
                     on_batch: Callable[[int], None] | None) -> int:
        S, bs = self.header["shard_blocks"], self.header["batch_size"]
        lo, hi = j * S, min((j + 1) * S, len(blocks))
        enc = self.enc
        generator: torch.Generator | None = None
        parts: list[dict[str, Tensor]] = []
        for start in range(lo, hi, bs):
            batch = blocks.batch(list(range(start, min(start + bs, hi))))
            mask = batch["labels"] != IGNORE
            with torch.no_grad():
                logits = logits_fn(batch)
                if logits.shape[-1] != enc["vocab"]:
                    raise CacheError(f"the teacher gives {logits.shape[-1]} logits per position; the cache's vocab is "
                                     f"{enc['vocab']} (slice the logits to the tokenizer's vocab)")
                rows = torch.log_softmax(logits[mask.to(logits.device)].float() / enc["temperature"], dim=-1)
                if enc["kind"] == "topk":
                    part = topk_rows(rows, enc["k"], enc["tail"])
                else:
                    if generator is None:
                        generator = torch.Generator(device=rows.device).manual_seed(shard_seed(enc["seed"], split, j))
                    if enc["kind"] == "topk_sampled":
                        part = topk_sampled_rows(rows, enc["k"], enc["draws"], generator)
                    else:
                        part = sampled_rows(rows, enc["draws"], generator)
                if enc.get("cross_tokenizer"):  # the actual next token and its log-prob: spans of another tokenizer
                    actual = batch["labels"].to(rows.device)[mask.to(rows.device)]
                    part.update(token_ids=actual, token_logprob=rows.gather(1, actual[:, None]).squeeze(1))
            parts.append({k: v.cpu() for k, v in part.items()})
            if on_batch is not None:
                on_batch(int(mask.sum()))
        sub = TokenBlocks(*(t[lo:hi] for t in (blocks.input_ids, blocks.labels, blocks.attention_mask)))
        tensors = self._pack(parts, sub, blocks.conversations[lo:hi] if isinstance(blocks, ChatBlocks) else None)
        # one metadata key: safetensors writes a metadata map in hash order, which differs from run to run
        about = json.dumps({"blocks": [lo, hi], "format": FORMAT, "shard": j, "split": split,
                            "version": self.header["version"]}, sort_keys=True)
        data = safetensors_save(dict(sorted(tensors.items())), metadata={"lmdistill": about})
        rel = shard_name(split, j)
        write_bytes(self.root / rel, data, "soft-label cache shard")
        rows_n = int(tensors["row_offsets"][-1])
        stored = {"topk": rows_n * enc.get("k", 0), "sampled": int(tensors["ids"].shape[0]),
                  "topk_sampled": rows_n * (enc.get("k", 0) + enc.get("draws", 0))}
        entry = ShardEntry(split=split, index=j, file=rel, blocks=(lo, hi), rows=rows_n, ids=stored[enc["kind"]],
                           bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
        self.done[(split, j)] = entry
        self._write_journal()
        log.info("rank %d of %d wrote %s (%d rows, %d bytes)", self.rank, self.world, rel, rows_n, len(data))
        return rows_n

    def _pack(self, parts: list[dict[str, Tensor]], sub: TokenBlocks,
              conversations: list[list[dict[str, str]]] | None) -> dict[str, Tensor]:
        enc = self.enc
        cat = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        out = {"block_digest": block_digests(sub.input_ids, sub.labels, sub.attention_mask),
               "row_offsets": row_offsets_of(sub.labels)}
        width = enc["id_bytes"]
        out["ids"] = pack_ids(cat["ids"], width)
        out["logprobs"] = encode_values(cat["logprobs"], enc["values"], enc.get("int8_range", 0.0))
        if enc["kind"] in ("topk", "topk_sampled"):
            if enc["tail"]:
                out["tail_logprob"] = encode_values(cat["tail_logprob"], enc["values"], enc.get("int8_range", 0.0))
            if enc["kind"] == "topk_sampled":
                out["tail_ids"] = pack_ids(cat["tail_ids"], width)
                out["tail_mean_logprob"] = encode_values(cat["tail_mean_logprob"], enc["values"],
                                                         enc.get("int8_range", 0.0))
        else:
            cdt = count_dtype(enc["draws"])
            out["n_ids"] = cat["n_ids"].to(torch.int32).to(cdt)
            out["counts"] = cat["counts"].to(torch.int32).to(cdt)
        if enc.get("cross_tokenizer"):
            # with each block's first input token, the targets' actual tokens spell the block (pretrain packing)
            out["block_first_id"] = pack_ids(sub.input_ids[:, 0], width)
            out["token_ids"] = pack_ids(cat["token_ids"], width)
            out["token_logprob"] = encode_values(cat["token_logprob"], enc["values"], enc.get("int8_range", 0.0))
            if conversations is not None:  # chat: a student renders the messages with its own template
                out.update(conversation_tensors(conversations))
        return out

    # -- merge --------------------------------------------------------------------------------------------------------
    def merge(self) -> Manifest:
        """Rank 0, after every rank finished: journals -> manifest.json (atomic); journals and temp files removed."""
        if self.rank != 0:
            raise RuntimeError("merge() runs on rank 0 after a barrier")
        entries: dict[tuple[str, int], ShardEntry] = {}
        for r in range(self.world):
            path = self.root / journal_name(r, self.world)
            if not path.is_file():
                raise CacheError(f"rank {r}'s journal `{path}` is missing; rerun `lmdistill label` with the same config")
            for raw in json.loads(path.read_text())["shards"]:
                e = ShardEntry.from_json(raw)
                entries[(e.split, e.index)] = e
        missing = []
        for split, info in self.header["data"]["splits"].items():
            missing += [f"{split}/{j}" for j in range(n_shards(info["blocks"], self.header["shard_blocks"]))
                        if (split, j) not in entries]
        if missing:
            raise CacheError(f"cache `{self.root}` lacks shards {missing[:8]} after labelling; rerun `lmdistill label` "
                             "with the same config to label them")
        manifest = Manifest(header=self.header, shards=list(entries.values()), root=self.root)
        write_json(self.root / MANIFEST, manifest.to_json(), "soft-label cache manifest", indent=1, sort_keys=True)
        for path in [*self.root.glob(JOURNAL_GLOB), *self.root.glob("**/.*.tmp")]:
            path.unlink(missing_ok=True)
        return manifest
