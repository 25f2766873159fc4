"""`lmdistill VERB --config FILE [--section.field VALUE ...]`: one line per verb, mapping it to its function.

Every verb takes a typed config (YAML) whose fields can all be overridden on the command line; `lmdistill VERB
--help` lists them. Errors a user can cause print one message and exit with code 2, no traceback.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import click
from pydantic import BaseModel

from lmdistill import __version__
from lmdistill.config import field_help, load_config
from lmdistill.errors import LmdistillError


class ConfigCommand(click.Command):
    """A click command whose help also lists every config field as a `--dotted.name` override."""

    def __init__(self, *args: Any, config_cls: type[BaseModel], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.config_cls = config_cls

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_options(ctx, formatter)
        rows = [(f"{flag} {typ}", desc) for flag, typ, desc in field_help(self.config_cls)]
        with formatter.section("Config fields (set in the YAML file or override here)"):
            formatter.write_dl(rows)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lmdistill")
@click.option("-v", "--verbose", is_flag=True, help="Show debug logs.")
def main(verbose: bool) -> None:
    """lmdistill: distill a small student language model from a larger teacher.

    Soft labels (online `soft`, or offline via `label` + `soft --teacher_cache`), hard labels (`hard`, with
    `generate` and `serve` for teacher text), co-distillation (`codistill`), and `eval` / `compare` / `demo` to see
    what each method buys. Every verb takes `--config FILE.yaml` plus `--section.field value` overrides.
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def register(name: str, config_cls: type[BaseModel], fn: Callable[[Any], Any], help_text: str | None = None) -> None:
    """Add `lmdistill NAME`: load `config_cls` from --config + overrides, then call `fn(config)`."""

    def callback(config: str | None, print_config: bool, **_: Any) -> None:
        ctx = click.get_current_context()
        cfg = load_config(config_cls, config, list(ctx.args))
        if print_config:
            import yaml

            click.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
            return
        fn(cfg)

    cmd = ConfigCommand(
        name,
        config_cls=config_cls,
        callback=callback,
        params=[
            click.Option(["--config", "-c"], type=click.Path(dir_okay=False), default=None,
                         help="YAML config file (see configs/)."),
            click.Option(["--print-config"], is_flag=True, help="Print the resolved config and exit (validates it)."),
        ],
        help=help_text or (fn.__doc__ or "").strip().split("\n")[0],
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                          "help_option_names": ["-h", "--help"]},
    )
    main.add_command(cmd)


def _soft(cfg: Any) -> None:
    from lmdistill.recipes.soft import run_soft

    summary = run_soft(cfg)
    _report_run(summary)


def _hard(cfg: Any) -> None:
    from lmdistill.recipes.hard import run_hard

    _report_run(run_hard(cfg))


def _codistill(cfg: Any) -> None:
    from lmdistill.recipes.codistill import run_codistill

    summary = run_codistill(cfg)
    if "teacher_dir" in summary:
        click.echo(f"teacher: {summary['teacher_dir']}")
    _report_run(summary)


def _onpolicy(cfg: Any) -> None:
    from lmdistill.recipes.onpolicy import run_onpolicy

    summary = run_onpolicy(cfg)
    _report_run(summary)
    last = summary.get("eval_last") or {}
    if "onpolicy_reverse_kl" in last:
        first = summary.get("eval_first") or {}
        click.echo(f"on-policy reverse KL per token: {first.get('onpolicy_reverse_kl', float('nan')):.4f} -> "
                   f"{last['onpolicy_reverse_kl']:.4f}; teacher NLL of greedy answers "
                   f"{first.get('teacher_nll_greedy', float('nan')):.4f} -> "
                   f"{last.get('teacher_nll_greedy', float('nan')):.4f}")
        if "onpolicy_span_kd" in last:  # a teacher of another tokenizer: the divergence per compared span
            click.echo(f"on-policy span divergence: {first.get('onpolicy_span_kd', float('nan')):.4f} -> "
                       f"{last['onpolicy_span_kd']:.4f} ({last.get('onpolicy_aligned', 0.0):.0%} of sampled tokens "
                       "in compared spans)")
    phases = summary.get("phases_s") or {}
    if phases:
        click.echo("time in steps: " + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()))


