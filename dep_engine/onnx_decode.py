"""Decoding on ONNX Runtime from input embeddings (soft tokens included), batched, with per-row stops.

Why a loop of our own: the converted model (`onnx_model`) takes embeddings, which onnxruntime-genai's
generator does not accept from Python, and the engine's stops (scaffolding, loops, time budget, a
closed stream) are transformers `StoppingCriteria` that must see every row after every step.

The prompts go through the PyTorch model (`OnnxDecoder`; float32, or bf16 autocast on CPUs with bf16
matrix units, `llm.LLM.prefill_dtype`), then each step runs all rows
at once in ONNX Runtime. Past and present keys/values share one buffer per layer that
GroupQueryAttention updates in place, each row at its own length, so a step copies no cache. Where
the converted model keeps the cache in int8 (`onnx_model`), its per-channel scales are fixed once per
process from the float32 model's keys and values on a calibration chat (with room, KV_SCALE_ROOM), so
a row's output never depends on its batch mates; the prompt's cache is rounded to them as ONNX
Runtime rounds each new position (round half to even, then clipped).
Sampling follows the PyTorch path's rule (temperature, then top-p as transformers' TopPLogitsWarper
keeps tokens); each row draws from its own generator seeded with the request's seed, so the same
seed gives the same text on this path, whatever else is in the batch. The nucleus is looked for
among the 1,024 likeliest tokens first: the warper's sort and sampling over all 49,152 took 11 ms
a step, as long as the model's step itself.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnxruntime as ort
import torch
from transformers import LogitsProcessorList, StoppingCriteriaList

from .llm import LLM, forward_with_cache, prompt_cache, resolve_llm
from .onnx_model import ConversionError, converted_folder, kv_scale_name
from .settings import SamplingSettings
from .soft_prompt import left_pad

log = logging.getLogger(__name__)


def sample(scores: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator,
           candidates: int = 1024) -> int:
    """A token drawn from softmax(scores / temperature) of one row, cut to its top-p nucleus: a token
    stays while the mass ranked above it is below top_p (TopPLogitsWarper's rule, at least one token)."""
    probs = (scores / temperature).softmax(-1)
    top, index = probs.topk(min(candidates, len(probs)))
    if top.sum() < top_p:  # the nucleus reaches beyond the candidates: all tokens
        top, index = probs.sort(descending=True)
    nucleus = top[:int((top.cumsum(-1) - top < top_p).sum())]
    return int(index[torch.multinomial(nucleus, 1, generator=generator)])


CALIBRATION_CHAT = [
    {"role": "system", "content": "You write product reviews in the voice of a given reviewer."},
    {"role": "user", "content": "Past reviews: 'Solid strap, soft leather, holds the guitar without slipping. Five "
                                "stars.' 'The capo buzzes on the high E string, but it is cheap and quick to move.' "
                                "'Clips on the headstock and reads fast, even in a loud room!' Now review the Fender "
                                "picks (12 pack, medium celluloid) you rated 4 of 5, titled 'Good grip'."},
    {"role": "assistant", "content": "These picks feel great in the hand and don't slide around when I strum hard. "
                                     "The medium gauge is a good middle ground for chords and single notes. Only "
                                     "downside: a couple wore down fast. Would I buy them again? Probably, yes."}]
# Real DEP prompts reach up to 4.5x the calibration's largest value in some channel (2.3x in the median
# layer's worst one), so the scales leave 4x room: over 10 held-out DEP prompts the last position's
# mean |logit error| against float32 was 0.138 (float32 cache: 0.121), 0.142 with 3x, and 1.25x clipped
# badly (largest errors 2-4). Values beyond the room clip.
KV_SCALE_ROOM = 4.0


def kv_scales(model: torch.nn.Module, tokenizer) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer, (key, value) int8 scales of shape (1, kv_heads, 1, head_size): each channel's largest
    magnitude over the calibration chat, times KV_SCALE_ROOM, over 127."""
    text = tokenizer.apply_chat_template(CALIBRATION_CHAT, tokenize=False)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        cache = forward_with_cache(model.base_model, input_ids=ids)[1]

    def scale(x: torch.Tensor) -> np.ndarray:
        return (x.float().abs().amax(dim=(0, 2), keepdim=True).clamp_min(1e-6) * KV_SCALE_ROOM / 127).numpy()
    return [(scale(layer.keys), scale(layer.values)) for layer in cache.layers]


def quantize(x: torch.Tensor, scale: np.ndarray) -> np.ndarray:
    """x rounded to int8 steps of `scale`, as GroupQueryAttention writes a new position into its cache."""
    return np.clip(np.rint(x.float().numpy() / scale), -128, 127).astype(np.int8)


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """The decoder's ONNX Runtime options: `threads` intra-op threads (default: torch's), and idle threads
    sleep instead of spinning: on 2 shared cores spinning threads slow everyone down."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


