"""The frozen LLM converted once for ONNX Runtime: input embeddings in, last-position logits out.

Why: on the CPU, PyTorch decoding of a 135M model spends as long in per-layer overheads as in
reading the weights (bench/README.md); ONNX Runtime runs a whole step in C++ with fused attention
(GroupQueryAttention, KV cache updated in place) and block-quantized MatMulNBits kernels.

The conversion is onnxruntime-genai's model builder, without the embedding layer (soft tokens go in
as `inputs_embeds`) and with logits for the last position only (a prompt needs no others). Weights
are int8 in blocks of 32: the bundled GGUF is already Q4_1 (Q8_0 embeddings), and rounding it again
to 4 bits moved logits by up to 8 and changed the top token, while int8 keeps them within ~0.6
(bench/fast_decode.py). It runs once (about 15 s) into the cache beside the de-quantized folder;
a manifest written last names the source and the sha256 of every file, so a damaged or stale
conversion is found and rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .atomic import atomic_write
from .paths import default_cache_dir

log = logging.getLogger(__name__)

PRECISION = "int8"
BUILDER_OPTIONS = ("exclude_embeds=true", "prune_lm_head=true")
FORMAT = 1  # bump when what is built, or how it is used, changes
MANIFEST = "dep_manifest.json"


class ConversionError(RuntimeError):
    """The model builder could not convert this LLM (an architecture it does not know, say)."""


def _sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def source_key(source: Path) -> dict:
    """What the conversion depends on: the source's config and weight files, the builder and its options."""
    from onnxruntime_genai import __version__ as builder_version

    files = sorted(p for p in source.iterdir() if p.name == "config.json" or p.suffix == ".safetensors")
    return {"format": FORMAT, "source": str(source.resolve()), "precision": PRECISION,
            "options": list(BUILDER_OPTIONS), "builder": builder_version,
            "files": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}}


def _problem(folder: Path, key: dict) -> str | None:
    """Why the converted folder cannot be used as it is, or None when it can."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return "not converted yet"
    except (OSError, ValueError) as err:
        return f"unreadable manifest ({err})"
    if not isinstance(manifest, dict) or manifest.get("key") != key:
        return "stale: made from another source, builder or format"
    files = manifest.get("files")
    if not isinstance(files, dict) or "model.onnx" not in files:
        return "damaged: the manifest lists no model"
    for name, digest in files.items():
        path = folder / name
        if not path.is_file() or _sha256(path) != digest:
            return f"damaged: {name} differs from the manifest"
    return None


def _build(source: Path, folder: Path) -> None:
    """Run the model builder into a staging folder, then put it in place in one rename."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=folder.name + ".tmp"))
    try:
        command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(source),
                   "-o", str(staging / "model"), "-p", PRECISION, "-e", "cpu", "-c", str(staging / "work"),
                   "--extra_options", *BUILDER_OPTIONS]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0 or not (staging / "model" / "model.onnx").is_file():
            raise ConversionError(f"converting {source} for ONNX Runtime failed: {done.stderr.strip()[-2000:]}")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging / "model", folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def converted_folder(source: str | Path, cache_dir: Path | None = None) -> Path:
    """The ONNX Runtime folder of a transformers LLM folder, converted on first use and checked on every use."""
    source = Path(source)
    folder = (cache_dir or default_cache_dir()) / "onnx" / f"{source.name}-{PRECISION}"
    key = source_key(source)
    problem = _problem(folder, key)
    if problem is None:
        return folder
    log.info("converting %s for ONNX Runtime into %s (%s)", source.name, folder, problem)
    _build(source, folder)
    files = {p.name: _sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    manifest = json.dumps({"key": key, "files": files}, indent=1)
    atomic_write(folder / MANIFEST, lambda tmp: Path(tmp).write_text(manifest))
    return folder
