"""Convert the authors' released checkpoint into this project's adapter folder.

Their layout (`model-train.py`: `DEPModel.save_pretrained` through the Trainer, plus the tokenizer): one
folder with `config.json` (model_type qwen2, `architectures` ["DEPModel"] or ["Qwen2ForCausalLM"]),
safetensors weights (`model.safetensors`, or shards named in `model.safetensors.index.json`) holding the
Qwen2 weights (`model.*`, `lm_head.weight`, vocabulary resized to the tokenizer's length) and, beside them,
their SAE and projectors (`sae.encoder.0.*`, `sae.decoder.0.*`, `align_mlp_his.{0,2}.*`,
`align_mlp_diff.{0,2}.*`, bf16), and the tokenizer with the 20 marker tokens `paper.MARKER_TOKENS`.

The converted folder:

    adapter_config.json, adapter_model.safetensors   `DEPAdapter.from_pretrained(out)` loads them: their
                                                     SAE and projectors, the same numbers (bf16 -> float32)
    llm/                                             a Qwen2ForCausalLM folder: their config (architectures
                                                     Qwen2ForCausalLM), the weights without the SAE and
                                                     projector keys (untouched shards hard-linked, else
                                                     copied), their tokenizer
    paper_checkpoint.json                            the manifest: source, encoder, marker ids, key map

`python -m dep_engine convert-paper-checkpoint SRC --out DIR`; `convert_cached(SRC)` converts once into the cache.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .adapter import DEPAdapter, DEPAdapterConfig
from .paper import MARKER_TOKENS, PAPER_CHECKPOINT, PAPER_ENCODER, PAPER_GENERATION, parameter_count
from .paths import default_cache_dir

log = logging.getLogger(__name__)

MANIFEST = "paper_checkpoint.json"
LLM_FOLDER = "llm"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

# their parameter name -> DEPAdapter's (`DEPModel.__init__`: sae, align_mlp_his, align_mlp_diff)
KEY_MAP = {
    "sae.encoder.0.weight": "sae.encoder.weight", "sae.encoder.0.bias": "sae.encoder.bias",
    "sae.decoder.0.weight": "sae.decoder.weight", "sae.decoder.0.bias": "sae.decoder.bias",
    **{f"align_mlp_{kind}.{layer}.{part}": f"{kind}_projector.{layer}.{part}"
       for kind in ("his", "diff") for layer in (0, 2) for part in ("weight", "bias")},
}
EXTRA_PREFIXES = ("sae.", "align_mlp_")  # keys a Qwen2ForCausalLM does not have
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class PaperCheckpointError(ValueError):
    """A checkpoint that is missing, cannot be downloaded, or is not in the authors' layout."""


@dataclass
class PaperCheckpoint:
    """A converted folder: where its adapter, LLM folder and manifest are, and the encoder it expects."""
    folder: Path
    llm_dir: Path
    encoder: str
    manifest: dict

    def adapter(self) -> DEPAdapter:
        return DEPAdapter.from_pretrained(self.folder)


# ---- the source ------------------------------------------------------------------------------------