def _report_run(summary: dict[str, Any]) -> None:
    if "student_dir" not in summary:
        return
    click.echo(f"student: {summary['student_dir']}")
    click.echo(f"logs:    {summary['log']}")
    first, last = summary.get("eval_first"), summary.get("eval_last")
    if first and last and "kl_to_teacher" in first:
        click.echo(
            f"held-out KL to teacher: {first['kl_to_teacher']:.4f} -> {last['kl_to_teacher']:.4f}; perplexity "
            f"{first['perplexity']:.2f} -> {last['perplexity']:.2f}; agreement {first['agreement']:.3f} -> "
            f"{last['agreement']:.3f}"
        )
    if "train_tokens_per_s" in summary:
        click.echo(f"train throughput: {summary['train_tokens_per_s']:,.0f} tokens/s")


def _label(cfg: Any) -> None:
    from lmdistill.recipes.label import run_label

    summary = run_label(cfg)
    if "manifest" in summary:
        click.echo(f"cache:   {summary['cache_dir']} ({summary['bytes']:,} bytes, {summary['bytes_per_token']:.1f} "
                   f"bytes/target token)")
        click.echo(f"labelled {summary['labelled_tokens']:,} tokens at {summary['tokens_per_s']:,.0f} tokens/s")


def _estimate(cfg: Any) -> None:
    from lmdistill.cache.estimate import run_estimate

    run_estimate(cfg)


def _register_all() -> None:
    from lmdistill.config import HardConfig, SoftConfig

    register("soft", SoftConfig, _soft, "Soft-label distillation: the student matches the teacher's distributions.")
    register("hard", HardConfig, _hard, "Hard-label distillation: the student learns the teacher's tokens or text.")
    from lmdistill.config import CodistillConfig

    register("codistill", CodistillConfig, _codistill, "Co-distillation: teacher and student trained together.")
    from lmdistill.config import OnPolicyConfig

    register("onpolicy", OnPolicyConfig, _onpolicy, "On-policy distillation: the student writes, the teacher scores "
             "the student's tokens (local or behind a server).")
    from lmdistill.generate import GenerateConfig, ServeConfig, run_generate
    from lmdistill.serve import run_serve

    register("generate", GenerateConfig, run_generate, "Teacher completions for sequence-level distillation (JSONL).")
    register("serve", ServeConfig, run_serve, "Serve a local model over an OpenAI-compatible HTTP API.")
    from lmdistill.config import EstimateConfig, LabelConfig

    register("label", LabelConfig, _label, "Run the teacher once over the data and write a soft-label cache.")
    register("estimate", EstimateConfig, _estimate, "Soft-label storage: dense vs top-k vs sampled, or a real cache.")

    from lmdistill.evaluate import EvalConfig, eval_command
    from lmdistill.recipes.compare import CompareConfig, compare_command
    from lmdistill.recipes.demo import demo_command

    register("eval", EvalConfig, eval_command, "Held-out perplexity, bits per byte, KL to the teacher, agreement, ECE, "
             "tokens/s, generations side by side (JSON).")
    register("compare", CompareConfig, compare_command, "Several distillation methods on equal terms; a report "
             "with tables and plots.")
    from lmdistill.recipes.prune import PruneRunConfig, prune_command

    register("prune", PruneRunConfig, prune_command, "Cut a student from the teacher (layers; width too with "
             "prune.method=minitron), write it, and print its held-out perplexity before any training next to "
             "keep-every-k-th-layer.")
    main.add_command(demo_command)


_register_all()


@main.command("assets")
@click.option("--convert/--no-convert", default=True, help="Convert the embedded GGUF teacher now (once, ~1 min).")
@click.option("--gemma", is_flag=True, help="Also check (and convert, ~2 min) the teacher `embedded:gemma3-270m`.")
def assets_cmd(convert: bool, gemma: bool) -> None:
    """Check the embedded default (teacher and text) and prepare it for offline use."""
    from lmdistill import assets

    try:
        n = len(assets.wikipedia_records())
        click.echo(f"text:    {n} Wikipedia summaries ({assets.TEXT_PACKAGE})")
        click.echo(f"teacher: {assets.smollm2_gguf()}")
        if convert:
            click.echo(f"converted teacher: {assets.teacher_dir()}")
        if gemma:
            click.echo(f"gemma:   {len(assets.gemma_parts())} GGUF chunks ({assets.GEMMA_GGUF})")
            if convert:
                click.echo(f"converted gemma: {assets.gemma_dir()}")
    except LmdistillError as e:
        raise click.ClickException(str(e)) from None


def run() -> None:
    """Console entry point with readable errors."""
    try:
        main(standalone_mode=False)
    except LmdistillError as e:
        click.secho(f"error: {e}", fg="red", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    run()
