"""Security defaults: no pickle loading, no remote code unless asked, secrets only from env/files and never written
out, `serve` local by default and able to demand a bearer token."""

from __future__ import annotations

import ast
import json
import logging
import os
import sys
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel

import lmdistill
from lmdistill.cli import main as cli_main

SRC = Path(lmdistill.__file__).parent


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    if isinstance(node, ast.Name):
        return node.id
    return "?"


def _kw(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _sources() -> list[tuple[Path, ast.AST]]:
    return [(p, ast.parse(p.read_text(), filename=str(p))) for p in sorted(SRC.rglob("*.py"))]


def test_no_pickle_loading_anywhere_in_the_package():
    """torch.load only with weights_only=True; no pickle/dill/joblib/marshal, no numpy allow_pickle, no read_pickle."""
    problems = []
    for path, tree in _sources():
        rel = path.relative_to(SRC.parent)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                bad = [n for n in names if n and n.split(".")[0] in {"pickle", "cPickle", "dill", "joblib", "marshal",
                                                                      "shelve", "cloudpickle"}]
                if bad:
                    problems.append(f"{rel}:{node.lineno} imports {bad}")
        for call in _calls(tree):
            name = _dotted(call.func)
            if name.endswith("torch.load") or name == "load" and isinstance(call.func, ast.Name):
                wo = _kw(call, "weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    problems.append(f"{rel}:{call.lineno} calls {name} without weights_only=True")
            if name.endswith(("np.load", "numpy.load")):
                ap = _kw(call, "allow_pickle")
                if isinstance(ap, ast.Constant) and ap.value is True:
                    problems.append(f"{rel}:{call.lineno} numpy.load(allow_pickle=True)")
            if name.endswith("read_pickle"):
                problems.append(f"{rel}:{call.lineno} {name}")
    assert not problems, "\n".join(problems)


def test_trust_remote_code_is_never_switched_on_in_code():
    hits = []
    for path, tree in _sources():
        for call in _calls(tree):
            v = _kw(call, "trust_remote_code")
            if isinstance(v, ast.Constant) and v.value is True:
                hits.append(f"{path.relative_to(SRC.parent)}:{call.lineno}")
    assert not hits, hits


def _config_classes() -> dict[str, type[BaseModel]]:
    return {name: cmd.config_cls for name, cmd in cli_main.commands.items() if hasattr(cmd, "config_cls")}


def _leaf_fields(cls: type[BaseModel], prefix: str = ""):
    for name, info in cls.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _leaf_fields(ann, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", info


def test_every_command_defaults_to_no_remote_code():
    classes = _config_classes()
    assert {"soft", "generate", "serve"} <= set(classes)
    seen = 0
    for verb, cls in classes.items():
        for dotted, info in _leaf_fields(cls):
            if dotted.endswith("trust_remote_code"):
                seen += 1
                assert info.get_default(call_default_factory=True) is False, f"{verb} --{dotted}"
    assert seen >= 3


def test_secrets_are_named_not_held_by_configs():
    """A field that is about a key/secret/password only names where it lives (an env var or a file), so a config
    file, `--print-config` or `config.yaml` in a run directory can never contain one."""
    offenders = []
    for verb, cls in _config_classes().items():
        for dotted, _ in _leaf_fields(cls):
            leaf = dotted.rsplit(".", 1)[-1].lower()
            if any(w in leaf for w in ("key", "secret", "password", "credential")) and not leaf.endswith(
                    ("_env", "_file")):
                offenders.append(f"{verb} --{dotted}")
    assert not offenders, offenders


def test_pickled_objects_in_a_checkpoint_are_refused_and_never_run(tmp_path):
    """An optimizer file that carries code (a pickle __reduce__) is rejected as damaged; the code never runs."""
    from lmdistill.errors import CheckpointError
    from lmdistill.train.checkpoint import CheckpointManager

    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    manager = CheckpointManager(tmp_path)
    path = manager.save(1, models={"m": model}, optimizers={"m": opt}, schedulers={"m": sched})
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state": {}, "param_groups": [], "x": Payload()}, path / "optimizer-m.pt")
    with pytest.raises(CheckpointError, match="is damaged"):
        manager.load(path, models={"m": model}, optimizers={"m": opt}, schedulers={"m": sched})
    assert not marker.exists()


def test_serve_is_local_by_default_and_enforces_its_bearer_token():
    from fastapi.testclient import TestClient

    from lmdistill.generate import ServeConfig
    from lmdistill.serve import _is_loopback, create_app

    cfg = ServeConfig()
    assert _is_loopback(cfg.host) and cfg.host == "127.0.0.1"
    assert cfg.api_key_env is None and cfg.api_key_file is None
    client = TestClient(create_app(generator=None, cfg=cfg, api_key="s3cret-token"))
    assert client.get("/health").status_code == 200  # liveness probes need no key
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "s3cret-token"}).status_code == 401
    ok = client.get("/v1/models", headers={"Authorization": "Bearer s3cret-token"})
    assert ok.status_code == 200 and "s3cret-token" not in ok.text


def test_serve_without_key_on_a_public_interface_warns(monkeypatch, caplog):
    import lmdistill.serve as serve
    from lmdistill.generate import ServeConfig

    class Stop(Exception):
        pass

    def no_model(*a, **k):
        raise Stop

    monkeypatch.setattr("lmdistill.generate.hf.HFGenerator.load", no_model)
    with caplog.at_level(logging.WARNING), pytest.raises(Stop):
        serve.run_serve(ServeConfig(host="0.0.0.0"))
    assert "without an API key" in caplog.text


def test_api_key_is_sent_but_never_printed_logged_or_written(tmp_path, monkeypatch, capsys, caplog):
    """generate against a key-protected endpoint at debug verbosity: the key reaches the server and nothing else."""
    sys.path.insert(0, str(Path(__file__).parent))
    from fault_server import FaultServer
    from lmdistill.cli import run

    key = "sk-test-7f3a9c51e2d84b06"
    monkeypatch.setenv("LMDISTILL_SECURITY_KEY", key)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Question {i}?"}) + "\n" for i in range(3)))
    out = tmp_path / "gen" / "out.jsonl"
    argv = ["lmdistill", "-v", "generate", "--teacher.backend", "openai", "--teacher.api_model", "fault-model",
            "--teacher.api_key_env", "LMDISTILL_SECURITY_KEY", "--prompts.source", str(prompts), "--output", str(out),
            "--sampling.max_new_tokens", "8", "--progress", "true", "--teacher.max_retries", "0"]
    with FaultServer(api_key=key) as server, caplog.at_level(logging.DEBUG):
        monkeypatch.setattr(sys, "argv", [*argv, "--teacher.base_url", server.base_url])
        try:
            run()
        except SystemExit as e:
            assert not e.code, capsys.readouterr().err
    captured = capsys.readouterr()
    assert len(out.read_text().splitlines()) == 3  # the key was accepted: every prompt was answered
    everything = captured.out + captured.err + caplog.text
    for f in tmp_path.rglob("*"):
        if f.is_file():
            everything += f.read_text(errors="replace")
    assert caplog.text, "debug logging should have produced records to check"
    assert key not in everything
    assert key[3:15] not in everything  # not even a fragment