def resolve_source(src: str | Path) -> Path:
    """A local folder as it is; a Hub id downloaded (a model repository first, then a dataset one: their
    README links the checkpoint as a dataset while their evaluation loads it as a model)."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if not _HUB_ID.match(str(src)) or path.exists():
        raise PaperCheckpointError(f"{src}: no such folder (and not a Hub id owner/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - a dependency of transformers
        raise PaperCheckpointError(f"{src}: not a folder, and huggingface_hub is not installed") from None
    errors = []
    for repo_type in ("model", "dataset"):
        try:
            return Path(snapshot_download(str(src), repo_type=repo_type,
                                          allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model"]))
        except Exception as err:  # noqa: BLE001 - offline, not found, gated: all say the same to the user
            errors.append(f"as a {repo_type} repository: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
    raise PaperCheckpointError(f"{src}: could not download the checkpoint from the Hugging Face Hub ("
                               + "; ".join(errors) + "). Without network access, download it elsewhere "
                               "(huggingface-cli download " + str(src) + ") and pass the local folder.")


def _weight_files(folder: Path) -> dict[str, list[str]]:
    """shard file -> its keys, from the index or the single file; refuses pickled weights."""
    if (folder / INDEX).is_file():
        try:
            weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise PaperCheckpointError(f"{folder / INDEX}: damaged index ({err})") from None
        files = sorted(set(weight_map.values()))
    elif (folder / SINGLE).is_file():
        files = [SINGLE]
    else:
        pickled = sorted(p.name for p in folder.glob("*.bin"))
        hint = f" (it holds {', '.join(pickled)}: only safetensors are read)" if pickled else ""
        raise PaperCheckpointError(f"{folder}: no {SINGLE} or {INDEX}{hint}")
    out = {}
    for name in files:
        if not (folder / name).is_file():
            raise PaperCheckpointError(f"{folder}: shard {name} named in the index is missing")
        with safe_open(folder / name, framework="pt") as handle:
            out[name] = list(handle.keys())
    return out


def _read_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise PaperCheckpointError(f"{folder}: no config.json") from None
    except json.JSONDecodeError as err:
        raise PaperCheckpointError(f"{folder / 'config.json'}: damaged ({err})") from None
    if config.get("model_type") != "qwen2":
        raise PaperCheckpointError(f"{folder}: model_type {config.get('model_type')!r}; the authors' checkpoint is "
                                   "a Qwen2 model (Qwen2.5-7B-Instruct)")
    return config


def _marker_ids(folder: Path, vocab_size: int) -> dict[str, int]:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise PaperCheckpointError(f"{folder}: no tokenizer could be loaded ({err}); the checkpoint's own "
                                   "tokenizer (with its 20 marker tokens) is needed") from None
    ids = dict(zip(MARKER_TOKENS, tokenizer.convert_tokens_to_ids(list(MARKER_TOKENS))))
    bad = [t for t, i in ids.items() if i is None or i == tokenizer.unk_token_id or i >= vocab_size]
    if bad or len(set(ids.values())) != len(ids):
        raise PaperCheckpointError(f"{folder}: the tokenizer lacks the marker tokens {', '.join(bad) or '(duplicates)'}"
                                   f" (or they lie past the vocabulary of {vocab_size})")
    return ids


# ---- conversion ------------------------------------------------------------------------------------


def _link_or_copy(source: Path, target: Path) -> str:
    try:
        os.link(source.resolve(), target)
        return "hard link"
    except OSError:
        shutil.copyfile(source.resolve(), target)
        return "copy"


def convert(src: str | Path, out: str | Path, encoder: str = PAPER_ENCODER, overwrite: bool = False) -> PaperCheckpoint:
    """Convert a checkpoint in the authors' layout (folder or Hub id) into the adapter folder `out`.

    Written into a staging folder beside `out` and moved into place whole."""
    folder = resolve_source(src)
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise PaperCheckpointError(f"{out}: exists and is not empty (pass overwrite=True / --overwrite)")
    config = _read_config(folder)
    files = _weight_files(folder)
    where = {key: name for name, keys in files.items() for key in keys}
    missing = [k for k in KEY_MAP if k not in where]
    if missing:
        raise PaperCheckpointError(f"{folder}: not the authors' DEP checkpoint: no {', '.join(missing[:4])}"
                                   f"{' ...' if len(missing) > 4 else ''} (a plain Qwen2 model has no SAE or projectors)")
    hidden, vocab = int(config["hidden_size"]), int(config["vocab_size"])
    markers = _marker_ids(folder, vocab)

    state: dict[str, torch.Tensor] = {}
    dtypes = set()
    for theirs, ours in KEY_MAP.items():
        with safe_open(folder / where[theirs], framework="pt") as handle:
            tensor = handle.get_tensor(theirs)
        dtypes.add(str(tensor.dtype).removeprefix("torch."))
        state[ours] = tensor.to(torch.float32)
    dim, code = state["sae.encoder.weight"].shape[1], state["sae.encoder.weight"].shape[0]
    if code != dim // 2 or state["his_projector.0.weight"].shape != (hidden, code) \
            or state["diff_projector.2.weight"].shape != (hidden, hidden):
        raise PaperCheckpointError(f"{folder}: SAE {dim}->{code} and projectors "
                                   f"{tuple(state['his_projector.0.weight'].shape)} do not fit hidden size {hidden}")

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    llm_dir = staging / LLM_FOLDER
    llm_dir.mkdir(parents=True)
    how = {}
    for name, keys in files.items():
        extra = [k for k in keys if k.startswith(EXTRA_PREFIXES)]
        if extra:  # rewrite the shard without their adapter's keys
            with safe_open(folder / name, framework="pt") as handle:
                kept = {k: handle.get_tensor(k) for k in keys if k not in extra}
            if kept:
                save_file(kept, llm_dir / name, metadata={"format": "pt"})
            how[name] = f"rewritten without {len(extra)} keys" if kept else "dropped (adapter keys only)"
        else:
            how[name] = _link_or_copy(folder / name, llm_dir / name)
    kept_keys = {k: n for k, n in where.items() if not k.startswith(EXTRA_PREFIXES)
                 and (llm_dir / n).exists()}
    if len(files) > 1 or (folder / INDEX).is_file():
        total = sum((llm_dir / n).stat().st_size for n in set(kept_keys.values()))
        (llm_dir / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                                 "weight_map": dict(sorted(kept_keys.items()))}, indent=2))
    llm_config = {k: v for k, v in config.items() if k != "auto_map"}
    llm_config["architectures"] = ["Qwen2ForCausalLM"]
    (llm_dir / "config.json").write_text(json.dumps(llm_config, indent=2))
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            shutil.copyfile((folder / name).resolve(), llm_dir / name)

    final_llm = out.resolve() / LLM_FOLDER
    adapter = DEPAdapter(DEPAdapterConfig(
        embedding_dim=int(dim), hidden_size=hidden, llm=str(final_llm), encoder=encoder, sae_activation="gelu",
        token_norm=None, style_features="none", trained=True,
        training={"source": str(src), "preset": "paper", "converted_from": "authors' DEPModel checkpoint",
                  "source_dtype": ",".join(sorted(dtypes)), "marker_tokens": markers}))
    full = adapter.state_dict()
    full.update(state)  # the population buffers stay zero: their checkpoint has none
    adapter.load_state_dict(full)
    adapter.save_pretrained(staging)
    manifest = {
        "format": "dep-paper-checkpoint", "version": 1, "source": str(src), "source_folder": str(folder.resolve()),
        "source_architectures": config.get("architectures"), "llm": LLM_FOLDER, "encoder": encoder,
        "hidden_size": hidden, "vocab_size": vocab, "embedding_dim": int(dim), "parameters": parameter_count(config),
        "marker_tokens": markers, "key_map": KEY_MAP, "adapter_dtype": sorted(dtypes), "shards": how,
        "generation": PAPER_GENERATION,
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
    log.info("converted %s into %s", src, out)
    return load(out)


def load(folder: str | Path) -> PaperCheckpoint:
    """A converted folder's adapter, LLM folder and encoder (raises PaperCheckpointError if it is not one)."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        raise PaperCheckpointError(f"{folder}: no {MANIFEST}; convert the checkpoint first "
                                   "(python -m dep_engine convert-paper-checkpoint SRC --out DIR)") from None
    except json.JSONDecodeError as err:
        raise PaperCheckpointError(f"{folder / MANIFEST}: damaged ({err})") from None
    llm_dir = folder / manifest.get("llm", LLM_FOLDER)
    if not (llm_dir / "config.json").is_file():
        raise PaperCheckpointError(f"{folder}: its LLM folder {llm_dir} is missing")
    return PaperCheckpoint(folder, llm_dir, manifest.get("encoder", PAPER_ENCODER), manifest)


