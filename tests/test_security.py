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


PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "marshal", "shelve", "cloudpickle"}
# Functions that unpickle (torch.load is allowed with weights_only=True; numpy.load unless allow_pickle=True).
LOADERS = {"torch.load", "numpy.load", "pandas.read_pickle", "torch.serialization.load"}


def pickle_problems(tree: ast.AST, rel: str) -> list[str]:
    """Pickle loading in one module, seen through aliases: `import torch as t` / `from torch import load as x` /
    `import pickle as p` / `getattr(torch, "load")` / `importlib.import_module("pickle")` / `x = torch.load`."""
    problems = []
    alias: dict[str, str] = {}  # local name -> dotted name it stands for
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                alias[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
                if a.name.split(".")[0] in PICKLE_MODULES:
                    problems.append(f"{rel}:{node.lineno} imports {a.name}" + (f" as {a.asname}" if a.asname else ""))
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in PICKLE_MODULES:
                problems.append(f"{rel}:{node.lineno} imports from {node.module}")
            for a in node.names:
                alias[a.asname or a.name] = f"{node.module}.{a.name}"

    def resolve(node: ast.AST) -> str:
        if isinstance(node, ast.Attribute):
            return f"{resolve(node.value)}.{node.attr}"
        if isinstance(node, ast.Name):
            return alias.get(node.id, node.id)
        if isinstance(node, ast.Call) and _dotted(node.func) == "getattr" and len(node.args) >= 2 \
                and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
            return f"{resolve(node.args[0])}.{node.args[1].value}"
        return "?"

    def canonical(name: str) -> str:
        return name.replace("np.", "numpy.", 1) if name.startswith("np.") else name

    called = set()
    for call in _calls(tree):
        called.add(id(call.func))
        name = canonical(resolve(call.func))
        if name.split(".")[0] in PICKLE_MODULES:
            problems.append(f"{rel}:{call.lineno} calls {name}")
        if name in ("importlib.import_module", "__import__") and call.args and isinstance(call.args[0], ast.Constant) \
                and str(call.args[0].value).split(".")[0] in PICKLE_MODULES:
            problems.append(f"{rel}:{call.lineno} imports {call.args[0].value} dynamically")
        if name in ("torch.load", "torch.serialization.load"):
            wo = _kw(call, "weights_only")
            if not (isinstance(wo, ast.Constant) and wo.value is True):
                problems.append(f"{rel}:{call.lineno} calls {name} without weights_only=True")
        if name == "numpy.load":
            ap = _kw(call, "allow_pickle")
            if isinstance(ap, ast.Constant) and ap.value is True:
                problems.append(f"{rel}:{call.lineno} numpy.load(allow_pickle=True)")
        if name.endswith("read_pickle"):
            problems.append(f"{rel}:{call.lineno} {name}")
    # A loader taken as a value (`f = torch.load`, `getattr(torch, "load")`) escapes the keyword check: refuse it.
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute | ast.Call) and id(node) not in called:
            name = canonical(resolve(node))
            if name in LOADERS and not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Call)
                                        and id(node.value) in called):
                problems.append(f"{rel}:{node.lineno} takes {name} as a value (call it directly, weights_only=True)")
    return problems


def test_no_pickle_loading_anywhere_in_the_package():
    """torch.load only with weights_only=True; no pickle/dill/joblib/marshal, no numpy allow_pickle, no read_pickle,
    through any alias."""
    problems = [p for path, tree in _sources() for p in pickle_problems(tree, str(path.relative_to(SRC.parent)))]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("code", [
    "from torch import load as x\nx('f')",
    "import torch as t\nt.load('f')",
    "import pickle as p\np.loads(b'')",
    "from pickle import loads",
    "import torch\ngetattr(torch, 'load')('f')",
    "import torch\nf = getattr(torch, 'load')",
    "import torch\nf = torch.load\nf('x', weights_only=True)",
    "import importlib\nimportlib.import_module('pickle')",
    "import numpy as n\nn.load('f', allow_pickle=True)",
    "from torch import serialization as s\ns.load('f')",
    "import pandas\npandas.read_pickle('f')",
])
def test_the_pickle_scan_sees_through_aliases(code):
    assert pickle_problems(ast.parse(code), "snippet.py"), code


def test_the_pickle_scan_passes_safe_loading():
    code = "import torch as t\nfrom torch import load as L\nt.load('f', weights_only=True)\nL('f', weights_only=True)"
    assert pickle_problems(ast.parse(code), "snippet.py") == []


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


# ---------------------------------------------------------------------------------------------------------------------
# issue 17: crafted cache manifests, pickle checkpoints, oversized serve requests


