"""Loading the frozen LLM: the bundled SmolLM2 GGUF by default, any Hugging Face causal LM by id or path.

The GGUF is de-quantized once and kept as a safetensors folder in the cache, so later starts skip
the conversion. On CUDA the model is loaded in 4-bit NF4 (bitsandbytes) with bf16 compute.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import logging
import os
import platform
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .choices import CpuBackend, CpuDecode, CpuPrefill, choice
from .paths import bundled_gguf, default_cache_dir

log = logging.getLogger(__name__)

BUNDLED_LLM = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass
class LLM:
    """The frozen model. With `decode_dtype` set (the CPU default: bfloat16), prompts run in the
    model (see `prefill_dtype`) and decoding in a copy of it in `decode_dtype`: bf16 decoding reads half the
    bytes per token (bench/generation.py). With `onnx_decode` (the CPU default) ONNX Runtime generates
    instead, from int8 weights (`onnx_decode` module, 3x+ faster per token); the PyTorch model stays
    for embeddings, training and GPUs. With `prefill_dtype` set, prompts before decoding run under
    autocast to it: bf16 prompts are 2-4x faster than fp32 ones on CPUs with AMX, 1.5x on AVX512-BF16
    (AMD Zen 4), and 6x slower on CPUs with neither (bench/fast_decode.py, bench/generation.py)."""
    model: torch.nn.Module
    tokenizer: object
    name: str
    device: torch.device
    decode_dtype: torch.dtype | None = None
    onnx_decode: bool = False
    onnx_kv_cache: str = "int8"  # the ONNX Runtime decoder's KV cache: int8 (faster) or float32
    prefill_dtype: torch.dtype | None = None  # autocast dtype of prompts (and training's forward passes); None: the model's
    notes: list[str] = field(default_factory=list)  # how loading departed from what was asked
    _decoder: torch.nn.Module | None = field(default=None, init=False, repr=False)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    def decoder(self) -> torch.nn.Module | None:
        """The copy of the model that decodes, made on first use; None when the model decodes itself."""
        if self.decode_dtype is None or self.decode_dtype == self.dtype:
            return None
        if self._decoder is None:
            self._decoder = copy.deepcopy(self.model).to(self.decode_dtype).eval().requires_grad_(False)
        return self._decoder

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids.to(self.device))

    def token_norm(self) -> float:
        """Median norm of the LLM's token embeddings: the scale a soft token should live at."""
        return float(self.model.get_input_embeddings().weight.float().norm(dim=-1).median())


