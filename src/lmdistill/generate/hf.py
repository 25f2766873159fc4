"""Local Hugging Face teacher: batched, left-padded `generate` with sampling params and optional log-probs.

`HFGenerator` is shared by the `hf` backend of `generate` and by `lmdistill serve`.
"""

from __future__ import annotations

import copy
import re
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from transformers import LogitsProcessorList

from lmdistill.config import ModelConfig
from lmdistill.errors import ConfigError
from lmdistill.evaluate import resolve_device
from lmdistill.generate.base import Completion, Job, JobResult
from lmdistill.generate.config import SamplingConfig
from lmdistill.generate.seeded_sampling import RowSeededSampler, derive_seed, prompt_seed

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class TokenBytes:
    """The raw UTF-8 bytes of single tokens, which `decode([id])` cannot give for a token holding part of a character.

    Byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM) spells bytes as printable characters; SentencePiece byte fallback
    spells them `<0xE2>`. Anything else falls back to the token's decoded text. Concatenating the bytes of a
    completion's tokens gives the completion's UTF-8 text exactly (what OpenAI's `bytes` field promises).
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.byte_level = False
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            import json

            decoder = json.loads(backend.to_str()).get("decoder") or {}
            parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
            self.byte_level = any(d.get("type") == "ByteLevel" for d in parts if isinstance(d, dict))
        self._unicode_to_byte = {c: b for b, c in _bytes_to_unicode().items()}

    def __call__(self, token_id: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(int(token_id))
        if isinstance(piece, str):
            fallback = _BYTE_FALLBACK.match(piece)
            if fallback:
                return bytes([int(fallback.group(1), 16)])
            if self.byte_level and all(c in self._unicode_to_byte for c in piece):
                return bytes(self._unicode_to_byte[c] for c in piece)
        return self.tokenizer.decode([int(token_id)]).encode()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters (byte-level BPE's alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


class HFGenerator:
    """Wraps a causal LM and its tokenizer for batched sampling. Not thread-safe: callers serialise (serve holds a lock).

    Args:
        model: a causal LM (eval mode, on `device`).
        tokenizer: its tokenizer; padding is switched to the left so every row's last prompt token is aligned.
        name: the model's name for provenance.
    """

    def __init__(self, model: Any, tokenizer: Any, name: str = "model") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.name = name
        self.device = next(model.parameters()).device
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.token_bytes = TokenBytes(tokenizer)

    @classmethod
    def load(cls, cfg: ModelConfig, device: str = "auto") -> HFGenerator:
        """Load teacher and tokenizer through `lmdistill.models` (hub id, local directory or `embedded:...`)."""
        from lmdistill.models import load_teacher, load_tokenizer

        tokenizer = load_tokenizer(cfg.name_or_path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
        model = load_teacher(cfg).to(resolve_device(device))
        return cls(model, tokenizer, name=cfg.name_or_path)

    def render(self, messages: list[dict[str, str]]) -> str:
        """A conversation as prompt text through the tokenizer's chat template, ending with the assistant header."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError(
                f"the tokenizer of `{self.name}` has no chat template, so chat prompts cannot be rendered; use a chat "
                "model, or teacher.api=completions (generate) / the /v1/completions endpoint with raw prompt text"
            )
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    @torch.no_grad()
    def generate(
        self,
        texts: Sequence[str],
        *,
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 64,
        stop: Sequence[str] = (),
        top_logprobs: int | None = None,
        add_special_tokens: bool = False,
        row_seeds: Sequence[int | None] | None = None,
    ) -> list[list[Completion]]:
        """Sample `n` completions for each prompt text.

        Args:
            texts: prompt strings (chat prompts already rendered with `render`).
            temperature: 0 means greedy.
            stop: strings that end a completion; the text is cut before the first one.
            top_logprobs: None: no log-probs; k >= 0: per-token log-probs plus the k most likely alternatives. They are
                log-softmax of the raw logits (temperature 1, before top-p), the model's own distribution.
            add_special_tokens: True for raw text (adds BOS where the tokenizer does); chat templates already do.
            row_seeds: one seed per completion (`len(texts) * n`, text-major; None: unseeded): each row
                samples from its own stream, so a seeded completion is the same whatever else is in the batch (what
                `serve` needs to batch requests, and what makes `generate` independent of its batch size). Rows
                run through `RowSeededSampler`, with the same temperature/top-p semantics.

        Returns:
            One list of `n` completions per text, in order.
        """
        if row_seeds is not None and len(row_seeds) != len(texts) * n:
            raise ValueError(f"row_seeds has {len(row_seeds)} entries for {len(texts)} texts x n={n}")
        if temperature == 0 and n > 1:
            # Greedy decoding gives one answer; HF refuses num_return_sequences > 1 without sampling, APIs repeat it.
            once = self.generate(texts, n=1, temperature=0, max_new_tokens=max_new_tokens, stop=stop,
                                 top_logprobs=top_logprobs, add_special_tokens=add_special_tokens)
            return [[copy.deepcopy(group[0]) for _ in range(n)] for group in once]
        tok = self.tokenizer
        per_row = temperature > 0 and row_seeds is not None and any(s is not None for s in row_seeds)
        # per-row sampling runs generate's greedy step, which takes no num_return_sequences: repeat the prompts
        rows = [t for t in texts for _ in range(n)] if per_row else list(texts)
        enc = tok(rows, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens).to(self.device)
        config = copy.deepcopy(self.model.generation_config)
        config.max_new_tokens = max_new_tokens
        config.num_return_sequences = 1 if per_row else n
        config.pad_token_id = tok.pad_token_id
        config.return_dict_in_generate = True
        config.output_logits = top_logprobs is not None
        config.do_sample = temperature > 0 and not per_row
        if config.do_sample:
            config.temperature, config.top_p, config.top_k = temperature, top_p, 0
        else:
            config.temperature, config.top_p, config.top_k = None, None, None
        kwargs: dict[str, Any] = {}
        if per_row:
            assert row_seeds is not None
            sampler = RowSeededSampler(temperature, top_p, row_seeds, self.device)
            kwargs["logits_processor"] = LogitsProcessorList([sampler])
        if stop:
            config.stop_strings = list(stop)
            kwargs["tokenizer"] = tok
        out = self.model.generate(**enc, generation_config=config, **kwargs)
        prompt_len = enc["input_ids"].shape[1]
        new_tokens = out.sequences[:, prompt_len:].tolist()
        prompt_counts = enc["attention_mask"].sum(dim=1).tolist()
        results: list[list[Completion]] = [[] for _ in texts]
        for row, ids in enumerate(new_tokens):
            completion = self._finish(ids, row, out, max_new_tokens, stop, top_logprobs)
            completion.prompt_tokens = int(prompt_counts[row if per_row else row // n])
            results[row // n].append(completion)
        return results

    def _finish(
        self, ids: list[int], row: int, out: Any, max_new_tokens: int, stop: Sequence[str], top_logprobs: int | None
    ) -> Completion:
        tok = self.tokenizer
        eos_at = next((i for i, t in enumerate(ids) if t in self.eos_ids), None)
        if eos_at is not None:
            text_ids, count, reason = ids[:eos_at], eos_at + 1, "stop"
        else:
            # A row that met a stop string early is padded while the others go on.
            end = len(ids)
            while end > 0 and ids[end - 1] == tok.pad_token_id:
                end -= 1
            text_ids, count = ids[:end], end
            reason = "length" if end >= max_new_tokens else "stop"
        text = tok.decode(text_ids, skip_special_tokens=True)
        cuts = [text.index(s) for s in stop if s and s in text]
        if cuts:
            cut = min(cuts)
            text, reason = text[:cut], "stop"
            text_ids = text_ids[: self._tokens_within(text_ids, cut)]
        logprobs = None
        if top_logprobs is not None:
            logprobs = self._logprobs(out.logits, row, text_ids, top_logprobs)
        return Completion(text=text, finish_reason=reason, completion_tokens=count, logprobs=logprobs)

    def _tokens_within(self, ids: list[int], n_chars: int) -> int:
        """Largest j with len(decode(ids[:j])) <= n_chars (binary search: decoded length grows with j)."""
        lo, hi = 0, len(ids)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(self.tokenizer.decode(ids[:mid], skip_special_tokens=True)) <= n_chars:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _logprobs(self, logits: tuple[torch.Tensor, ...], row: int, ids: list[int], k: int) -> list[dict[str, Any]]:
        if not ids:
            return []
        steps = torch.stack([logits[j][row] for j in range(len(ids))]).float()  # [L, V]
        logp = torch.log_softmax(steps, dim=-1)
        chosen = logp.gather(1, torch.tensor(ids, device=logp.device)[:, None])[:, 0].tolist()
        # Embedding matrices are often padded past the tokenizer; those rows are never real tokens.
        vocab = min(len(self.tokenizer), logp.shape[-1])
        top_vals, top_ids = logp[:, :vocab].topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())
        strings = self.tokenizer.batch_decode([[i] for i in ids])
        top_strings = self.tokenizer.batch_decode([[i] for i in top_ids.flatten().tolist()]) if k else []
        entries = []
        for j, token_id in enumerate(ids):
            alts: list[dict[str, Any]] = []
            if k:
                alt_ids = top_ids[j].tolist()
                alt_vals = top_vals[j].tolist()
                alts = [
                    {"token": top_strings[j * k + a], "id": alt_ids[a], "logprob": alt_vals[a],
                     "bytes": list(self.token_bytes(alt_ids[a]))} for a in range(k)
                ]
            entries.append({"token": strings[j], "id": token_id, "logprob": chosen[j], "top_logprobs": alts,
                            "bytes": list(self.token_bytes(token_id))})
        return entries


class HFBackend:
    """`generate` backend over a local model: jobs in batches of `batch_size` prompts, `n` samples each."""

    def __init__(self, generator: HFGenerator, batch_size: int, api: str = "chat", revision: str | None = None) -> None:
        self.generator = generator
        self.batch_size = batch_size
        self.api = api
        self.revision = revision

    @classmethod
    def from_config(cls, cfg: Any) -> HFBackend:
        """From a `TeacherBackendConfig`."""
        return cls(HFGenerator.load(cfg.model, cfg.device), cfg.batch_size, cfg.api, cfg.model.revision)

    def teacher_info(self) -> dict[str, Any]:
        return {"backend": "hf", "model": self.generator.name, "revision": self.revision}

    def generate(self, jobs: Sequence[Job], sampling: SamplingConfig) -> Iterator[JobResult]:
        # Batch only jobs that miss the same number of samples (all of them on a fresh run), so none over-generates.
        groups: dict[int, list[Job]] = {}
        for job in jobs:
            groups.setdefault(len(job.samples), []).append(job)
        for n, group in groups.items():
            for start in range(0, len(group), self.batch_size):
                batch = group[start : start + self.batch_size]
                if self.api == "chat":
                    texts = [self.generator.render(job.prompt.messages or []) for job in batch]
                else:
                    texts = [job.prompt.text or "" for job in batch]
                t0 = time.perf_counter()
                # a completion's randomness is a function of (seed, prompt id, sample index) only: the same file
                # comes out at any batch size, and a resumed run draws what the interrupted one would have
                seeds = None if sampling.seed is None else [
                    derive_seed(prompt_seed(sampling.seed, job.prompt.id), i) for job in batch for i in job.samples]
                outputs = self.generator.generate(
                    texts,
                    n=n,
                    temperature=sampling.temperature,
                    top_p=sampling.top_p,
                    max_new_tokens=sampling.max_new_tokens,
                    stop=sampling.stop,
                    top_logprobs=sampling.top_logprobs if sampling.logprobs else None,
                    add_special_tokens=self.api == "completions",
                    row_seeds=seeds,
                )
                share = (time.perf_counter() - t0) / len(batch)
                for job, completions in zip(batch, outputs, strict=True):
                    yield JobResult(job=job, completions=completions, seconds=share)

    def close(self) -> None:
        pass
