"""A teacher behind an OpenAI-compatible server that scores given token ids: `lmdistill serve`, or vLLM's server.

The scoring call is the legacy completions endpoint with the token ids as the prompt, `echo=true`, `max_tokens=1`,
`logprobs=k`, `temperature=0` and `return_tokens_as_token_ids=true` (a vLLM extension `lmdistill serve` also speaks):
for every position j >= 1 of a sequence the reply holds log p(seq[j] | seq[:j]) and the k most probable tokens there,
named `token_id:<id>`. vLLM: `vllm serve MODEL --max-logprobs 20` (k <= 20).

Before training the client checks that the server's tokenizer is the one whose ids it sends (the student's; across
tokenizers, the teacher's, read from teacher.name_or_path): `lmdistill serve` lists a tokenizer
fingerprint with its model; any other server is asked to tokenize a probe text (`POST /tokenize`, vLLM's endpoint) and
its ids are compared. HTTP retries (429/5xx, timeouts, dropped connections, Retry-After) are the openai client's;
when they run out during training the loop checkpoints and stops (`TeacherUnavailableError`).
"""

from __future__ import annotations

import math
from typing import Any

import httpx
import openai
import torch
from torch import Tensor

from lmdistill.config import TeacherServerConfig
from lmdistill.data import IGNORE
from lmdistill.errors import ConfigError, TeacherAPIError, TeacherUnavailableError
from lmdistill.generate.openai_api import read_api_key
from lmdistill.losses import SparseTargets
from lmdistill.losses.divergences import LOGPROB_FLOOR
from lmdistill.models import tokenizer_fingerprint

PROBE = "Teacher check: <|im_start|> 12,345 ünïcödé — 日本語 🙂\n\ttabs & spaces  end."