@dataclass
class _Batch:
    """One request's decoding state: cache buffers bound in place, each row's cached length, its logits."""
    lengths: np.ndarray
    logits: np.ndarray
    binding: ort.IOBinding


class OnnxDecoder:
    """The converted LLM in an ONNX Runtime session, beside the float32 PyTorch model that reads prompts.

    A prompt goes through PyTorch (all positions but the last, the rows in one left-padded batch, under
    autocast to `prefill_dtype` when given), as the bf16 path does: float32 matrix products are 2.5x
    faster than ONNX Runtime's int8 ones over a ~700-token prompt here, and bf16 ones 2x faster again on AMX
    (1.5x on AVX512-BF16). Those keys and values are copied into the cache buffers, each row from position 0; ONNX
    Runtime runs the last position and every step."""

    def __init__(self, folder: Path, model: torch.nn.Module, tokenizer, threads: int | None = None,
                 prefill_dtype: torch.dtype | None = None):
        config = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
        self.layers, self.kv_heads, self.head_size = (int(config[k]) for k in
                                                      ("num_hidden_layers", "num_key_value_heads", "head_size"))
        self.session = ort.InferenceSession(str(folder / "model.onnx"), session_options(threads),
                                            providers=["CPUExecutionProvider"])
        self.vocab = int(next(o for o in self.session.get_outputs() if o.name == "logits").shape[-1])
        int8 = next(i for i in self.session.get_inputs() if i.name == "past_key_values.0.key").type == "tensor(int8)"
        self.scales = kv_scales(model, tokenizer) if int8 else None
        self.model = model
        self.prefill_dtype = prefill_dtype
        self.embedding = model.get_input_embeddings().weight.detach().to("cpu", torch.float32).numpy()

    def _binding(self, cache: list[np.ndarray], logits: np.ndarray) -> ort.IOBinding:
        """Keys/values bound as both past and present (updated in place), logits written into `logits`."""
        binding = self.session.io_binding()
        for layer in range(self.layers):
            for kind, buffer in (("key", cache[2 * layer]), ("value", cache[2 * layer + 1])):
                value = ort.OrtValue.ortvalue_from_numpy(buffer)
                binding.bind_ortvalue_input(f"past_key_values.{layer}.{kind}", value)
                binding.bind_ortvalue_output(f"present.{layer}.{kind}", value)
            if self.scales is not None:
                for kind, scale in zip(("key", "value"), self.scales[layer]):
                    binding.bind_cpu_input(kv_scale_name(layer, kind), scale)
        binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
        return binding

    @torch.inference_mode()
    def _start(self, embeds: Sequence[torch.Tensor], capacity: int) -> _Batch:
        """The prompts' caches filled (room for `capacity` more tokens) and their last positions run."""
        batch, mask = left_pad([e.detach().to("cpu", torch.float32) for e in embeds])
        lengths = mask.sum(-1).numpy() - 1  # positions in the cache before the last one runs
        cache = [np.zeros((len(embeds), self.kv_heads, batch.shape[1] + capacity, self.head_size),
                          np.float32 if self.scales is None else np.int8) for _ in range(2 * self.layers)]
        if batch.shape[1] > 1:
            prompt = prompt_cache(self.model, batch, mask, self.prefill_dtype)
            for layer, source in enumerate(prompt.layers):
                for kind, values in enumerate((source.keys, source.values)):
                    values = (values.float().numpy() if self.scales is None
                              else quantize(values, self.scales[layer][kind]))
                    for row, length in enumerate(lengths):  # a row's own positions are its last `length` columns
                        cache[2 * layer + kind][row, :, :length] = values[row, :, batch.shape[1] - 1 - length:]
        logits = np.empty((len(embeds), 1, self.vocab), np.float32)
        state = _Batch(lengths, logits, self._binding(cache, logits))
        self._step(state, batch[:, -1:].numpy())
        return state

    def _step(self, state: _Batch, embeds: np.ndarray) -> np.ndarray:
        """One new position for every row, from its (B, 1, H) embeddings; the (B, V) logits."""
        mask = (np.arange(state.lengths.max() + 1) <= state.lengths[:, None]).astype(np.int64)
        state.binding.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds, dtype=np.float32))
        state.binding.bind_cpu_input("attention_mask", mask)
        self.session.run_with_iobinding(state.binding)
        state.lengths += 1
        return state.logits[:, 0]

    def first_logits(self, embeds: Sequence[torch.Tensor]) -> np.ndarray:
        """(B, V) logits at each prompt's last position: what the first new token is drawn from."""
        return self._start(embeds, 0).logits[:, 0]

    def decode(self, embeds: Sequence[torch.Tensor], settings: SamplingSettings, stopping: StoppingCriteriaList,
               eos_token_id: int, pad_token_id: int, on_step: Callable[[torch.Tensor], None] | None = None,
               processors: LogitsProcessorList | None = None) -> torch.Tensor:
        """(B, steps) new token ids; a row ends at EOS or when `stopping` says so, later steps give it padding.

        `on_step` gets each step's (B,) tokens; `stopping(ids, scores)` sees all rows' ids after every step;
        `processors(ids, scores)` (transformers logits processors) adjust each step's scores before sampling."""
        state = self._start(embeds, settings.max_new_tokens)
        scores = state.logits[:, 0]
        generators = [torch.Generator().manual_seed(settings.seed) for _ in embeds]
        ids = torch.empty((len(embeds), 0), dtype=torch.long)
        unfinished = torch.ones(len(embeds), dtype=torch.bool)
        for step in range(settings.max_new_tokens):
            step_scores = torch.from_numpy(scores)
            if processors is not None:
                step_scores = processors(ids, step_scores)
            if settings.temperature > 0:
                tokens = torch.tensor([sample(row, settings.temperature, settings.top_p, generator)
                                       for row, generator in zip(step_scores, generators)])
            else:
                tokens = step_scores.argmax(-1)
            tokens = torch.where(unfinished, tokens, pad_token_id)
            ids = torch.cat([ids, tokens[:, None]], dim=1)
            if on_step is not None:
                on_step(tokens)
            unfinished &= (tokens != eos_token_id) & ~stopping(ids, step_scores)
            if not unfinished.any() or step == settings.max_new_tokens - 1:
                break
            scores = self._step(state, self.embedding[tokens.numpy()][:, None])
        return ids


