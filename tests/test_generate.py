"""`lmdistill generate` with a local HF teacher, plus the pieces it is built from: prompts, the JSONL store, filters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import make_model
from lmdistill.assets import wikipedia_questions
from lmdistill.config import load_config
from lmdistill.errors import ConfigError, DataError
from lmdistill.generate import GenerateConfig, run_generate
from lmdistill.generate.config import FilterConfig, PromptsConfig, ServeConfig
from lmdistill.generate.filters import exact_match, extract_answer, filter_records, numeric_match, strip_think
from lmdistill.generate.hf import HFGenerator
from lmdistill.generate.prompts import load_prompts
from lmdistill.generate.store import JsonlStore, read_records

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def chat_teacher(tmp_path_factory, tokenizer) -> Path:
    """An untrained 2-layer Llama with the conftest tokenizer (which has a chat template)."""
    d = tmp_path_factory.mktemp("gen") / "teacher"
    make_model(d, tokenizer, hidden=32, layers=2, seed=5)
    return d


@pytest.fixture(scope="module")
def generator(chat_teacher) -> HFGenerator:
    from lmdistill.config import ModelConfig

    return HFGenerator.load(ModelConfig(name_or_path=str(chat_teacher)), "cpu")


def write_prompts(path: Path, n: int, **extra_columns) -> Path:
    with open(path, "w") as fh:
        for i in range(n):
            row = {"id": f"p{i}", "prompt": f"Tell me about the red book number {i}.", "reference": str(i)}
            row.update({k: v(i) for k, v in extra_columns.items()})
            fh.write(json.dumps(row) + "\n")
    return path


def hf_config(teacher: Path, prompts: Path, out: Path, **overrides: str) -> GenerateConfig:
    args = {
        "teacher.model.name_or_path": str(teacher),
        "teacher.device": "cpu",
        "teacher.batch_size": "3",
        "prompts.source": str(prompts),
        "sampling.max_new_tokens": "6",
        "sampling.n": "2",
        "output": str(out),
        "progress": "false",
        "filters.drop_truncated": "false",
        "filters.dedup": "none",
    }
    args.update(overrides)
    return load_config(GenerateConfig, None, [x for k, v in args.items() for x in (f"--{k}", v)])


def keys(records: list[dict]) -> list[tuple[str, int]]:
    return [(r["id"], r["sample"]) for r in records]


# ---------------------------------------------------------------------------------------------- HF backend


def test_hf_generate_writes_one_record_per_prompt_and_sample_and_resumes(chat_teacher, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", 5)
    out = tmp_path / "out" / "gen.jsonl"
    cfg = hf_config(chat_teacher, prompts, out, **{"sampling.logprobs": "true", "sampling.top_logprobs": "3"})
    summary = run_generate(cfg)
    records, _ = read_records(out)
    assert sorted(keys(records)) == [(f"p{i}", s) for i in range(5) for s in range(2)]
    assert summary["generated_this_run"] == 10 and summary["prompts_incomplete"] == 0
    r = records[0]
    assert r["teacher"]["backend"] == "hf" and r["teacher"]["model"] == str(chat_teacher)
    assert r["sampling"]["temperature"] == 0.7 and r["sampling"]["top_logprobs"] == 3
    assert r["messages"][0] == {"role": "user", "content": r["prompt"]}
    assert r["messages"][-1] == {"role": "assistant", "content": r["completion"]}
    assert r["reference"] == r["id"][1:]
    assert r["finish_reason"] in ("stop", "length")
    assert r["prompt_tokens"] > 5 and 1 <= r["completion_tokens"] <= 6
    assert len(r["logprobs"]) <= r["completion_tokens"]
    lp = r["logprobs"][0]
    assert isinstance(lp["id"], int) and lp["logprob"] <= 0 and len(lp["top_logprobs"]) == 3
    # The filtered file and the report sit beside the raw file.
    assert (tmp_path / "out" / "gen.filtered.jsonl").is_file()
    report = json.loads((tmp_path / "out" / "gen.summary.json").read_text())
    assert report["filters"]["total"] == 10

    # Rerun: nothing to do. Then raise n: only the new sample index is generated.
    assert run_generate(cfg)["generated_this_run"] == 0
    more = hf_config(chat_teacher, prompts, out, **{"sampling.logprobs": "true", "sampling.top_logprobs": "3",
                                                    "sampling.n": "3"})
    assert run_generate(more)["generated_this_run"] == 5
    records, _ = read_records(out)
    assert sorted(keys(records)) == [(f"p{i}", s) for i in range(5) for s in range(3)]


def test_sampled_completions_do_not_depend_on_batch_size_or_on_resuming(chat_teacher, tmp_path):
    # with a seed, completion (prompt id, sample i) is a function of those alone, not of its neighbours in a batch
    prompts = write_prompts(tmp_path / "prompts.jsonl", 5)

    def texts(out: Path) -> dict[tuple[str, int], str]:
        return {(r["id"], r["sample"]): r["completion"] for r in read_records(out)[0]}

    common = {"sampling.temperature": "1.0", "sampling.max_new_tokens": "8", "sampling.seed": "11"}
    run_generate(hf_config(chat_teacher, prompts, tmp_path / "b3.jsonl", **common))
    run_generate(hf_config(chat_teacher, prompts, tmp_path / "b1.jsonl", **{**common, "teacher.batch_size": "1"}))
    # interrupted after one sample per prompt, then resumed to two
    resumed = tmp_path / "resumed.jsonl"
    run_generate(hf_config(chat_teacher, prompts, resumed, **{**common, "sampling.n": "1"}))
    run_generate(hf_config(chat_teacher, prompts, resumed, **common))
    reference = texts(tmp_path / "b3.jsonl")
    assert len(reference) == 10 and len(set(reference.values())) > 1
    assert texts(tmp_path / "b1.jsonl") == reference
    assert texts(resumed) == reference
    other = tmp_path / "seed12.jsonl"
    run_generate(hf_config(chat_teacher, prompts, other, **{**common, "sampling.seed": "12"}))
    assert texts(other) != reference


def test_resume_refuses_other_sampling_settings(chat_teacher, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", 2)
    out = tmp_path / "gen.jsonl"
    run_generate(hf_config(chat_teacher, prompts, out, **{"prompts.max_prompts": "1"}))
    with pytest.raises(ConfigError, match="would mix them"):
        run_generate(hf_config(chat_teacher, prompts, out, **{"sampling.temperature": "0.2"}))
    # overwrite=true starts over with the new settings.
    run_generate(hf_config(chat_teacher, prompts, out, **{"sampling.temperature": "0.2", "overwrite": "true"}))
    records, _ = read_records(out)
    assert len(records) == 4 and {r["sampling"]["temperature"] for r in records} == {0.2}


def test_logprobs_are_the_models_own_distribution(generator):
    """Greedy tokens are the top-1 alternative, and every log-prob equals a fresh forward pass over prompt+completion."""
    text = generator.render([{"role": "user", "content": "The cat sees the ball."}])
    [[c]] = generator.generate([text], temperature=0, max_new_tokens=8, top_logprobs=2)
    ids = [e["id"] for e in c.logprobs]
    assert ids and all(e["top_logprobs"][0]["id"] == e["id"] for e in c.logprobs)
    assert generator.tokenizer.decode(ids) == c.text
    prompt_ids = generator.tokenizer(text, add_special_tokens=False)["input_ids"]
    full = torch.tensor([prompt_ids + ids])
    with torch.no_grad():
        logp = torch.log_softmax(generator.model(full).logits[0].float(), -1)
    expected = [logp[len(prompt_ids) - 1 + j, t].item() for j, t in enumerate(ids)]
    assert [e["logprob"] for e in c.logprobs] == pytest.approx(expected, abs=1e-4)


def test_left_padded_batch_matches_single_prompts(generator):
    """Batching with left padding must not change what a prompt gets (greedy)."""
    texts = [generator.render([{"role": "user", "content": m}]) for m in ("Hi.", "A much longer prompt about a dog.")]
    batched = generator.generate(texts, temperature=0, max_new_tokens=6)
    single = [generator.generate([t], temperature=0, max_new_tokens=6)[0] for t in texts]
    assert [b[0].text for b in batched] == [s[0].text for s in single]
    assert batched[0][0].prompt_tokens < batched[1][0].prompt_tokens


def test_stop_string_cuts_the_completion(generator):
    text = generator.render([{"role": "user", "content": "The river at night."}])
    [[full]] = generator.generate([text], temperature=0, max_new_tokens=12, top_logprobs=0)
    stop = full.text[4:6]
    assert len(stop) == 2
    [[cut]] = generator.generate([text], temperature=0, max_new_tokens=12, stop=[stop], top_logprobs=0)
    assert cut.text == full.text[: full.text.index(stop)]
    assert cut.finish_reason == "stop"
    assert "".join(e["token"] for e in cut.logprobs) == cut.text[: len("".join(e["token"] for e in cut.logprobs))]


def test_missing_chat_template_is_a_clear_error(generator):
    template = generator.tokenizer.chat_template
    generator.tokenizer.chat_template = None
    try:
        with pytest.raises(ConfigError, match="no chat template"):
            generator.render([{"role": "user", "content": "x"}])
    finally:
        generator.tokenizer.chat_template = template


# ---------------------------------------------------------------------------------------------- store


def test_store_drops_a_torn_last_line_and_appends_cleanly(tmp_path):
    path = tmp_path / "s.jsonl"
    with JsonlStore(path) as store:
        assert store.open() == []
        store.append([{"id": "a", "sample": 0}, {"id": "b", "sample": 0}])
    with open(path, "ab") as fh:
        fh.write(b'{"id": "c", "sam')  # a write cut short by kill -9
    with JsonlStore(path) as store:
        assert keys(store.open()) == [("a", 0), ("b", 0)]
        store.append([{"id": "c", "sample": 0}])
    assert keys(read_records(path)[0]) == [("a", 0), ("b", 0), ("c", 0)]
    assert path.read_bytes().count(b"\n") == 3


def test_store_refuses_a_corrupt_middle_line_and_a_second_writer(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"id": "a", "sample": 0}\nnot json\n{"id": "b", "sample": 0}\n')
    with pytest.raises(DataError, match="line 2"):
        JsonlStore(path).open()
    other = tmp_path / "t.jsonl"
    with JsonlStore(other) as first:
        first.open()
        with pytest.raises(ConfigError, match="another process"):
            JsonlStore(other).open()


# ---------------------------------------------------------------------------------------------- prompts


def test_prompts_from_messages_prompt_column_and_hash_ids(tmp_path):
    path = tmp_path / "m.jsonl"
    rows = [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"}], "answer": 3},
        {"messages": [{"role": "user", "content": "Q2"}], "answer": 4},
        {"messages": [{"role": "user", "content": "Q2"}], "answer": 4},  # same prompt, no id column: merged
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = load_prompts(PromptsConfig(source=str(path), reference_column="answer", system_prompt="Sys."))
    assert len(prompts) == 2
    assert prompts[0].messages[0]["content"] == "Be brief."  # an existing system turn is kept
    assert prompts[1].messages[0] == {"role": "system", "content": "Sys."}
    assert prompts[0].prompt == "Q1" and prompts[1].reference == 4
    assert len(prompts[0].id) == 16 and prompts[0].id != prompts[1].id
    assert load_prompts(PromptsConfig(source=str(path)))[0].id == prompts[0].id  # stable across loads


def test_prompt_errors_name_the_problem(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "x"}) + "\n")
    with pytest.raises(DataError, match="neither a `messages` nor a `prompt` column"):
        load_prompts(PromptsConfig(source=str(path)))
    path.write_text(json.dumps({"id": 1, "prompt": "x"}) + "\n" + json.dumps({"id": 1, "prompt": "y"}) + "\n")
    with pytest.raises(DataError, match="prompt id `1` appears at rows 0 and 1"):
        load_prompts(PromptsConfig(source=str(path)))
    with pytest.raises(DataError, match="could not load prompts"):
        load_prompts(PromptsConfig(source=str(tmp_path / "missing_dir_or_hub_name")))


def test_parquet_prompts_through_datasets(tmp_path):
    import datasets

    path = tmp_path / "p.parquet"
    datasets.Dataset.from_dict({"prompt": ["a", "b"], "id": ["x", "y"]}).to_parquet(str(path))
    prompts = load_prompts(PromptsConfig(source=str(path)))
    assert [(p.id, p.prompt) for p in prompts] == [("x", "a"), ("y", "b")]


def test_wikipedia_questions_use_the_extract_as_reference():
    records = [{"title": "Cat", "extract": "A cat is a small mammal."}, {"title": "Moon", "extract": "The Moon ..."}]
    rows = wikipedia_questions(records)
    assert rows[0] == {"id": "wiki/Cat", "prompt": "In one sentence, what is Cat?", "reference": records[0]["extract"]}
    assert "Moon" in rows[1]["prompt"] and rows[1]["prompt"] != rows[0]["prompt"].replace("Cat", "Moon")


@pytest.mark.assets
def test_embedded_wikipedia_questions_default_source():
    from lmdistill.errors import AssetError

    try:
        prompts = load_prompts(PromptsConfig(max_prompts=4))
    except AssetError as e:
        pytest.skip(str(e))
    assert [p.id for p in prompts] == sorted({p.id for p in prompts}, key=[p.id for p in prompts].index)
    assert all(p.id.startswith("wiki/") and p.reference and p.messages[-1]["role"] == "user" for p in prompts)
    assert prompts[0].prompt.startswith("In one sentence, what is ")


# ---------------------------------------------------------------------------------------------- filters


def rec(pid: str, completion: str, reference=None, finish="stop", sample=0) -> dict:
    return {"id": pid, "sample": sample, "completion": completion, "finish_reason": finish, "reference": reference,
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": completion}]}


def test_think_blocks_kept_or_stripped():
    records = [rec("a", "<think>2+2 is 4</think>\n\nThe answer is 4."), rec("b", "<think>cut off mid-tho"),
               rec("c", "plain")]
    kept, report = filter_records(records, FilterConfig(think="keep"))
    assert [r["completion"] for r in kept] == [r["completion"] for r in records]
    kept, report = filter_records(records, FilterConfig(think="strip"))
    assert [r["completion"] for r in kept] == ["The answer is 4.", "plain"]
    assert kept[0]["messages"][-1]["content"] == "The answer is 4."
    assert records[0]["completion"].startswith("<think>")  # the input records are not modified
    assert report.dropped["unclosed_think"] == 1 and report.kept == 2
    # A template that opens <think> in the prompt leaves only the closing tag in the completion.
    assert strip_think("reasoning here</think> 7") == "7"


def test_verifier_keeps_right_answers_and_drops_wrong_ones():
    records = [
        rec("q1", "<think>3*4</think> The answer is \\boxed{12}.", reference="12"),
        rec("q2", "Answer: 1,000", reference=1000),
        rec("q3", "The answer is 13.", reference="12"),
        rec("q4", "<think>12? no, 15</think> Final answer: 15", reference="12"),
    ]
    kept, report = filter_records(records, FilterConfig(verifier="numeric"))
    assert [r["id"] for r in kept] == ["q1", "q2"] and report.dropped["verifier"] == 2
    assert kept[0]["completion"].startswith("<think>")  # think=keep: the trace stays in the training text
    assert exact_match("so the answer is: Paris.", "paris") and not exact_match("Lyon", "Paris")
    assert numeric_match("x = 3.50", "3.5") and not numeric_match("no number", "3")
    assert extract_answer("<think>a</think>The answer is \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"


def my_verifier(completion: str, reference) -> bool:
    """A user verifier reached by dotted path."""
    return completion.endswith(str(reference))


def test_user_verifier_length_truncation_and_duplicates():
    records = [rec("a", "ends with X"), rec("a", "ends with X", sample=1), rec("a", "ends with Y", sample=2),
               rec("b", "ends with X", finish="length"), rec("c", "x" * 50), rec("d", "")]
    for r in records:
        r["reference"] = "X"
    cfg = FilterConfig(verifier="test_generate:my_verifier", max_chars=20, drop_truncated=True)
    kept, report = filter_records(records, cfg)
    assert [(r["id"], r["sample"]) for r in kept] == [("a", 0)]
    assert report.dropped == {"unclosed_think": 0, "truncated": 1, "too_short": 1, "too_long": 1, "no_reference": 0,
                              "verifier": 1, "duplicate": 1}
    assert report.prompts == 4 and report.prompts_without_sample == 3
    with pytest.raises(ConfigError, match="cannot import"):
        filter_records(records, FilterConfig(verifier="no_such_module.check"))
    with pytest.raises(DataError, match="no record has a `answer` field"):
        filter_records(records, FilterConfig(verifier="exact", reference_field="answer"))


# ---------------------------------------------------------------------------------------------- configs


def test_config_validation_messages():
    with pytest.raises(ConfigError, match="needs teacher.api_model"):
        load_config(GenerateConfig, None, ["--teacher.backend", "openai"])
    with pytest.raises(ConfigError, match="top_logprobs > 0 needs sampling.logprobs"):
        load_config(GenerateConfig, None, ["--sampling.top_logprobs", "5"])
    with pytest.raises(ConfigError, match="sampling.top_logprobs"):
        load_config(GenerateConfig, None, ["--sampling.logprobs", "true", "--sampling.top_logprobs", "21"])


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("generate*.yaml")) + ["serve.yaml"])
def test_shipped_configs_validate(name):
    cls = ServeConfig if name == "serve.yaml" else GenerateConfig
    load_config(cls, REPO / "configs" / name)