class ServedTeacher:
    """Scores the student's token sequences on a teacher server (see the module docstring)."""

    def __init__(self, cfg: TeacherServerConfig, tokenizer: Any, whose: str = "the student's") -> None:
        """`tokenizer`: the one whose ids are sent (`whose` names it in a mismatch): the student's, or a teacher's of
        another tokenizer (lmdistill.onpolicy_cross_tokenizer.ServedSpanTeacher)."""
        assert cfg.url is not None
        self.whose = whose
        self.url = cfg.url.rstrip("/")
        key, _ = read_api_key(cfg.api_key_env, None)
        self.client = openai.OpenAI(base_url=self.url, api_key=key or "unused", timeout=cfg.timeout_s,
                                    max_retries=cfg.max_retries)
        self.model = cfg.api_model or self._first_model()
        self._check_tokenizer(tokenizer)

    def _call(self, fn: Any, what: str) -> Any:
        try:
            return fn()
        except openai.AuthenticationError:
            raise TeacherAPIError(f"the teacher server at {self.url} refused the API key (HTTP 401); set "
                                  "teacher_server.api_key_env to the variable that holds its key") from None
        except (openai.APIConnectionError, openai.InternalServerError, openai.RateLimitError) as e:
            raise TeacherUnavailableError(f"the teacher server at {self.url} is unreachable or failing while "
                                          f"{what}, after its retries ({type(e).__name__}: {e})") from None
        except openai.APIStatusError as e:
            raise TeacherAPIError(f"the teacher server at {self.url} refused {what}: HTTP {e.status_code} "
                                  f"{e.message}") from None

    def _first_model(self) -> str:
        models = self._call(lambda: self.client.models.list().data, "listing its models")
        if not models:
            raise TeacherAPIError(f"the teacher server at {self.url} serves no model")
        return str(models[0].id)

    def _check_tokenizer(self, tokenizer: Any) -> None:
        models = self._call(lambda: self.client.models.list().data, "listing its models")
        entry = next((m for m in models if m.id == self.model), None)
        if entry is None:
            raise ConfigError(f"teacher_server.api_model `{self.model}` is not served at {self.url}; it serves "
                              f"{[m.id for m in models]}")
        theirs = getattr(entry, "tokenizer_fingerprint", None) or (entry.model_extra or {}).get("tokenizer_fingerprint")
        if theirs is not None:
            same = theirs == tokenizer_fingerprint(tokenizer)
        else:  # vLLM and others: compare how both tokenize a probe text
            root = self.url.removesuffix("/v1")
            reply = self._call(lambda: httpx.post(f"{root}/tokenize", json={"model": self.model, "prompt": PROBE,
                                                                             "add_special_tokens": False},
                                                  timeout=30.0), "tokenizing a probe text")
            if reply.status_code != 200:
                raise TeacherAPIError(f"the teacher server at {self.url} cannot tell its tokenizer (no tokenizer "
                                      f"fingerprint, POST /tokenize answered {reply.status_code}); on-policy scoring "
                                      "needs a server that shares the student's tokenizer: lmdistill serve or vLLM")
            same = reply.json().get("tokens") == tokenizer(PROBE, add_special_tokens=False)["input_ids"]
        if not same and self.whose != "the student's":
            raise ConfigError(
                f"the teacher server's tokenizer (`{self.model}` at {self.url}) is not {self.whose}, so its log-probs "
                "would score other tokens than the ones sent; set teacher.name_or_path to the served model (its "
                "tokenizer and chat template are read here)"
            )
        if not same:
            raise ConfigError(
                f"the teacher server's tokenizer (`{self.model}` at {self.url}) is not the student's, so its log-probs "
                "would score other tokens than the student wrote. Serve a teacher of the student's tokenizer family, "
                "or use the hard-label path (`lmdistill generate` + `lmdistill hard --mode sequence`)"
            )

    def _score(self, batch: dict[str, Tensor], k: int) -> list[tuple[list[int], list[float], list[dict[int, float]]]]:
        """Per row: (the sequence, log p of each token given those before it, top-k {id: log p}) from position 1."""
        seqs = []
        for ids, labels, mask in zip(batch["input_ids"].tolist(), batch["labels"].tolist(),
                                     batch["attention_mask"].tolist(), strict=True):
            n = sum(mask)
            seqs.append(ids[:n] + ([labels[n - 1]] if n and labels[n - 1] != IGNORE else []))
        return self._score_sequences(seqs, k)

    def sequence_logprobs(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """[B, T]: at position t, log p of each row's token t + 1 given its tokens up to t (0 past the row's end)."""
        return self.sequence_scores(input_ids, attention_mask, 1)[0]

    def sequence_scores(self, input_ids: Tensor, attention_mask: Tensor,
                        k: int) -> tuple[Tensor, list[list[dict[int, float]]]]:
        """`sequence_logprobs`, and per row and position t the k most probable next tokens {id: log p} there."""
        seqs = [ids[: sum(mask)] for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True)]
        rows = [r for r, seq in enumerate(seqs) if len(seq) >= 2]  # a lone token has nothing to score
        out = torch.zeros(input_ids.shape, dtype=torch.float32)
        tops: list[list[dict[int, float]]] = [[] for _ in seqs]
        for r, (seq, token_lps, top) in zip(rows, self._score_sequences([seqs[r] for r in rows], k), strict=True):
            out[r, : len(seq) - 1] = torch.tensor(token_lps[1: len(seq)], dtype=torch.float32)
            tops[r] = top[1: len(seq)]
        return out.to(input_ids.device), tops

    def _score_sequences(self, seqs: list[list[int]],
                         k: int) -> list[tuple[list[int], list[float], list[dict[int, float]]]]:
        if not seqs:
            return []
        reply = self._call(lambda: self.client.completions.create(
            model=self.model, prompt=seqs, echo=True, max_tokens=1, temperature=0.0, logprobs=k,
            extra_body={"return_tokens_as_token_ids": True}), "scoring the student's tokens")
        choices = sorted(reply.choices or [], key=lambda c: c.index)
        if len(choices) != len(seqs):
            raise TeacherUnavailableError(f"the teacher server at {self.url} answered {len(choices)} scores for "
                                          f"{len(seqs)} sequences (a malformed reply)")
        out = []
        for seq, choice in zip(seqs, choices, strict=True):
            lp = choice.logprobs
            if lp is None or lp.token_logprobs is None or lp.top_logprobs is None or len(lp.token_logprobs) < len(seq):
                raise TeacherUnavailableError(f"the teacher server at {self.url} returned no per-token log-probs for "
                                              "an echoed prompt (a malformed reply; is it lmdistill serve or vLLM?)")
            token_lps = [float(x) if x is not None else 0.0 for x in lp.token_logprobs[: len(seq)]]
            tops = [{_token_id(t): float(v) for t, v in (entry or {}).items()} for entry in lp.top_logprobs[: len(seq)]]
            out.append((seq, token_lps, tops))
        return out

    def token_logprobs(self, batch: dict[str, Tensor]) -> Tensor:
        """[B, T] the teacher's log p of each labelled token (0 elsewhere)."""
        out = torch.zeros(batch["labels"].shape, dtype=torch.float32)
        for r, (_, token_lps, _) in enumerate(self._score(batch, 1)):
            for t, y in enumerate(batch["labels"][r].tolist()):
                if y != IGNORE:
                    out[r, t] = token_lps[t + 1]
        return out.to(batch["labels"].device)

    def topk(self, batch: dict[str, Tensor], k: int) -> SparseTargets:
        """[B, T, k + 1] the teacher's top-k ids and log-probs at every labelled position, the labelled token's own
        log-prob where it is not among them, and the tail mass outside them."""
        labels = batch["labels"]
        ids = torch.full((*labels.shape, k + 1), -1, dtype=torch.long)
        lps = torch.zeros((*labels.shape, k + 1), dtype=torch.float32)
        tail = torch.full(labels.shape, LOGPROB_FLOOR, dtype=torch.float32)
        for r, (_, _, tops) in enumerate(self._score(batch, k)):
            for t, y in enumerate(labels[r].tolist()):
                if y == IGNORE:
                    continue
                entry = sorted(tops[t + 1].items(), key=lambda kv: -kv[1])[:k]
                if y not in dict(entry) and y in tops[t + 1]:
                    entry.append((y, tops[t + 1][y]))
                ids[r, t, : len(entry)] = torch.tensor([i for i, _ in entry])
                lps[r, t, : len(entry)] = torch.tensor([v for _, v in entry])
                mass = sum(math.exp(v) for _, v in entry)
                tail[r, t] = math.log(1.0 - mass) if mass < 1.0 - math.exp(LOGPROB_FLOOR) else LOGPROB_FLOOR
        device = labels.device
        return SparseTargets(ids=ids.to(device), logprobs=lps.to(device), tail_logprob=tail.to(device))


def _token_id(token: str) -> int:
    if not token.startswith("token_id:"):
        raise TeacherUnavailableError(
            f"the teacher server named a token `{token}` instead of `token_id:<id>`: it ignored "
            "return_tokens_as_token_ids. On-policy scoring needs lmdistill serve or vLLM's OpenAI server"
        )
    return int(token.removeprefix("token_id:"))
