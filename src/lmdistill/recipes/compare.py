"""`lmdistill compare`: several distillation methods on equal terms, then one report.

Every arm gets the same teacher, data, student initialisation, step budget and seed; only the method differs. The
arms are kinds from the registry in `lmdistill.recipes.arms` (CE baseline, online soft KD, cached top-k and sampled
soft KD, token- and sequence-level hard labels, co-distillation); one whose recipe or prerequisites are missing is
skipped with the reason, and the report shows it.

After training, all students are scored on the same held-out batches against the same teacher
(`lmdistill.evaluate.evaluate_models`), they and the teacher generate for the same prompts, and `lmdistill.report`
writes `report.md`, a self-contained `report.html` and `results.json` into `<train.output_dir>/report/`.
"""

from __future__ import annotations

import json
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmdistill.config import CompareConfig
from lmdistill.errors import ConfigError, Interrupted, LmdistillError
from lmdistill.recipes.arms import (
    ARM_KINDS,
    ArmContext,
    ArmOutcome,
    PhaseStats,
    ResourceMonitor,
    SkipArm,
    check_equal_terms,
    question_data,
)


def _echo(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# running a comparison


@dataclass
class ArmResult:
    """One arm after training: ok (with its outcome and resources), skipped or failed (with the reason)."""

    name: str
    kind: str
    label: str
    status: str  # "ok" | "skipped" | "failed"
    reason: str | None = None
    outcome: ArmOutcome | None = None
    monitor: ResourceMonitor | None = None
    seed: int = 0

    @property
    def summary(self) -> dict[str, Any]:
        return self.outcome.summary if self.outcome else {}

    def row(self) -> dict[str, Any]:
        """The arm as results.json stores it (metrics are added after the final scoring)."""
        out: dict[str, Any] = {"name": self.name, "kind": self.kind, "label": self.label, "status": self.status,
                               "reason": self.reason}
        if self.outcome is not None and self.monitor is not None:
            phases, o = self.monitor.phases, self.outcome
            out.update(
                student_dir=o.summary.get("student_dir"), log=o.summary.get("log"), kl_reference=o.kl_reference,
                curve_data=o.curve_data,
                teacher_bytes_per_token=o.teacher_bytes_per_token, bytes_note=o.bytes_note,
                wall_s=round(self.monitor.total_seconds, 2),
                prepare_s=round(phases["prepare"].seconds, 2) if "prepare" in phases else 0.0,
                train_s=round(phases["train"].seconds, 2) if "train" in phases else None,
                peak_memory_mb=_peak(phases.get("train")), prepare_peak_memory_mb=_peak(phases.get("prepare")),
                memory_method=self.monitor.method, train_tokens_per_s=o.summary.get("train_tokens_per_s"),
                steps=o.summary.get("steps"), train_target_tokens=o.summary.get("train_target_tokens"),
            )
        return out


def _peak(stats: PhaseStats | None) -> float | None:
    return None if stats is None or stats.peak_memory_mb is None else round(stats.peak_memory_mb, 1)


def check_arms(cfg: CompareConfig) -> None:
    """Refuse unknown kinds and overrides of the shared terms before any arm trains."""
    for spec in cfg.arms:
        if spec.kind not in ARM_KINDS:
            raise ConfigError(f"arm `{spec.name}`: unknown kind `{spec.kind}`; registered kinds: "
                              f"{', '.join(sorted(ARM_KINDS))}")
        check_equal_terms(spec)


def with_seed(cfg: CompareConfig, seed: int) -> CompareConfig:
    """The comparison with train.seed = `seed` (model init, data order and sampling of every arm)."""
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": seed})})


def run_arms(cfg: CompareConfig, echo: Callable[[str], None] | None = None) -> list[ArmResult]:
    """Train every arm once per seed, in order; skipped and failed arms are recorded with their reason.

    Returns one result per (arm, seed) run, arm by arm; an arm that is skipped or fails at one seed is not run at the
    later ones (its last result carries the reason).
    """
    echo = echo or _echo
    out_root = Path(cfg.train.output_dir)
    results: list[ArmResult] = []
    check_arms(cfg)
    seeds = cfg.run_seeds
    for i, spec in enumerate(cfg.arms, 1):
        kind = ARM_KINDS[spec.kind]
        head = f"[{i}/{len(cfg.arms)}] {spec.name} ({kind.label})"
        reason = kind.unavailable()
        if reason:
            echo(f"{head}: SKIPPED: {reason}")
            results.append(ArmResult(spec.name, spec.kind, kind.label, "skipped", reason, seed=seeds[0]))
            continue
        for seed in seeds:
            shead = head + (f" seed {seed}" if len(seeds) > 1 else "")
            echo(f"{shead} ...")
            monitor = ResourceMonitor()
            ctx = ArmContext(cfg=with_seed(cfg, seed), spec=spec, out_dir=out_root / "arms" / spec.name / f"seed-{seed}",
                             monitor=monitor)
            # A leftover cache or completions file would be resumed and make this arm's preparation look free.
            shutil.rmtree(ctx.out_dir, ignore_errors=True)
            try:
                outcome = kind.run(ctx)
            except Interrupted:  # a deliberate stop ends the comparison, it is not one arm's failure
                raise
            except SkipArm as e:
                echo(f"{shead}: SKIPPED: {e}")
                results.append(ArmResult(spec.name, spec.kind, kind.label, "skipped", str(e), seed=seed))
                break
            except Exception as e:  # noqa: BLE001  (one arm's failure is reported, the others still run)
                if cfg.fail_fast:
                    raise
                where = f"traceback in {ctx.out_dir / 'error.txt'}"
                try:
                    ctx.out_dir.mkdir(parents=True, exist_ok=True)
                    (ctx.out_dir / "error.txt").write_text(traceback.format_exc())
                except OSError as write_error:  # a full disk must not turn one arm's failure into a traceback
                    where = f"its traceback could not be written: {write_error}"
                msg = f"{type(e).__name__}: {e}" if not isinstance(e, LmdistillError) else str(e)
                echo(f"{shead}: FAILED: {msg} ({where})")
                results.append(ArmResult(spec.name, spec.kind, kind.label, "failed", msg, seed=seed))
                break
            result = ArmResult(spec.name, spec.kind, kind.label, "ok", None, outcome, monitor, seed=seed)
            echo(f"{shead}: done in {monitor.total_seconds:.1f} s")
            results.append(result)
    return results


def group_runs(runs: list[ArmResult]) -> dict[str, list[ArmResult]]:
    """{arm name: its runs in seed order}; an arm counts as ok only when every one of its runs is."""
    out: dict[str, list[ArmResult]] = {}
    for r in runs:
        out.setdefault(r.name, []).append(r)
    return out


def held_out(cfg: CompareConfig) -> tuple[Any, Any]:
    """The teacher's tokenizer and the held-out blocks every arm is scored on.

    Built before the first arm also as a warm-up: the one-off imports and set-up (datasets, tokenizers, the
    modelling code) then do not count against the first arm's wall-clock and memory only.
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from lmdistill.data import build_splits
    from lmdistill.models import load_tokenizer, resolve_model_path
    from lmdistill.train.loop import make_accelerator

    tok = load_tokenizer(cfg.teacher.name_or_path, revision=cfg.teacher.revision,
                         trust_remote_code=cfg.teacher.trust_remote_code)
    held = build_splits(cfg.data, tok).eval
    try:
        config = AutoConfig.from_pretrained(resolve_model_path(cfg.teacher.name_or_path), revision=cfg.teacher.revision,
                                            trust_remote_code=cfg.teacher.trust_remote_code)
        MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]  # imports the modelling module
    except Exception:  # noqa: BLE001  (only a warm-up: the arm that needs the model reports a real problem)
        pass
    make_accelerator(cfg.train)
    return tok, held


def score(cfg: CompareConfig, arms: list[ArmResult], tok: Any, held: Any,
          echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every trained student on the same held-out batches against the teacher, and side-by-side generations."""
    from lmdistill.config import RolloutConfig
    from lmdistill.data import build_splits
    from lmdistill.evaluate import (
        byte_lengths_of,
        evaluate_models,
        generation_tokens_per_s,
        prompts_from_blocks,
        prompts_from_text,
        resolve_device,
        side_by_side,
    )
    from lmdistill.models import load_causal_lm, load_teacher
    from lmdistill.rollout import eos_ids_of, onpolicy_metrics
    from lmdistill.teachers import HFTeacher

    echo = echo or _echo
    device = resolve_device("auto")
    teacher = load_teacher(cfg.teacher).to(device)
    groups = {n: rs for n, rs in group_runs(arms).items() if all(r.status == "ok" for r in rs)}
    seeds = cfg.run_seeds
    n_blocks = min(len(held), cfg.train.micro_batch_size * cfg.train.eval_batches)
    per_seed = f" x {len(seeds)} seeds" if len(seeds) > 1 else ""
    echo(f"scoring {len(groups)} students{per_seed} and the teacher on {n_blocks} held-out blocks of "
         f"{cfg.data.block_size} tokens ...")
    metrics: dict[str, dict[int, dict[str, float]]] = {n: {} for n in groups}
    block_sums: dict[str, dict[int, list[list[float]]]] = {n: {} for n in groups}
    teacher_metrics: dict[str, float] | None = None
    opts = cfg.generation
    questions, scorer = None, None
    if opts.onpolicy_prompts:
        questions = build_splits(question_data(cfg), tok).eval
        scorer = HFTeacher(teacher, len(tok))
    generations: list[dict[str, Any]] = []
    for seed in seeds:
        runs = {n: r for n, rs in groups.items() for r in rs if r.seed == seed}
        if not runs:
            continue
        students = {n: load_causal_lm(r.summary["student_dir"]).to(device).eval() for n, r in runs.items()}
        sums: dict[str, list[list[float]]] = {}
        scored = evaluate_models(students, held, n_vocab=len(tok), teacher=teacher,
                                 batch_size=cfg.train.micro_batch_size, max_batches=cfg.train.eval_batches,
                                 device=device, block_sums=sums, byte_lengths=byte_lengths_of(tok))
        teacher_metrics = teacher_metrics or scored.get("teacher")
        for name in students:
            metrics[name][seed] = scored[name]
            block_sums[name][seed] = sums.get(name, [])
        if questions is not None and scorer is not None:
            echo(f"on-policy scoring: {len(students)} students answer {len(questions)} held-out questions themselves"
                 + (f" (seed {seed})" if per_seed else "") + " ...")
            teacher_logprobs = _teacher_logprobs(scorer)
            rollout = RolloutConfig(max_new_tokens=opts.max_new_tokens)
            for name, student in students.items():
                metrics[name][seed].update(onpolicy_metrics(
                    student, questions, teacher_logprobs, n_vocab=len(tok), cfg=rollout, seed=opts.seed,
                    pad_id=tok.pad_token_id, eos_ids=eos_ids_of(teacher, tok), max_prompts=opts.onpolicy_prompts))
        if seed == seeds[0]:
            # the side-by-side generations are of the first seed's students
            prompts = (prompts_from_text(opts.prompts, tok, cfg.data.stage == "chat") if opts.prompts
                       else prompts_from_blocks(held, opts.n_prompts, opts.prompt_tokens))
            if prompts:
                echo(f"generating for {len(prompts)} prompts (greedy + sampled) with the teacher and {len(students)} "
                     "students")
                generations = side_by_side({"teacher": teacher, **students}, tok, prompts, opts)
        del students
    return {"metrics": metrics, "block_sums": block_sums, "teacher": teacher_metrics, "generations": generations,
            "device": str(device), "eval_blocks": n_blocks,
            "generation_tokens_per_s": generation_tokens_per_s(generations)}


def _teacher_logprobs(scorer: Any) -> Callable[[dict[str, Any]], Any]:
    from lmdistill.losses.chunked_ce import chunked_token_logprobs

    def teacher_logprobs(batch: dict[str, Any]) -> Any:
        t = scorer.targets(batch)
        return chunked_token_logprobs(t.hidden, t.head, batch["labels"])

    return teacher_logprobs


def arm_row(runs: list[ArmResult], scored: dict[str, Any]) -> dict[str, Any]:
    """One arm's row of results.json: its runs' mean per metric, a 95 % interval and the run of every seed."""
    from lmdistill.report import summarize_seeds

    bad = next((r for r in runs if r.status != "ok"), None)
    if bad is not None:
        return {**bad.row(), "seed": bad.seed}
    name = runs[0].name
    per = []
    for r in runs:
        row = {**r.row(), "seed": r.seed}
        if r.seed in scored["metrics"].get(name, {}):
            row["metrics"] = scored["metrics"][name][r.seed]
        per.append(row)
    out = dict(per[0])
    if not all("metrics" in p for p in per):
        return out
    blocks = scored.get("block_sums", {}).get(name, {}).get(runs[0].seed) if len(runs) == 1 else None
    out.update(summarize_seeds(per, blocks))
    out["seeds"] = per
    out["generation_tokens_per_s"] = scored.get("generation_tokens_per_s", {}).get(name)
    return out


def check_output_dir(cfg: CompareConfig) -> None:
    """Refuse an output directory that cannot be created before any arm trains (not after the first one, when a failed
    arm's error.txt cannot be written either)."""
    from lmdistill.errors import write_failure

    out = Path(cfg.train.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_failure("comparison output directory", out, e) from None


def check_model_pair(cfg: CompareConfig, teacher_tokenizer: Any) -> None:
    """A pretrained student must share the teacher's tokenizer: every arm is scored against the teacher token by
    token, so a mismatched pair would train each arm and then fail it. Refused once, before the first arm."""
    from lmdistill.models import load_tokenizer, shared_vocab_size

    if cfg.student.init != "pretrained" or not cfg.student.name_or_path:
        return  # prune and config students take the teacher's tokenizer
    student_tokenizer = load_tokenizer(cfg.student.name_or_path, trust_remote_code=cfg.student.trust_remote_code)
    shared_vocab_size(teacher_tokenizer, student_tokenizer)


def run_compare(cfg: CompareConfig, echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train every arm (once per seed), score them all, write the report; returns results (also in
    report/results.json)."""
    from lmdistill.report import write_report

    echo = echo or _echo
    t0 = time.perf_counter()
    check_arms(cfg)
    check_output_dir(cfg)
    echo(f"preparing the held-out data ({cfg.data.source}) ...")
    tok, held = held_out(cfg)
    check_model_pair(cfg, tok)
    runs = run_arms(cfg, echo)
    if any(r.status == "ok" for r in runs):
        scored = score(cfg, runs, tok, held, echo)
    else:
        scored = {"metrics": {}, "generations": []}
    rows = [arm_row(rs, scored) for rs in group_runs(runs).values()]
    results: dict[str, Any] = {
        "title": cfg.title,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": scored.get("device", "cpu"),
        "teacher": cfg.teacher.name_or_path,
        "equal_terms": _equal_terms(cfg),
        "seeds": cfg.run_seeds,
        "eval_blocks": scored.get("eval_blocks", 0),
        "teacher_metrics": scored.get("teacher"),
        "arms": rows,
        "generations": scored["generations"],
        "config": cfg.model_dump(mode="json"),
    }
    results["total_wall_s"] = round(time.perf_counter() - t0, 1)
    paths = write_report(results, Path(cfg.train.output_dir) / "report")
    results["report"] = {k: str(v) for k, v in paths.items()}
    return results


def _equal_terms(cfg: CompareConfig) -> dict[str, Any]:
    s = cfg.student
    pruned = (f"pruned from the teacher, layers {s.keep_layers}" if s.prune.method == "keep_layers" else
              f"pruned from the teacher, its {len(s.keep_layers)} most influential layers (1 - cos(input, output) on "
              f"{s.prune.calibration_source})")
    student = {"prune": pruned,
               "config": f"random init from {json.dumps(s.arch)}",
               "pretrained": f"checkpoint {s.name_or_path}"}[s.init]
    return {
        "teacher": cfg.teacher.name_or_path,
        "student": student + (" + LoRA" if s.lora.enabled else ""),
        "data": f"{cfg.data.source} ({cfg.data.stage}), blocks of {cfg.data.block_size} tokens",
        "steps": cfg.train.max_steps,
        "batch": f"{cfg.train.micro_batch_size} x {cfg.train.grad_accum} accumulation",
        "seeds": ", ".join(str(x) for x in cfg.run_seeds),
        "divergence": f"{cfg.loss.kind} (T={cfg.loss.temperature}, alpha={cfg.loss.alpha})",
    }


class ArmsFailed(LmdistillError):
    """Some arms raised; the report was still written and names them."""

    exit_code = 1


def compare_command(cfg: CompareConfig) -> dict[str, Any]:
    """`lmdistill compare`: run, print the table and where the report is; exit non-zero when an arm failed."""
    from lmdistill.report import console_table

    results = run_compare(cfg)
    print()
    print(console_table(results))
    print(f"\nreport: {results['report']['html']}  (also {results['report']['markdown']})")
    raise_if_failed(results, cfg.train.output_dir)
    return results


def raise_if_failed(results: dict[str, Any], output_dir: str | Path) -> None:
    failed = [a["name"] for a in results["arms"] if a["status"] == "failed"]
    if failed:
        raise ArmsFailed(f"{len(failed)} arm(s) failed: {', '.join(failed)}; the report and "
                         f"{Path(output_dir) / 'arms'}/<name>/seed-<seed>/error.txt have the details")