def _manifest_with_shard(root: Path, file: str) -> None:
    from lmdistill.cache.format import FORMAT, MANIFEST, VERSION

    root.mkdir(parents=True, exist_ok=True)
    shard = {"split": "train", "index": 0, "file": file, "blocks": [0, 1], "rows": 1, "ids": 1, "bytes": 5,
             "sha256": "0" * 64}
    (root / MANIFEST).write_text(json.dumps({"format": FORMAT, "version": VERSION, "shards": [shard]}))


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "nested_dotdot", "symlink_file", "symlink_dir"])
def test_a_manifest_shard_path_that_leaves_the_cache_is_refused(tmp_path, kind):
    from lmdistill.cache.format import read_manifest
    from lmdistill.cache.reader import CachedTeacher
    from lmdistill.errors import CacheError

    outside = tmp_path / "secret.txt"
    outside.write_text("hello")
    root = tmp_path / "cache"
    (root / "train").mkdir(parents=True)
    file = {"absolute": str(outside), "dotdot": "../secret.txt", "nested_dotdot": "train/../../secret.txt",
            "symlink_file": "train/shard-00000.safetensors", "symlink_dir": "link/secret.txt"}[kind]
    if kind == "symlink_file":
        (root / file).symlink_to(outside)
    if kind == "symlink_dir":
        (root / "link").symlink_to(tmp_path)
    _manifest_with_shard(root, file)
    for open_it in (read_manifest, CachedTeacher):
        with pytest.raises(CacheError, match="leaves the cache directory") as info:
            open_it(root)
        assert file in str(info.value) and "Traceback" not in str(info.value)


def test_a_symlink_inside_the_cache_is_accepted(tmp_path):
    from lmdistill.cache.format import contained_shard_path, read_manifest

    root = tmp_path / "cache"
    (root / "store").mkdir(parents=True)
    (root / "store" / "s.safetensors").write_text("hello")
    (root / "train").symlink_to(root / "store")
    _manifest_with_shard(root, "train/s.safetensors")
    manifest = read_manifest(root)
    assert contained_shard_path(root, manifest.shards[0].file) == root / "train" / "s.safetensors"


def test_pickle_checkpoints_are_refused_unless_allowed(tmp_path, tokenizer, capsys):
    from conftest import make_model
    from lmdistill.config import ModelConfig
    from lmdistill.errors import ModelLoadError
    from lmdistill.models import load_causal_lm

    model = make_model(tmp_path / "m", tokenizer)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "m" / "config.json").read_text())
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")  # what older save_pretrained wrote
    assert (tmp_path / "bin" / "pytorch_model.bin").is_file()
    assert not list((tmp_path / "bin").glob("*.safetensors"))
    with pytest.raises(ModelLoadError, match=r"(?s)only pickle weights \(pytorch_model.bin\).*allow_pickle=true"):
        load_causal_lm(str(tmp_path / "bin"))
    assert "arbitrary code" in ModelConfig.model_fields["allow_pickle"].description
    loaded = load_causal_lm(ModelConfig(name_or_path=str(tmp_path / "bin"), allow_pickle=True))
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    # A directory with both loads the safetensors and never touches the pickle.
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"not a pickle at all")
    assert torch.equal(load_causal_lm(str(tmp_path / "m")).lm_head.weight, model.lm_head.weight)
    # The flag reaches the CLI as a documented option.
    from lmdistill.cli import main as cli

    with pytest.raises(SystemExit):
        cli(["soft", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--teacher.allow_pickle" in help_text and "runs arbitrary code" in help_text


def test_serve_refuses_oversized_requests_and_caps_every_endpoint(capsys):
    from fastapi.testclient import TestClient

    from lmdistill.config import ModelConfig
    from lmdistill.generate.config import ServeConfig
    from lmdistill.serve import create_app

    class Tok:
        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": list(range(len(text.split())))}

        def __len__(self):
            return 100

    generator = type("G", (), {"tokenizer": Tok(), "model": None})()
    cfg = ServeConfig(model=ModelConfig(name_or_path="/x/tiny"), max_n=2, max_new_tokens_limit=8,
                      max_request_bytes=2048)
    with TestClient(create_app(generator, cfg)) as http:
        assert http.post("/tokenize", json={"prompt": "a b c"}).json()["count"] == 3
        big = "word " * 1000
        for path, body in [("/tokenize", {"prompt": big}),
                           ("/v1/completions", {"model": "tiny", "prompt": big}),
                           ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": big}]}),
                           ("/v1/completions", {"model": "tiny", "prompt": [list(range(50))] * 20, "echo": True,
                                                "max_tokens": 0, "temperature": 0})]:
            reply = http.post(path, json=body)
            assert reply.status_code == 413, (path, reply.text)
            assert "limit of 2048 bytes (max_request_bytes)" in reply.json()["error"]["message"]
        # A chunked body without Content-Length is counted as it streams in.
        chunked = http.post("/tokenize", content=(b"x" * 1000 for _ in range(5)),
                            headers={"content-type": "application/json"})
        assert chunked.status_code == 413 and "more than 2048 bytes" in chunked.json()["error"]["message"]
        # n and max_tokens are capped on every generating or scoring endpoint, the echo scoring path included.
        score = {"model": "tiny", "prompt": [1, 2, 3], "echo": True, "max_tokens": 0, "temperature": 0}
        for path, body, words in [
            ("/v1/completions", {**score, "n": 3}, "n=3 is above this server's limit of 2"),
            ("/v1/completions", {**score, "max_tokens": 9}, "max_tokens=9 is above this server's limit of 8"),
            ("/v1/completions", {"model": "tiny", "prompt": "a", "n": 3}, "limit of 2"),
            ("/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 9}, "limit of 8"),
            ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "a"}], "n": 3},
             "limit of 2"),
            ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "a"}],
                                      "max_completion_tokens": 9}, "limit of 8"),
        ]:
            reply = http.post(path, json=body)
            assert reply.status_code == 400 and words in reply.json()["error"]["message"], (path, reply.text)
