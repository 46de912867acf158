"""Reliability: damaged and mismatched files, writes that never leave half a file, no pickle anywhere.

A missing, truncated or corrupted adapter, or one trained for another LLM or encoder, is refused with
a message naming the file and the problem (by the engine, the CLI and the app); a damaged embedding
cache is rebuilt; an interrupted write leaves the previous file whole. Only safetensors, JSON and
numpy arrays without pickle are loaded, and nothing passes `trust_remote_code`.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_LLM
from dep_engine.adapter import CONFIG_NAME, WEIGHTS_NAME, AdapterError, DEPAdapter
from dep_engine.embeddings import cached_encode
from dep_engine.engine import BUNDLED_ADAPTER, DEPEngine, EngineConfig

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = json.loads((BUNDLED_ADAPTER / CONFIG_NAME).read_text())
EXPECTED = {key: BUNDLED[key] for key in ("llm", "hidden_size", "encoder", "embedding_dim")}


class Exploit:
    """Unpickling this creates a file: proof that a loader ran pickle on data it was given."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def adapter_copy(tmp_path) -> Path:
    folder = tmp_path / "adapter"
    folder.mkdir()
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        shutil.copy(BUNDLED_ADAPTER / name, folder / name)
    return folder


def _edit_config(folder: Path, **changes) -> None:
    path = folder / CONFIG_NAME
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _truncate(path: Path, keep: float = 0.5) -> None:
    path.write_bytes(path.read_bytes()[:int(path.stat().st_size * keep)])


