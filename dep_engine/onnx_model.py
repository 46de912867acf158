"""The frozen LLM converted once for ONNX Runtime: input embeddings in, last-position logits out.

Why: on the CPU, PyTorch decoding of a 135M model spends as long in per-layer overheads as in
reading the weights (bench/README.md); ONNX Runtime runs a whole step in C++ with fused attention
(GroupQueryAttention, KV cache updated in place) and block-quantized MatMulNBits kernels.

The conversion is onnxruntime-genai's model builder, without the embedding layer (soft tokens go in
as `inputs_embeds`) and with logits for the last position only (a prompt needs no others). Weights
are int8 in blocks of 32: the bundled GGUF is already Q4_1 (Q8_0 embeddings), and rounding it again
to 4 bits moved logits by up to 8 and changed the top token, while int8 keeps them within ~0.6
(bench/fast_decode.py). The KV cache is int8 too by default (GroupQueryAttention's per-channel
quantized cache, ONNX Runtime 1.24+; the decoder gives the scales): each step reads the cache of a
~700-token prompt beside the weights, and int8 halves attention's time against float32.
It runs once (about 15 s) into the cache beside the de-quantized folder; a manifest written last
names the source and the sha256 of every file, so a damaged or stale conversion is found and rebuilt.
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

from filelock import FileLock

from .atomic import atomic_write
from .choices import KvCache, choice
from .paths import default_cache_dir

log = logging.getLogger(__name__)

PRECISION = "int8"
BUILDER_OPTIONS = ("exclude_embeds=true", "prune_lm_head=true")
FORMAT = 2  # bump when what is built, or how it is used, changes
MANIFEST = "dep_manifest.json"


class ConversionError(RuntimeError):
    """The model builder could not convert this LLM (an architecture it does not know, say)."""


def int8_kv_cache_supported() -> bool:
    """Whether this ONNX Runtime's GroupQueryAttention takes a quantized KV cache (k_quant_type, 1.24+)."""
    from onnxruntime.capi.onnxruntime_pybind11_state import get_all_operator_schema

    return any(schema.name == "GroupQueryAttention" and "k_quant_type" in schema.attributes
               for schema in get_all_operator_schema())


def _sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def source_key(source: Path, kv_cache: str) -> dict:
    """What the conversion depends on: the source's config and weight files, the builder and its options."""
    from onnxruntime_genai import __version__ as builder_version

    files = sorted(p for p in source.iterdir() if p.name == "config.json" or p.suffix == ".safetensors")
    return {"format": FORMAT, "source": str(source.resolve()), "precision": PRECISION,
            "options": list(BUILDER_OPTIONS), "builder": builder_version,
            "kv_cache": kv_cache,
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


def kv_scale_name(layer: int, kind: str) -> str:
    """The graph input that carries one layer's key or value cache scales, (1, kv_heads, 1, head_size)."""
    return f"kv_scales.{layer}.{kind}"


def _int8_kv_cache(path: Path) -> None:
    """Rewrite the built graph so that every layer keeps an int8 KV cache with per-channel scales as inputs."""
    import onnx

    decoder = json.loads((path.parent / "genai_config.json").read_text())["model"]["decoder"]
    heads, size = int(decoder["num_key_value_heads"]), int(decoder["head_size"])
    model = onnx.load(str(path), load_external_data=False)  # the weights stay in model.onnx.data
    graph = model.graph
    for value in list(graph.input) + list(graph.output):
        if value.name.startswith(("past_key_values.", "present.")):
            value.type.tensor_type.elem_type = onnx.TensorProto.INT8
    attention = [node for node in graph.node if node.op_type == "GroupQueryAttention"]
    for layer, node in enumerate(attention):
        inputs = list(node.input) + [""] * (12 - len(node.input))
        node.ClearField("input")
        node.input.extend(inputs[:12] + [kv_scale_name(layer, "key"), kv_scale_name(layer, "value")])
        node.attribute.extend([onnx.helper.make_attribute("k_quant_type", "PER_CHANNEL"),
                               onnx.helper.make_attribute("v_quant_type", "PER_CHANNEL"),
                               onnx.helper.make_attribute("kv_cache_bit_width", 8)])
        graph.input.extend(onnx.helper.make_tensor_value_info(kv_scale_name(layer, kind), onnx.TensorProto.FLOAT,
                                                              [1, heads, 1, size]) for kind in ("key", "value"))
    onnx.save(model, str(path))


def _build(source: Path, folder: Path, kv_cache: str) -> None:
    """Run the model builder into a staging folder, then put it in place in one rename."""
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=folder.name + ".tmp"))
    try:
        command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(source),
                   "-o", str(staging / "model"), "-p", PRECISION, "-e", "cpu", "-c", str(staging / "work"),
                   "--extra_options", *BUILDER_OPTIONS]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0 or not (staging / "model" / "model.onnx").is_file():
            raise ConversionError(f"converting {source} for ONNX Runtime failed: {done.stderr.strip()[-2000:]}")
        if kv_cache == "int8":
            _int8_kv_cache(staging / "model" / "model.onnx")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging / "model", folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def converted_folder(source: str | Path, cache_dir: Path | None = None, kv_cache: str = "int8") -> Path:
    """The ONNX Runtime folder of a transformers LLM folder, converted on first use and checked on every use.

    `kv_cache` "int8" falls back to "float32" (logged) where this ONNX Runtime has no quantized cache."""
    kv_cache = choice(KvCache, kv_cache, "kv_cache")
    if kv_cache == "int8" and not int8_kv_cache_supported():
        log.warning("this ONNX Runtime has no int8 KV cache (1.24+ has); keeping it in float32")
        kv_cache = "float32"
    source = Path(source)
    folder = (cache_dir or default_cache_dir()) / "onnx" / f"{source.name}-{PRECISION}-kv-{kv_cache}"
    key = source_key(source, kv_cache)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{folder}.lock"):  # another process (the app, a test, evaluate) may be converting it now
        problem = _problem(folder, key)
        if problem is None:
            return folder
        log.info("converting %s for ONNX Runtime into %s (%s)", source.name, folder, problem)
        _build(source, folder, kv_cache)
        files = {p.name: _sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
        manifest = json.dumps({"key": key, "files": files}, indent=1)
        atomic_write(folder / MANIFEST, lambda tmp: Path(tmp).write_text(manifest))
    return folder
