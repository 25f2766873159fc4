"""Chat across tokenizers (each model's own chat template, aligned on the content) and `onpolicy` with a teacher of
another tokenizer: a byte-level BPE student with a ChatML template, a SentencePiece-style teacher with a Gemma-like
`<start_of_turn>` template, both trained in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import _pretrain, make_model
from lmdistill.align import align_batch
from lmdistill.chat_align import ChatAligner, render
from lmdistill.config import DataConfig, OnPolicyConfig, load_config
from lmdistill.cross_tokenizer_teacher import CrossTokenizerTeacher
from lmdistill.data import IGNORE, chat_blocks
from lmdistill.errors import ConfigError
from lmdistill.onpolicy_cross_tokenizer import CrossTokenizerOnPolicy, span_advantages, span_policy_gradient
from lmdistill.recipes.onpolicy import run_onpolicy
from lmdistill.rollout import Rollout, as_batch, prompt_ids, tag_completions
from lmdistill.token_bytes import token_bytes
from test_cross_tokenizer import train_spiece_tokenizer
from test_onpolicy import onpolicy_args

GEMMA_LIKE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "Tell me about the cat."},
     {"role": "assistant", "content": "The cat sees the ball in winter. Héllo 😀 wörld."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "A dog likes the bright moon."},
     {"role": "user", "content": "More?"}, {"role": "assistant", "content": "The river finds a green tree at night."}],
]


def gemma_like_tokenizer(out_dir: Path | None):
    tok = train_spiece_tokenizer(None)
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tok.chat_template = GEMMA_LIKE
    if out_dir is not None:
        tok.save_pretrained(out_dir)
    return tok


@pytest.fixture(scope="module")
def teacher_tok():
    return gemma_like_tokenizer(None)


@pytest.fixture(scope="module")
def gemma_teacher_dir(tmp_path_factory):
    """A SentencePiece-style teacher, briefly trained on the synthetic language (its distributions carry knowledge)."""
    d = tmp_path_factory.mktemp("gemma-like-teacher")
    tok = gemma_like_tokenizer(d)
    model = make_model(d, tok, hidden=64, layers=2, seed=5)
    _pretrain(model, tok, steps=60)
    model.save_pretrained(d)
    return d


def _blocks(tokenizer, block_size: int = 200):
    cfg = DataConfig(source="x", stage="chat", block_size=block_size, prompt_column=None, completion_column=None)
    return chat_blocks([{"messages": m} for m in CONVERSATIONS], cfg, tokenizer)


def _spelled(table, ids) -> bytes:
    return b"".join(table[i] or b"" for i in ids)


# --------------------------------------------------------------------------------------- part A: each its template


def test_the_teacher_reads_its_own_template_and_every_response_token_is_aligned(tokenizer, teacher_tok):
    blocks = _blocks(tokenizer)
    chat = ChatAligner(tokenizer, teacher_tok, [blocks])
    batch = blocks.batch([0, 1])
    ab = align_batch(batch, tokenizer, teacher_tok, chat)
    s_table, t_table = token_bytes(tokenizer), token_bytes(teacher_tok)
    end = teacher_tok.convert_tokens_to_ids("<end_of_turn>")
    for b, messages in enumerate(CONVERSATIONS):
        t_ids = ab.teacher_input_ids[b][ab.teacher_attention_mask[b].bool()].tolist()
        own = render(teacher_tok, messages, False)
        assert t_ids == own[: len(t_ids)] and t_ids.count(end) == len(messages)  # its template, up to the last reply
        assert "<|im_start|>" not in teacher_tok.decode(t_ids)
        seq = batch["input_ids"][b].tolist() + [int(batch["labels"][b, -1])]
        spans = {}  # student index -> teacher indices of its span, over the compared spans of this row
        for k in (ab.span_batch == b).nonzero().squeeze(-1).tolist():
            s0, t0 = int(ab.student_pos[k]) + 1, int(ab.teacher_pos[k]) + 1
            s_idx = [s0] + [i + 1 for i in (ab.student_rest_span[b] == k).nonzero().squeeze(-1).tolist()]
            t_idx = [t0] + [j + 1 for j in (ab.teacher_rest_span[b] == k).nonzero().squeeze(-1).tolist()]
            assert _spelled(s_table, [seq[i] for i in s_idx]) == _spelled(t_table, [t_ids[j] for j in t_idx])
            for i in s_idx:
                spans[i] = t_idx
        # every student target token of each response's text, and the token ending the turn, is in a compared span
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = len(render(tokenizer, messages[:i], True))
            stop = len(render(tokenizer, messages[: i + 1], False))
            t_start = len(render(teacher_tok, messages[:i], True))
            content = list(range(start, stop - 2))  # ChatML: content <|im_end|> \n
            assert _spelled(s_table, [seq[j] for j in content]) == m["content"].encode()
            for j in content + [stop - 2]:
                assert j in spans, (i, j)
                assert all(t_start <= t < len(t_ids) for t in spans[j])
            assert [t_ids[t] for t in spans[stop - 2]] == [end]  # <|im_end|> <-> <end_of_turn>: the turn ends
            assert int(batch["labels"][b, stop - 3]) == seq[stop - 2]


def test_a_completion_is_scored_after_the_teachers_own_prompt(tokenizer, teacher_tok):
    """A rollout row: the teacher reads its template's prompt, the completion's bytes in its tokens, its end of turn."""
    blocks = _blocks(tokenizer)
    chat = ChatAligner(tokenizer, teacher_tok, [blocks])
    batch = blocks.batch([0, 1])
    prompts = prompt_ids(batch)
    text = " the dog finds é 😀 ok."
    completion = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    r = Rollout(prompts, [completion, completion[:5]], 1, 0, batch["index"].tolist())
    rows = as_batch(r, 200, tokenizer.pad_token_id)
    tag_completions(rows, r, batch)
    ab = align_batch(rows, tokenizer, teacher_tok, chat)
    end = teacher_tok.convert_tokens_to_ids("<end_of_turn>")
    for b, messages in enumerate(CONVERSATIONS):
        t_ids = ab.teacher_input_ids[b][ab.teacher_attention_mask[b].bool()].tolist()
        prompt = render(teacher_tok, messages[:1], True)
        body = _spelled(token_bytes(tokenizer), completion if b == 0 else completion[:5])
        assert t_ids[: len(prompt)] == prompt
        assert _spelled(token_bytes(teacher_tok), t_ids[len(prompt):]) == body
        assert (t_ids[-1] == end) == (b == 0)  # only the finished completion ends its turn
    s_in_spans = int(ab.counts["one_to_one"] + ab.counts["merged"])
    assert s_in_spans == int((rows["labels"] != IGNORE).sum()) - ab.counts["skipped"]
    assert ab.counts["skipped"] <= 2  # at most the token cut inside a character at the end of the short one


def test_a_conversation_the_teachers_template_refuses_is_read_as_before(tokenizer, caplog):
    """A template that raises (here: on a system message) costs that conversation its own rendering, not the run."""
    strict = gemma_like_tokenizer(None)
    strict.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}"
                            "{% endif %}" + GEMMA_LIKE)
    messages = [{"role": "system", "content": "Be brief."}, *CONVERSATIONS[0]]
    cfg = DataConfig(source="x", stage="chat", block_size=200, prompt_column=None, completion_column=None)
    blocks = chat_blocks([{"messages": messages}, {"messages": CONVERSATIONS[1]}], cfg, tokenizer)
    chat = ChatAligner(tokenizer, strict, [blocks])
    with caplog.at_level("WARNING", logger="lmdistill.chat_align"):
        ab = align_batch(blocks.batch([0, 1]), tokenizer, strict, chat)
    assert "no system role" in caplog.text and caplog.text.count("cannot render") == 1
    start = strict.convert_tokens_to_ids("<start_of_turn>")
    assert not bool((ab.teacher_input_ids[0] == start).any()) and bool((ab.teacher_input_ids[1] == start).any())
    assert ab.n_spans > 0


# ------------------------------------------------------------------------------------------- part B: onpolicy


def test_span_advantages_discount_over_the_spans_of_one_completion():
    rewards, rows = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0, 0, 1, 1])
    assert span_advantages(rewards, rows, 0.5).tolist() == [2.0, 2.0, 5.0, 4.0]
    assert span_advantages(rewards, rows, 0.0).tolist() == rewards.tolist()


def _canonical_rollout(tokenizer, blocks, rows: list[int]):
    """Completions tokenized canonically (as a re-tokenizer would) and ended by EOS, as training rows."""
    batch = blocks.batch(rows)
    replies = [tokenizer(m[1]["content"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
               for m in (CONVERSATIONS[i] for i in rows)]
    r = Rollout(prompt_ids(batch), replies, 0, 0, batch["index"].tolist())
    out = as_batch(r, 200, tokenizer.pad_token_id)
    tag_completions(out, r, batch)
    return out


def _config(teacher_dir, student_dir, tmp_path, **extra) -> OnPolicyConfig:
    return load_config(OnPolicyConfig, None, onpolicy_args(teacher_dir, student_dir, tmp_path / "c.jsonl",
                                                           tmp_path / "out", **extra))


def test_with_identical_tokenizers_the_span_losses_are_the_same_tokenizer_ones(teacher_dir, student_dir, tokenizer,
                                                                              tmp_path):
    """The cross-tokenizer path forced on one tokenizer: every sampled token is a 1:1 span, the prompt is masked, so
    the dense hybrid loss (reverse KL) and the per-span policy gradient equal the same-tokenizer ones, with gradients."""
    from transformers import AutoModelForCausalLM

    from lmdistill.losses import Hidden, distill_loss, reverse_kl_policy_gradient, token_logprobs
    from lmdistill.losses.chunked_ce import chunked_token_logprobs
    from lmdistill.models import lm_head
    from lmdistill.teachers import HFTeacher, model_outputs

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    blocks = _blocks(tokenizer)
    ct = CrossTokenizerTeacher(teacher, tokenizer, tokenizer, mode="hybrid", chat=[blocks])
    rows = _canonical_rollout(tokenizer, blocks, [0, 1])
    for signal in ("dense", "sampled_token"):
        cfg = _config(teacher_dir, student_dir, tmp_path, signal=signal, **{"loss.cross_tokenizer": "hybrid"})
        cross = CrossTokenizerOnPolicy(ct, cfg, len(tokenizer))
        batch = {**rows, **cross.score(rows)}
        student.zero_grad()
        got = cross.loss(student, batch, 1.0)
        got.loss_sum.backward()
        got_grads = [p.grad.clone() for p in student.parameters()]
        student.zero_grad()
        out = model_outputs(student, rows, len(tokenizer), True)
        t = HFTeacher(teacher, len(tokenizer)).targets(rows)
        if signal == "dense":
            want = distill_loss(out, Hidden(t.hidden, lm_head(teacher, len(tokenizer))), rows["labels"], 1.0,
                                cfg.loss)
            assert got.parts["aligned_one_to_one"] == int((rows["labels"] != IGNORE).sum())
            assert got.parts["aligned_merged"] == 0 and got.parts["aligned_skipped"] == 0
        else:
            want = reverse_kl_policy_gradient(token_logprobs(out, rows["labels"]),
                                              chunked_token_logprobs(t.hidden, t.head, rows["labels"]), rows["labels"])
            torch.testing.assert_close(got.parts["reverse_kl"], want.parts["reverse_kl"], rtol=1e-5, atol=1e-5)
        want.loss_sum.backward()
        torch.testing.assert_close(got.loss_sum, want.loss_sum, rtol=1e-5, atol=1e-6)
        for a, p in zip(got_grads, student.parameters(), strict=True):
            torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)


def test_sampled_token_span_rewards_match_a_float64_reference(gemma_teacher_dir, student_dir, tokenizer, tmp_path):
    """Per-span rewards log p_T(span bytes) - log p_S(span bytes), each side's own tokens, with spans found here by
    walking the bytes: every student token of a span gets the span's reward as its advantage (its gradient is -r)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmdistill.losses import token_logprobs
    from lmdistill.teachers import model_outputs

    t_tok = AutoTokenizer.from_pretrained(gemma_teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(gemma_teacher_dir).eval()
    student = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    blocks = _blocks(tokenizer)
    ct = CrossTokenizerTeacher(teacher, t_tok, tokenizer, mode="hybrid", chat=[blocks])
    cfg = _config(gemma_teacher_dir, student_dir, tmp_path, signal="sampled_token",
                  **{"loss.cross_tokenizer": "hybrid"})
    rows = _canonical_rollout(tokenizer, blocks, [0])
    scored = CrossTokenizerOnPolicy(ct, cfg, len(tokenizer)).score(rows)
    logp = token_logprobs(model_outputs(student, rows, len(tokenizer), True), rows["labels"]).detach()
    logp.requires_grad_()
    step = span_policy_gradient(logp, rows["labels"], scored["span_index"], scored["span_row"],
                                scored["span_teacher_logprob"])
    step.loss_sum.backward()

    # the reference, in float64: both models on their own renderings, spans by common byte ends
    messages = CONVERSATIONS[0]
    reply = messages[1]["content"]
    s_prompt = render(tokenizer, messages[:1], True)
    s_reply = tokenizer(reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    t_prompt = render(t_tok, messages[:1], True)
    t_reply = t_tok(reply, add_special_tokens=False)["input_ids"] + [t_tok.convert_tokens_to_ids("<end_of_turn>")]

    @torch.no_grad()
    def reply_logprobs(model, prompt, reply_ids):
        ids = torch.tensor([prompt + reply_ids])
        lp = torch.log_softmax(model.double()(input_ids=ids).logits[0].double(), -1)
        return [float(lp[len(prompt) - 1 + k, y]) for k, y in enumerate(reply_ids)]

    s_lp, t_lp = reply_logprobs(student, s_prompt, s_reply), reply_logprobs(teacher, t_prompt, t_reply)

    def ends(tok, ids):
        table, pos, out = token_bytes(tok), 0, []
        for i in ids:
            pos += len(table[i]) if table[i] is not None else 1  # the end of turn: one byte both sides share
            out.append(pos)
        return out

    s_ends, t_ends = ends(tokenizer, s_reply), ends(t_tok, t_reply)
    common = sorted(set(s_ends) & set(t_ends))
    rewards, per_token, lo = [], [], 0
    for e in common:
        s_in = [k for k, x in enumerate(s_ends) if lo < x <= e]
        t_in = [k for k, x in enumerate(t_ends) if lo < x <= e]
        r = sum(t_lp[k] for k in t_in) - sum(s_lp[k] for k in s_in)
        rewards.append(r)
        per_token += [r] * len(s_in)
        lo = e
    assert len(per_token) == len(s_reply) and len(rewards) < len(s_reply)  # merged spans are in the example
    grad = -logp.grad[0][rows["labels"][0] != IGNORE]
    torch.testing.assert_close(grad.double(), torch.tensor(per_token, dtype=torch.float64), rtol=1e-4, atol=1e-4)
    assert float(step.parts["reverse_kl"]) == pytest.approx(-sum(rewards), abs=1e-3)


def test_onpolicy_dense_across_tokenizers_beats_its_sft_twin(gemma_teacher_dir, student_dir, chat_file, tmp_path):
    """A SentencePiece-style teacher with a Gemma-like template teaches a byte-level ChatML student on its own samples:
    the held-out on-policy span divergence ends below the SFT twin's (lmbda 0, alpha 0: CE on the data's responses,
    same init, steps, seed, evaluated the same way), and below where it started."""
    common = {"loss.cross_tokenizer": "hybrid", "train.max_steps": "10", "train.eval_every": "10",
              "train.eval_batches": "2", "rollout.max_new_tokens": "16"}
    dense = run_onpolicy(load_config(OnPolicyConfig, None, onpolicy_args(
        gemma_teacher_dir, student_dir, chat_file, tmp_path / "dense", **common)))
    twin = run_onpolicy(load_config(OnPolicyConfig, None, onpolicy_args(
        gemma_teacher_dir, student_dir, chat_file, tmp_path / "sft", lmbda="0", **{"loss.alpha": "0"}, **common)))
    first, last, sft = dense["eval_first"], dense["eval_last"], twin["eval_last"]
    print("onpolicy span kd: first", first["onpolicy_span_kd"], "dense", last["onpolicy_span_kd"], "sft",
          sft["onpolicy_span_kd"], "aligned", last["onpolicy_aligned"])
    # the untrained student samples special tokens mid-answer, after which its text is not compared (measured: 0.79)
    assert last["onpolicy_aligned"] > 0.7 and last["aligned_one_to_one"] + last["aligned_merged"] > 0.8
    assert last["onpolicy_span_kd"] < first["onpolicy_span_kd"]
    assert last["onpolicy_span_kd"] < sft["onpolicy_span_kd"], (last, sft)
    assert dense["rollouts"]["completions"] == 10 * 4 * 2


def test_onpolicy_sampled_token_across_tokenizers_runs(gemma_teacher_dir, student_dir, chat_file, tmp_path):
    summary = run_onpolicy(load_config(OnPolicyConfig, None, onpolicy_args(
        gemma_teacher_dir, student_dir, chat_file, tmp_path, signal="sampled_token",
        **{"loss.cross_tokenizer": "uld", "train.max_steps": "2", "rollout.reuse": "2", "train.eval_every": "2",
           "train.eval_batches": "1", "rollout.max_new_tokens": "12"})))
    from lmdistill.train.logging import read_log

    rows = [r for r in read_log(Path(summary["log"])) if "loss" in r]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert all(r["aligned_one_to_one"] + r["aligned_merged"] > 0.5 for r in rows)
    last = summary["eval_last"]
    assert all(torch.isfinite(torch.tensor(last[k])) for k in ("onpolicy_reverse_kl", "teacher_nll_greedy"))
    assert last["answer_length"] > 0 and last["teacher_nll_greedy"] > 0


def test_what_cannot_cross_tokenizers_is_refused_with_the_fix(teacher_dir, student_dir, chat_file, tmp_path):
    cross = {"loss.cross_tokenizer": "hybrid"}
    with pytest.raises(ConfigError, match="reads a teacher server's top-k.*--signal dense"):
        _config(teacher_dir, student_dir, tmp_path, signal="topk", **cross)
    with pytest.raises(ConfigError, match="--signal sampled_token or --signal topk with teacher_server.url"):
        _config(teacher_dir, student_dir, tmp_path, signal="dense", **cross,
                **{"teacher_server.url": "http://127.0.0.1:9/v1"})
    for signal in ("sampled_token", "topk"):
        assert _config(teacher_dir, student_dir, tmp_path, signal=signal, **cross,
                       **{"teacher_server.url": "http://127.0.0.1:9/v1"}).teacher_server.url
    with pytest.raises(ConfigError, match="lmdistill generate"):
        _config(teacher_dir, student_dir, tmp_path, seq_kd="true", lmbda="0.5", **cross)
    assert json.dumps(_config(teacher_dir, student_dir, tmp_path, **cross).loss.cross_tokenizer) == '"hybrid"'


def test_soft_on_chat_data_reads_the_teachers_own_template(gemma_teacher_dir, student_dir, chat_file, tmp_path,
                                                           monkeypatch):
    """The same mechanism in `soft`: on chat data the local teacher of another tokenizer reads its own rendering."""
    from lmdistill.config import SoftConfig
    from lmdistill.recipes.soft import run_soft

    seen: list[torch.Tensor] = []
    scores = CrossTokenizerTeacher.scores

    def spy(self, batch, dense=True):
        out = scores(self, batch, dense)
        seen.append(out[0].teacher_input_ids)
        return out

    monkeypatch.setattr(CrossTokenizerTeacher, "scores", spy)
    args = onpolicy_args(gemma_teacher_dir, student_dir, chat_file, tmp_path, **{
        "loss.cross_tokenizer": "hybrid", "train.max_steps": "3", "train.eval_every": "3", "train.eval_batches": "1"})
    soft_args = [a for i, a in enumerate(args) if not (a.startswith("--rollout") or args[i - 1].startswith("--rollout"))]
    summary = run_soft(load_config(SoftConfig, None, soft_args))
    t_tok = gemma_like_tokenizer(None)
    start = t_tok.convert_tokens_to_ids("<start_of_turn>")
    assert seen and all(bool((ids == start).any(-1).all()) for ids in seen)
    last = summary["eval_last"]
    # not in a span: the `\n` ChatML puts after <|im_end|> (a label) and the word the block cuts (measured: 0.90)
    assert last["aligned_one_to_one"] + last["aligned_merged"] > 0.85, last


# ------------------------------------------------------------------- a teacher server of another tokenizer


@pytest.fixture(scope="module")
def served_gemma(gemma_teacher_dir):
    from test_onpolicy import Serve

    server = Serve(gemma_teacher_dir)
    yield server
    server.stop()


def test_a_served_teacher_of_another_tokenizer_gives_the_local_span_scores(served_gemma, gemma_teacher_dir, tokenizer):
    """The alignment is made here with the teacher's tokenizer and template; the server's log-probs of the teacher's
    tokens give the same span scores as the local teacher's forward."""
    from transformers import AutoModelForCausalLM

    from lmdistill.config import TeacherServerConfig
    from lmdistill.onpolicy_cross_tokenizer import ServedSpanTeacher
    from lmdistill.served_teacher import ServedTeacher

    t_tok = gemma_like_tokenizer(None)
    blocks = _blocks(tokenizer)
    local = CrossTokenizerTeacher(AutoModelForCausalLM.from_pretrained(gemma_teacher_dir).eval(), t_tok, tokenizer,
                                  mode="hybrid", chat=[blocks])
    served = ServedSpanTeacher(ServedTeacher(TeacherServerConfig(url=served_gemma.url), t_tok, "the teacher's"), t_tok,
                               tokenizer, [blocks], len(tokenizer))
    rows = _canonical_rollout(tokenizer, blocks, [0, 1])
    ab, none, got = served.scores(rows)
    want_ab, _, want = local.scores(rows, dense=False)
    assert none is None and ab.n_spans > 10 and ab.counts["merged"] > 0
    for name in ("teacher_input_ids", "span_batch", "student_pos", "teacher_pos", "teacher_rest"):
        assert torch.equal(getattr(ab, name), getattr(want_ab, name)), name
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="not whole distributions"):
        served.scores(rows, dense=True)
    with pytest.raises(ConfigError, match="is not the student's"):  # the student's tokenizer sent to this server
        ServedTeacher(TeacherServerConfig(url=served_gemma.url), tokenizer)


def test_onpolicy_sampled_token_from_a_served_teacher_of_another_tokenizer(served_gemma, gemma_teacher_dir,
                                                                            student_dir, chat_file, tmp_path):
    """teacher.name_or_path gives the tokenizer and template (no weights are loaded); the server scores. A
    teacher.name_or_path whose tokenizer is not the server's is refused by name."""
    from lmdistill.recipes import common
    from lmdistill.train.logging import read_log

    def no_weights(*_: object, **__: object) -> None:
        raise AssertionError("a served teacher's weights must not be loaded")

    common_args = {"loss.cross_tokenizer": "hybrid", "teacher_server.url": served_gemma.url, "train.max_steps": "2",
                   "train.eval_every": "2", "train.eval_batches": "1", "rollout.max_new_tokens": "12"}
    real_load = common.load_teacher
    common.load_teacher = no_weights
    try:
        summary = run_onpolicy(load_config(OnPolicyConfig, None, onpolicy_args(
            gemma_teacher_dir, student_dir, chat_file, tmp_path / "run", signal="sampled_token", **common_args)))
        other = train_spiece_tokenizer(None)  # the teacher's vocabulary without its two turn markers
        other.chat_template = GEMMA_LIKE
        other.save_pretrained(tmp_path / "other")
        with pytest.raises(ConfigError, match=r"is not `.*other`'s.*set teacher.name_or_path to the served model"):
            run_onpolicy(load_config(OnPolicyConfig, None, onpolicy_args(
                tmp_path / "other", student_dir, chat_file, tmp_path / "wrong", signal="sampled_token",
                **common_args)))
    finally:
        common.load_teacher = real_load
    rows = [r for r in read_log(Path(summary["log"])) if "loss" in r]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert all(r["aligned_one_to_one"] + r["aligned_merged"] > 0.5 for r in rows)
    last = summary["eval_last"]
    assert "onpolicy_span_kd" not in last and "span_kd" not in last  # no distributions from a server
    assert all(torch.isfinite(torch.tensor(last[k])) for k in ("onpolicy_reverse_kl", "teacher_nll_greedy"))


def test_the_servers_topk_span_targets_are_the_local_teachers(served_gemma, gemma_teacher_dir, tokenizer):
    """signal=topk from a server of another tokenizer: the span targets built from the server's log-probs and top-k
    equal those built from the local teacher's logits, and follow the sparse span targets' rules."""
    from transformers import AutoModelForCausalLM

    from lmdistill.config import SoftLossConfig, TeacherServerConfig
    from lmdistill.onpolicy_cross_tokenizer import ServedSpanTeacher, span_topk_targets
    from lmdistill.served_teacher import ServedTeacher

    t_tok, k = gemma_like_tokenizer(None), 20
    loss = SoftLossConfig(cross_tokenizer="hybrid")
    blocks = _blocks(tokenizer)
    served = ServedSpanTeacher(ServedTeacher(TeacherServerConfig(url=served_gemma.url), t_tok, "the teacher's"), t_tok,
                               tokenizer, [blocks], len(tokenizer))
    rows = _canonical_rollout(tokenizer, blocks, [0, 1])
    got = served.topk(rows, k, loss)
    # the same construction from the local teacher's own logits
    ab = align_batch(rows, tokenizer, t_tok, served.chat)
    model = AutoModelForCausalLM.from_pretrained(gemma_teacher_dir).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ab.teacher_input_ids,
                                       attention_mask=ab.teacher_attention_mask).logits.float(), -1)
    nxt = ab.teacher_input_ids[:, 1:]
    lp = torch.zeros(ab.teacher_input_ids.shape)
    lp[:, :-1] = logp[:, :-1].gather(-1, nxt[..., None]).squeeze(-1) * ab.teacher_attention_mask[:, 1:]
    top_v, top_i = logp.topk(k, dim=-1)
    tops = [[dict(zip(top_i[b, t].tolist(), top_v[b, t].tolist(), strict=True)) for t in range(logp.shape[1])]
            for b in range(logp.shape[0])]
    want = span_topk_targets(ab, lp, tops, served.t2s, loss)
    assert got.n_spans == want.n_spans > 10
    for name in ("span_batch", "span_pos", "first", "rest_labels", "rest_span"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    torch.testing.assert_close(got.span_t, want.span_t, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.other_t, want.other_t, rtol=1e-4, atol=1e-5)
    # the server's top-k may also list the scored token (outside the top k): compare the entries both have
    compared = 0
    for s in range(got.n_spans):
        g = {int(i): float(p) for i, p in zip(got.ids[s], got.probs[s], strict=True) if i >= 0}
        w = {int(i): float(p) for i, p in zip(want.ids[s], want.probs[s], strict=True) if i >= 0}
        assert set(w) <= set(g)  # every local top-k alternative is among the server's
        for sid in w:
            assert g[sid] == pytest.approx(w[sid], rel=1e-3, abs=1e-5)
            compared += 1
        matched = [int(i) for i in got.ids[s] if i >= 0]
        assert int(got.first[s]) not in matched and len(matched) == len(set(matched))
        assert float(got.probs[s].sum() + got.span_t[s] + got.other_t[s]) <= 1.0 + 1e-4
    # measured: 34 spans, 18 alternatives with a student token of the same bytes (two tiny unrelated vocabularies)
    assert compared >= 15, (got.n_spans, compared)


def test_onpolicy_topk_from_a_served_teacher_of_another_tokenizer(served_gemma, gemma_teacher_dir, student_dir,
                                                                   chat_file, tmp_path):
    from lmdistill.train.logging import read_log

    summary = run_onpolicy(load_config(OnPolicyConfig, None, onpolicy_args(
        gemma_teacher_dir, student_dir, chat_file, tmp_path / "run", signal="topk", k="5", **{
            "loss.cross_tokenizer": "hybrid", "teacher_server.url": served_gemma.url, "train.max_steps": "2",
            "train.eval_every": "2", "train.eval_batches": "1", "rollout.max_new_tokens": "12"})))
    rows = [r for r in read_log(Path(summary["log"])) if "loss" in r]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) and r["loss"] > 0 for r in rows)
    assert torch.isfinite(torch.tensor(summary["eval_last"]["onpolicy_reverse_kl"]))
