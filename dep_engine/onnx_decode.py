"""Decoding on ONNX Runtime from input embeddings (soft tokens included), batched, with per-row stops.

Why a loop of our own: the converted model (`onnx_model`) takes embeddings, which onnxruntime-genai's
generator does not accept from Python, and the engine's stops (scaffolding, loops, time budget, a
closed stream) are transformers `StoppingCriteria` that must see every row after every step.

Each prompt is prefilled on its own (no work on padding; every row's cache starts at position 0),
then each step runs all rows at once. Past and present keys/values share one buffer per layer that
GroupQueryAttention updates in place, each row at its own length, so a step copies no cache.
Sampling follows the PyTorch path's rule (temperature, then top-p as transformers' TopPLogitsWarper
keeps tokens); each row draws from its own generator seeded with the request's seed, so the same
seed gives the same text on this path, whatever else is in the batch. The nucleus is looked for
among the 1,024 likeliest tokens first: the warper's sort and sampling over all 49,152 took 11 ms
a step, as long as the model's step itself.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnxruntime as ort
import torch
from transformers import StoppingCriteriaList

from .onnx_model import ConversionError, converted_folder
from .settings import SamplingSettings


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


class OnnxDecoder:
    """One ONNX Runtime session of the converted LLM and the token embeddings that feed it."""

    def __init__(self, folder: Path, embedding: torch.Tensor, threads: int | None = None):
        config = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
        self.layers, self.kv_heads, self.head_size = (int(config[k]) for k in
                                                      ("num_hidden_layers", "num_key_value_heads", "head_size"))
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        # Idle threads sleep instead of spinning: on 2 shared cores spinning halved decode speed (bench).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
        self.vocab = int(next(o for o in self.session.get_outputs() if o.name == "logits").shape[-1])
        self.embedding = embedding.detach().to("cpu", torch.float32).numpy()  # shares the fp32 model's table

    def _binding(self, cache: list[np.ndarray], logits: np.ndarray) -> ort.IOBinding:
        """Keys/values bound as both past and present (updated in place), logits written into `logits`."""
        binding = self.session.io_binding()
        for layer in range(self.layers):
            for kind, buffer in (("key", cache[2 * layer]), ("value", cache[2 * layer + 1])):
                value = ort.OrtValue.ortvalue_from_numpy(buffer)
                binding.bind_ortvalue_input(f"past_key_values.{layer}.{kind}", value)
                binding.bind_ortvalue_output(f"present.{layer}.{kind}", value)
        binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
        return binding

    def _run(self, binding: ort.IOBinding, embeds: np.ndarray, mask: np.ndarray) -> None:
        binding.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds, dtype=np.float32))
        binding.bind_cpu_input("attention_mask", mask)
        self.session.run_with_iobinding(binding)

    def logits(self, embeds: Sequence[torch.Tensor], capacity: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
        """Last-position logits (B, V) of each prompt, and the filled cache (room for `capacity` more tokens)."""
        rows = [e.detach().to("cpu", torch.float32).numpy() for e in embeds]
        length = max(len(r) for r in rows) + capacity
        cache = [np.zeros((len(rows), self.kv_heads, length, self.head_size), np.float32)
                 for _ in range(2 * self.layers)]
        logits = np.empty((len(rows), 1, self.vocab), np.float32)
        for row, embed in enumerate(rows):
            binding = self._binding([c[row:row + 1] for c in cache], logits[row:row + 1])
            self._run(binding, embed[None], np.ones((1, len(embed)), np.int64))
        return logits[:, 0], cache

    def decode(self, embeds: Sequence[torch.Tensor], settings: SamplingSettings, stopping: StoppingCriteriaList,
               eos_token_id: int, pad_token_id: int,
               on_step: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """(B, steps) new token ids; a row ends at EOS or when `stopping` says so, later steps give it padding.

        `on_step` gets each step's (B,) tokens; `stopping(ids, scores)` sees all rows' ids after every step."""
        scores, cache = self.logits(embeds, settings.max_new_tokens)
        lengths = np.array([len(e) for e in embeds])
        logits = np.empty((len(embeds), 1, self.vocab), np.float32)
        binding = self._binding(cache, logits)
        generators = [torch.Generator().manual_seed(settings.seed) for _ in embeds]
        ids = torch.empty((len(embeds), 0), dtype=torch.long)
        unfinished = torch.ones(len(embeds), dtype=torch.bool)
        for step in range(settings.max_new_tokens):
            step_scores = torch.from_numpy(scores)
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
            mask = (np.arange(lengths.max() + 1) <= lengths[:, None]).astype(np.int64)
            self._run(binding, self.embedding[tokens.numpy()][:, None], mask)
            lengths += 1
            scores = logits[:, 0]
        return ids


def load_decoder(name: str, source: str | Path, embedding: torch.Tensor) -> OnnxDecoder:
    """The decoder of a transformers LLM folder, converted on first use (`ConversionError` if it cannot be)."""
    if not Path(source).is_dir():
        raise ConversionError(f"{name}: ONNX Runtime decoding needs the LLM as a local transformers folder")
    return OnnxDecoder(converted_folder(source), embedding)