def autocast_to(dtype: torch.dtype | None, device_type: str = "cpu"):
    """A context in which the LLM's forward passes run under autocast to `dtype`; nothing when None."""
    return torch.autocast(device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def forward_with_cache(model: torch.nn.Module, cache=None, **inputs):
    """(output, KV cache) of `model(**inputs)` continuing `cache`, under the keyword this transformers
    version takes: `cache` in current 5.x releases, `past_key_values` in earlier ones (a GPU image may lag)."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(**inputs, use_cache=True, **({name: cache} if cache is not None else {}))
    return out, getattr(out, name)


def prompt_cache(model: torch.nn.Module, batch: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype | None = None):
    """Keys and values of all prompt positions but the last, from `model` (under autocast to `dtype`
    if given, else in its own dtype), for a decoder that runs the last position itself (a bf16 copy,
    or ONNX Runtime)."""
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as generate numbers left-padded rows
    with autocast_to(dtype, batch.device.type):
        return forward_with_cache(model.base_model, inputs_embeds=batch[:, :-1], attention_mask=mask[:, :-1],
                                  position_ids=positions[:, :-1])[1]



def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _dequantized_folder(gguf: Path) -> Path:
    """A transformers folder holding the GGUF's weights, made once (about 20 s) and reused."""
    folder = default_cache_dir() / "llm" / f"{gguf.stem}-{gguf.stat().st_size}"
    if (folder / "config.json").exists() and any(folder.glob("*.safetensors")):
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("de-quantizing %s once into %s", gguf.name, folder)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None  # the weights are plain tensors now; only the marker blocks saving
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(staging, folder)  # whole folder appears at once
    return folder


def resolve_llm(name: str) -> tuple[str, str | None]:
    """(path or id for from_pretrained, gguf file name or None)."""
    if name == BUNDLED_LLM and (gguf := bundled_gguf()) is not None:
        return str(_dequantized_folder(gguf)), None
    path = Path(name)
    if path.suffix == ".gguf" and path.is_file():
        return str(path.parent), path.name
    return name, None


CPU_DECODE_DTYPES = {CpuDecode.BFLOAT16: torch.bfloat16, CpuDecode.FLOAT32: None}  # None: the model decodes itself


def cpu_has_fast_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU multiplies bf16 in hardware, as Linux reports it (`cpuinfo`: /proc/cpuinfo's text):
    Intel AMX-BF16 (Sapphire Rapids and later) or AVX512-BF16 dot products (AMD Zen 4 and later, Intel
    Cooper Lake); False where that cannot be read."""
    return bool(bf16_units(cpuinfo))


def bf16_units(cpuinfo: str | None = None) -> list[str]:
    """The bf16 units among the CPU's flags (`cpuinfo`: /proc/cpuinfo's text; none where it cannot be read)."""
    return sorted({"amx_bf16", "avx512_bf16"} & set((_cpuinfo() if cpuinfo is None else cpuinfo).split()))


def cpu_model() -> str:
    """The CPU's model name as Linux reports it, else `platform.processor()`."""
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def forward_setup(llm: "LLM") -> dict[str, str]:
    """Where and in what precision the LLM's forward passes run. Per-sample losses of bf16 forwards differ
    between CPU kinds (one review's by up to 0.03 nats per token, median 0.004, the mean over 120 validation
    reviews by 0.0006), so a report of losses says which it came from, and runs are paired on one kind."""
    return {"device": str(llm.device), "cpu": cpu_model(), "bf16_units": ",".join(bf16_units()) or "none",
            "prefill_dtype": str(llm.prefill_dtype or llm.model.dtype).replace("torch.", "")}


def decoding(llm: "LLM") -> str:
    """Which path wrote the texts: ONNX Runtime (int8 weights) with its KV cache, or PyTorch in a dtype."""
    if llm.onnx_decode and llm.device.type == "cpu":
        return f"onnx runtime, int8 weights, {llm.onnx_kv_cache} KV cache"
    return f"torch, {str(llm.decode_dtype or llm.dtype).replace('torch.', '')}"


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _prefill_dtype(cpu_prefill: str) -> torch.dtype | None:
    cpu_prefill = choice(CpuPrefill, cpu_prefill, "cpu_prefill")
    if cpu_prefill == "auto":
        cpu_prefill = "bfloat16" if cpu_has_fast_bf16() else "float32"
    return torch.bfloat16 if cpu_prefill == "bfloat16" else None


_loaded: dict[tuple, LLM] = {}
_load_lock = threading.Lock()


def load_llm(name: str = BUNDLED_LLM, device: str | torch.device | None = None,
             dtype: torch.dtype | None = None, four_bit: bool | None = None,
             cpu_decode_dtype: torch.dtype | None = torch.bfloat16, cpu_backend: str = "onnx",
             cpu_kv_cache: str = "int8", cpu_prefill: str = "auto") -> LLM:
    """The frozen LLM, its weights loaded once per process for each (name, device, dtype).

    Defaults: float32 on the CPU (CPUs without bf16 matrix units run bf16 prompts and training
    2-6x slower, see bench/), decoding in `cpu_decode_dtype` (None: float32 throughout); on CUDA
    4-bit NF4 weights with bf16 compute; `cpu_backend` "onnx" generates on the CPU with ONNX Runtime,
    whose KV cache is `cpu_kv_cache` ("int8" or "float32"); prompts before CPU decoding, and training's
    forward passes, run in `cpu_prefill` ("auto": bfloat16 where the CPU has bf16 matrix units, else float32).
    LLMs that differ only in how they decode share the weights."""
    device = torch.device(device) if device is not None else default_device()
    four_bit = (device.type == "cuda") if four_bit is None else four_bit
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    cpu_backend = choice(CpuBackend, cpu_backend, "cpu_backend")
    decode_dtype = cpu_decode_dtype if device.type == "cpu" else None
    onnx = device.type == "cpu" and cpu_backend == "onnx"
    prefill_dtype = _prefill_dtype(cpu_prefill) if device.type == "cpu" else None
    weights_key = (name, str(device), dtype, four_bit)
    key = weights_key + (decode_dtype, onnx, cpu_kv_cache, prefill_dtype)
    with _load_lock:
        if key not in _loaded:
            loaded = next((llm for k, llm in _loaded.items() if k[:len(weights_key)] == weights_key), None)
            _loaded[key] = dataclasses.replace(loaded or _load(name, device, dtype, four_bit, decode_dtype),
                                               decode_dtype=decode_dtype, onnx_decode=onnx,
                                               onnx_kv_cache=cpu_kv_cache, prefill_dtype=prefill_dtype)
        return _loaded[key]


def load_tokenizer(name: str = BUNDLED_LLM):
    """The LLM's tokenizer alone (no weights loaded), from the same source `load_llm` reads."""
    from transformers import AutoTokenizer

    source, gguf_file = resolve_llm(name)
    return AutoTokenizer.from_pretrained(source, **({"gguf_file": gguf_file} if gguf_file else {}))


def _load(name: str, device: torch.device, dtype: torch.dtype, four_bit: bool,
          decode_dtype: torch.dtype | None) -> LLM:
    from transformers import AutoModelForCausalLM

    source, gguf_file = resolve_llm(name)
    kwargs: dict = {"dtype": dtype}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    else:
        kwargs["use_safetensors"] = True  # never unpickle weights of a user-chosen model
    notes: list[str] = []
    model = None
    if four_bit:
        from transformers import BitsAndBytesConfig

        try:
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs, device_map={"": device.index or 0},
                                                         quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16))
        except (ImportError, RuntimeError, ValueError) as err:  # no bitsandbytes, or no kernels for this device
            notes.append(f"4-bit NF4 loading failed ({type(err).__name__}: {str(err)[:120]}); the LLM runs in "
                         f"{str(dtype).removeprefix('torch.')} instead")
            log.warning(notes[-1])
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs).to(device)
    model.eval().requires_grad_(False)
    tokenizer = load_tokenizer(name)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"LLM {name!r} has no chat template; DEP needs an instruction-tuned chat model")
    return LLM(model=model, tokenizer=tokenizer, name=name, device=device, decode_dtype=decode_dtype, notes=notes)