DAMAGE = {
    "config missing": (lambda f: (f / CONFIG_NAME).unlink(), "no adapter_config.json"),
    "config truncated": (lambda f: _truncate(f / CONFIG_NAME), "damaged adapter config"),
    "config not an object": (lambda f: (f / CONFIG_NAME).write_text("[1, 2]"), "damaged adapter config"),
    "config not UTF-8": (lambda f: (f / CONFIG_NAME).write_bytes(b"\xff\xfe{\x00"), "damaged adapter config"),
    "config unknown field": (lambda f: _edit_config(f, layers=3), "damaged adapter config"),
    "weights missing": (lambda f: (f / WEIGHTS_NAME).unlink(), "no adapter_model.safetensors"),
    "weights truncated": (lambda f: _truncate(f / WEIGHTS_NAME), "damaged or mismatched weights"),
    "weights header only": (lambda f: _truncate(f / WEIGHTS_NAME, 0.001), "damaged or mismatched weights"),
    "weights random bytes": (lambda f: (f / WEIGHTS_NAME).write_bytes(os.urandom(4096)),
                             "damaged or mismatched weights"),
    "weights empty": (lambda f: (f / WEIGHTS_NAME).write_bytes(b""), "damaged or mismatched weights"),
    "weights of another shape": (lambda f: _edit_config(f, embedding_dim=384, hidden_size=576),
                                 "damaged or mismatched weights"),
    "for another LLM": (lambda f: _edit_config(f, llm="Qwen/Qwen2.5-7B-Instruct", hidden_size=3584),
                        "trained for llm = 'Qwen/Qwen2.5-7B-Instruct'"),
    "for another encoder": (lambda f: _edit_config(f, encoder="BAAI/bge-m3", embedding_dim=1026),
                            "trained for encoder = 'BAAI/bge-m3'"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_or_mismatched_adapter_is_refused_clearly(adapter_copy, damage):
    spoil, message = DAMAGE[damage]
    spoil(adapter_copy)
    expected = EXPECTED if damage != "weights of another shape" else {**EXPECTED, "embedding_dim": 384}
    with pytest.raises(AdapterError, match=message) as caught:
        DEPAdapter.from_pretrained(adapter_copy, **expected)
    assert str(adapter_copy) in str(caught.value), "the message names the folder or file"


def test_pickle_in_place_of_weights_is_never_run(adapter_copy, tmp_path):
    marker = tmp_path / "pwned"
    (adapter_copy / WEIGHTS_NAME).write_bytes(pickle.dumps(Exploit(marker)))
    (adapter_copy / "pytorch_model.bin").write_bytes(pickle.dumps(Exploit(marker)))
    with pytest.raises(AdapterError, match="damaged or mismatched weights"):
        DEPAdapter.from_pretrained(adapter_copy, **EXPECTED)
    assert not marker.exists()


def test_engine_refuses_an_adapter_for_another_llm_or_a_missing_folder(tiny_llm, tmp_path):
    """The shipped adapter was trained for SmolLM2; an engine on another LLM must not use it."""
    with pytest.raises(AdapterError, match=f"trained for llm = '{BUNDLED['llm']}', but the engine uses '{TINY_LLM}'"):
        DEPEngine(EngineConfig(llm=TINY_LLM, adapter=str(BUNDLED_ADAPTER)), progress=False, llm=tiny_llm)
    with pytest.raises(AdapterError, match="no such adapter folder"):
        DEPEngine(EngineConfig(llm=TINY_LLM, adapter=str(tmp_path / "nowhere")), progress=False, llm=tiny_llm)


@pytest.mark.parametrize("damage", ["for another LLM", "weights truncated"])
def test_cli_reports_a_bad_adapter_in_one_line(adapter_copy, tiny_llm, monkeypatch, capsys, damage):
    from dep_engine import cli, engine

    monkeypatch.setattr(engine, "load_llm", lambda *args, **kwargs: tiny_llm)
    if damage == "weights truncated":  # labelled for the tiny LLM, so the weights are what fails
        _edit_config(adapter_copy, llm=TINY_LLM, hidden_size=tiny_llm.hidden_size)
        _truncate(adapter_copy / WEIGHTS_NAME)
    code = cli.main(["generate", "--llm", TINY_LLM, "--adapter", str(adapter_copy), "--max-new-tokens", "4"])
    err = capsys.readouterr().err
    message = "damaged or mismatched weights" if damage == "weights truncated" else "trained for llm ="
    assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1


def test_app_reports_a_damaged_adapter_without_a_traceback(adapter_copy, tiny_llm, monkeypatch):
    import app

    def engine(config, progress):
        return DEPEngine(replace(config, llm=TINY_LLM), progress=progress, llm=tiny_llm)

    monkeypatch.setattr(app, "build_engine", engine)
    (adapter_copy / CONFIG_NAME).write_text("{broken")
    with pytest.raises(SystemExit) as caught:
        app.main(["--adapter", str(adapter_copy)])
    message = str(caught.value.code)
    assert message.startswith("error: ") and "damaged adapter config" in message


# ---- the embedding cache ------------------------------------------------------------------------

TEXTS = ["Bright tone, stays in tune.", "The clip broke after a week.", "Gig bag with thick padding."]


def _pickled_array(path: Path, marker: Path) -> None:
    with open(path, "wb") as out:
        np.save(out, np.array([Exploit(marker)], dtype=object), allow_pickle=True)


CACHE_DAMAGE = {
    "truncated": lambda p, m: _truncate(p),
    "empty": lambda p, m: p.write_bytes(b""),
    "random bytes": lambda p, m: p.write_bytes(os.urandom(2000)),
    "wrong shape": lambda p, m: np.save(p, np.zeros((2, 384), np.float32)),
    "wrong width": lambda p, m: np.save(p, np.zeros((3, 17), np.float32)),
    "NaN values": lambda p, m: np.save(p, np.full((3, 384), np.nan, np.float32)),
    "float64": lambda p, m: np.save(p, np.zeros((3, 384), np.float64)),
    "pickled objects": _pickled_array,
}


@pytest.mark.parametrize("damage", list(CACHE_DAMAGE))
def test_damaged_embedding_cache_is_rebuilt(encoder, tmp_path, caplog, damage):
    fresh = cached_encode(encoder, TEXTS, tmp_path, progress=False)
    (path,) = tmp_path.glob("*.npy")
    marker = tmp_path / "pwned"
    CACHE_DAMAGE[damage](path, marker)
    with caplog.at_level(logging.WARNING, logger="dep_engine.embeddings"):
        again = cached_encode(encoder, TEXTS, tmp_path, progress=False)
    assert "rebuilding" in caplog.text and path.name in caplog.text
    np.testing.assert_allclose(again, fresh, atol=1e-6)
    np.testing.assert_allclose(np.load(path, allow_pickle=False), fresh, atol=1e-6)
    assert not marker.exists() and not list(tmp_path.glob("*.tmp"))


def test_cache_of_another_encoder_is_never_read(encoder, tmp_path):
    cached_encode(encoder, TEXTS, tmp_path, progress=False)
    other = type(encoder)("some-org/another-encoder")
    other._dim, other.encode = 384, lambda texts, progress=False: np.ones((len(texts), 384), np.float32)
    assert (cached_encode(other, TEXTS, tmp_path, progress=False) == 1).all()
    assert len(list(tmp_path.glob("*.npy"))) == 2, "each encoder has its own cache file"


# ---- writes that never leave half a file ---------------------------------------------------------

def _load_atomic():
    """dep_engine/atomic.py alone, without importing torch through the package."""
    spec = importlib.util.spec_from_file_location("atomic_alone", ROOT / "dep_engine" / "atomic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("interruption", [OSError("disk full"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_interrupted_write_keeps_the_old_file(tmp_path, interruption):
    atomic = _load_atomic()
    target = tmp_path / "data.json"
    target.write_text("old and whole")

    def half_write(path: str) -> None:
        Path(path).write_text("half of the new")
        raise interruption

    with pytest.raises(type(interruption)):
        atomic.atomic_write(target, half_write)
    assert target.read_text() == "old and whole" and os.listdir(tmp_path) == ["data.json"]


def test_interrupted_adapter_save_keeps_the_old_adapter(adapter_copy, monkeypatch):
    from dep_engine import adapter as adapter_module

    before = {p.name: p.read_bytes() for p in adapter_copy.iterdir()}
    model = DEPAdapter.from_pretrained(adapter_copy)

    def crash(tensors, path):
        Path(path).write_bytes(b"\x00" * 1000)
        raise OSError("no space left on device")

    monkeypatch.setattr(adapter_module, "save_file", crash)
    with pytest.raises(OSError):
        model.save_pretrained(adapter_copy)
    assert {p.name: p.read_bytes() for p in adapter_copy.iterdir()} == before
    DEPAdapter.from_pretrained(adapter_copy, **EXPECTED)


def test_interrupted_cache_write_leaves_no_file(encoder, tmp_path, monkeypatch):
    from dep_engine import embeddings

    def crash(out, array, allow_pickle=False):
        out.write(b"\x93NUMPY half")
        raise OSError("no space left on device")

    monkeypatch.setattr(embeddings.np, "save", crash)
    with pytest.raises(OSError):
        cached_encode(encoder, TEXTS, tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_killed_writer_leaves_the_old_file_whole(tmp_path):
    """kill -9 in the middle of a write: the target is still the old file (a stray .tmp may remain)."""
    target = tmp_path / "adapter_model.safetensors"
    target.write_bytes(b"old" * 1000)
    script = (f"import importlib.util, sys, time\n"
              f"spec = importlib.util.spec_from_file_location('a', {str(ROOT / 'dep_engine' / 'atomic.py')!r})\n"
              f"atomic = importlib.util.module_from_spec(spec); spec.loader.exec_module(atomic)\n"
              f"def write(path):\n"
              f"    with open(path, 'wb') as out:\n"
              f"        out.write(b'new' * 500); out.flush(); print('writing', flush=True); time.sleep(60)\n"
              f"atomic.atomic_write({str(target)!r}, write)\n")
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "writing"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
    assert target.read_bytes() == b"old" * 1000
    assert all(p.name.endswith(".tmp") for p in tmp_path.iterdir() if p != target)


# ---- what is loaded at all ------------------------------------------------------------------------

SOURCES = sorted([*(ROOT / "dep_engine").glob("*.py"), *(ROOT / "demo").glob("*.py"), ROOT / "app.py"])
UNSAFE_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _calls(tree: ast.AST):
    """(owner, name, keywords, line) of each call: ("np", "load", ...) for np.load(...)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute):
                owner, name = getattr(func.value, "id", ""), func.attr
            else:
                owner, name = "", getattr(func, "id", "")
            yield owner, name, {k.arg: k.value for k in node.keywords}, node.lineno


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_pickle_and_no_remote_code(source):
    tree = ast.parse(source.read_text(), filename=str(source))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert not {a.name.split(".")[0] for a in node.names} & UNSAFE_MODULES, f"{source}:{node.lineno}"
        if isinstance(node, ast.ImportFrom):
            assert (node.module or "").split(".")[0] not in UNSAFE_MODULES, f"{source}:{node.lineno}"
    for owner, name, keywords, line in _calls(tree):
        where = f"{source.name}:{line}"
        assert (owner, name) not in {("torch", "load"), ("pickle", "load"), ("pickle", "loads")}, where
        if (owner, name) == ("np", "load"):
            flag = keywords.get("allow_pickle")
            assert isinstance(flag, ast.Constant) and flag.value is False, f"{where}: np.load needs allow_pickle=False"
        for flag in ("trust_remote_code", "allow_pickle"):
            value = keywords.get(flag)
            assert value is None or (isinstance(value, ast.Constant) and value.value is False), f"{where}: {flag}"