def load_decoder(name: str, source: str | Path, model: torch.nn.Module, tokenizer, kv_cache: str = "int8",
                 prefill_dtype: torch.dtype | None = None) -> OnnxDecoder:
    """The decoder of a transformers LLM folder, converted on first use (`ConversionError` if it cannot be);
    prompts run under autocast to `prefill_dtype` when given."""
    if not Path(source).is_dir():
        raise ConversionError(f"{name}: ONNX Runtime decoding needs the LLM as a local transformers folder")
    return OnnxDecoder(converted_folder(source, kv_cache=kv_cache), model, tokenizer, prefill_dtype=prefill_dtype)


_decoders: dict[tuple, OnnxDecoder] = {}


def decoder_for(llm: LLM) -> OnnxDecoder | None:
    """The LLM's ONNX Runtime decoder, converted and loaded on first use; None when `llm` decodes in
    PyTorch (not on the CPU, or not asked), or when its LLM cannot be converted (logged once; from then
    on PyTorch decodes)."""
    if not llm.onnx_decode or llm.device.type != "cpu":
        return None
    key = (id(llm.model), llm.onnx_kv_cache, llm.prefill_dtype)
    if key not in _decoders:
        try:
            _decoders[key] = load_decoder(llm.name, resolve_llm(llm.name)[0], llm.model, llm.tokenizer,
                                          llm.onnx_kv_cache, llm.prefill_dtype)
        except ConversionError as err:
            log.warning("%s; decoding in PyTorch instead", err)
            llm.onnx_decode = False
            return None
    return _decoders[key]