def cached_folder(src: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Where `convert_cached` keeps the conversion of `src`: one folder per source (and, for a local
    folder, per state of its config and index), under the cache's paper/ folder."""
    path = Path(src).expanduser()
    digest = hashlib.sha256(str(path.resolve() if path.is_dir() else src).encode())
    if path.is_dir():
        for name in ("config.json", INDEX, SINGLE):
            if (path / name).is_file():
                stat = (path / name).stat()
                digest.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    slug = re.sub(r"[^A-Za-z0-9]+", "-", path.name if path.is_dir() else str(src)).strip("-")[-40:]
    return Path(cache_dir or default_cache_dir()) / "paper" / f"{slug}-{digest.hexdigest()[:12]}"


def convert_cached(src: str | Path = PAPER_CHECKPOINT, cache_dir: str | Path | None = None,
                   encoder: str = PAPER_ENCODER) -> PaperCheckpoint:
    """`src` converted once into the cache, as the bundled GGUF is de-quantized once; later calls reuse it."""
    out = cached_folder(src, cache_dir)
    if (out / MANIFEST).is_file():
        try:
            return load(out)
        except PaperCheckpointError as err:
            log.warning("cached conversion %s is damaged (%s); converting again", out, err)
    return convert(src, out, encoder=encoder, overwrite=True)


# ---- command line ----------------------------------------------------------------------------------


def add_command(subparsers) -> argparse.ArgumentParser:
    """Register `convert-paper-checkpoint SRC --out DIR` on an argparse subparsers object."""
    parser = subparsers.add_parser(
        "convert-paper-checkpoint", help="convert the authors' DEP checkpoint (folder or Hub id) into an adapter folder",
        description="Convert a checkpoint in the authors' layout (SnowCharmQ/DEP: Qwen2 weights with their SAE and "
                    "projectors, and their tokenizer) into an adapter folder that DEPAdapter.from_pretrained loads, "
                    "with the LLM beside it in llm/.")
    parser.add_argument("src", help=f"a local folder, or a Hub id such as {PAPER_CHECKPOINT} (needs network)")
    parser.add_argument("--out", help="the folder to write (default: converted once into the cache)")
    parser.add_argument("--encoder", default=PAPER_ENCODER, help="the encoder id or folder to record")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    parser.set_defaults(func=run_command)
    return parser


def run_command(args: argparse.Namespace) -> int:
    """The command's work; a PaperCheckpointError (a ValueError) propagates, as dep_engine.cli's main expects."""
    if args.out:
        result = convert(args.src, args.out, encoder=args.encoder, overwrite=args.overwrite)
    else:
        result = convert_cached(args.src, encoder=args.encoder)
    print(f"adapter: {result.folder}\nLLM:     {result.llm_dir}\nencoder: {result.encoder}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dep_engine.paper_checkpoint")
    add_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except PaperCheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
