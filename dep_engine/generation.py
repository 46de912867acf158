"""Sampling from the frozen LLM, from input embeddings (`soft_prompt`), batched and streamed.

All prompts of one request (baseline, DEP, ablations) are decoded together in one left-padded batch:
on the CPU decoding is memory-bound, so a batch of two costs little more than one. A row stops
early at scaffolding or a loop, or (asked) at a sentence end from a word target (`hygiene.should_stop`),
and every row at the time budget.
"""
from __future__ import annotations

import concurrent.futures
import functools
import queue
import threading
import time
from typing import Iterator, Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StaticCache, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from . import hygiene, safety, vllm_backend
from .hygiene import Output
from .llm import LLM, prompt_cache
from .onnx_decode import decoder_for
from .settings import SamplingSettings
from .soft_prompt import left_pad

# One generation at a time per process: the seed is global torch state, and 2 cores gain nothing from two.
generation_lock = threading.Lock()


def _outputs(tokenizer, ids: torch.Tensor, max_new_tokens: int) -> list[Output]:
    """(B, steps) new token ids as Outputs; a row that ended has end-of-text or padding last."""
    ended = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    full = ids.shape[1] >= max_new_tokens
    return [Output(tokenizer.decode(row, skip_special_tokens=True).strip(), full and int(row[-1]) not in ended)
            for row in ids]


class _BatchStreamer(BaseStreamer):
    """Receives each step's new tokens for every row and passes the decoded texts to a queue."""

    def __init__(self, tokenizer, rows: int):
        self.tokenizer = tokenizer
        self.ids: list[list[int]] = [[] for _ in range(rows)]
        self.done = [False] * rows
        self.queue: queue.Queue = queue.Queue()
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt, which has no ids here
            self.prompt_seen = True
            return
        self.put_step(value.reshape(len(self.ids), -1)[:, -1])

    def put_step(self, tokens: torch.Tensor) -> None:
        """One step's (B,) new tokens."""
        for row, token in enumerate(tokens.tolist()):
            if self.done[row]:
                continue
            if token in self.tokenizer.all_special_ids:
                self.done[row] = True
            else:
                self.ids[row].append(token)
        self.queue.put(self.texts())

    def end(self) -> None:
        self.queue.put(None)

    def texts(self) -> list[Output]:
        return [Output(self.tokenizer.decode(ids, skip_special_tokens=True).strip()) for ids in self.ids]


class _StopWhenSet(StoppingCriteria):
    """Ends decoding early once the event is set (the reader of a stream went away)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _StopWhereHygieneCuts(StoppingCriteria):
    """Finishes each row once its text reaches scaffolding or a loop, or the sentence end after its
    row's word target in `end_after` (`hygiene.should_stop`).

    Checked every `every` steps: a row decodes at most that many tokens past its cut (which
    `hygiene.clean` removes), while big evaluation batches skip most of the decoding and matching."""

    def __init__(self, tokenizer, end_after: Sequence[int | None] = (), every: int = 4):
        self.tokenizer = tokenizer
        self.end_after = end_after
        self.every = every

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        if input_ids.shape[1] % self.every:
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        texts = self.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
        targets = list(self.end_after) or [None] * len(texts)
        return torch.tensor([hygiene.should_stop(t, words) for t, words in zip(texts, targets)], dtype=torch.bool,
                            device=input_ids.device)


class _StopAfter(StoppingCriteria):
    """Ends decoding once `seconds` have passed since decoding began (a request's time budget)."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        over = time.monotonic() >= self.deadline
        return torch.full((input_ids.shape[0],), over, dtype=torch.bool, device=input_ids.device)


class _NoEmptyReview(LogitsProcessor):
    """Keeps a row from ending (EOS) while its text, cleaned as `hygiene.clean` cleans it, holds no word.

    A small model often echoes the prompt's output fields ("[Output Review Title]: Nice") and ends
    there; hygiene strips such echoes, which left 10-20% of the plain LLM's reviews empty. A row is
    decoded and checked only at steps where EOS could be drawn (log-probability above EOS_CHANCE):
    a half-written line ("[Output") reads as a word until its label closes, so the check is made
    when the row would end, never latched earlier."""

    EOS_CHANCE = -12.0

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        eos = self.tokenizer.eos_token_id
        if eos is None:
            return scores
        for row in (scores.log_softmax(-1)[:, eos] > self.EOS_CHANCE).nonzero().flatten().tolist():
            if not hygiene.clean(self.tokenizer.decode(input_ids[row], skip_special_tokens=True)).text.strip():
                scores[row, eos] = -float("inf")
        return scores


class _NoBrackets(LogitsProcessor):
    """Keeps every token that writes "[" from being drawn (`hygiene.bracket_tokens`)."""

    def __init__(self, tokenizer):
        self.banned = torch.tensor(hygiene.bracket_tokens(tokenizer), dtype=torch.long)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores[:, self.banned.to(scores.device)] = -float("inf")
        return scores


@functools.cache
def _no_brackets(tokenizer) -> _NoBrackets:
    return _NoBrackets(tokenizer)


def logits_processors(llm: LLM, content_filter: bool = True) -> LogitsProcessorList:
    """What every method's decoding goes through before sampling: no bracket, no empty review, and (with
    the content filter) no listed word (`safety.WordMask`)."""
    processors = [_no_brackets(llm.tokenizer), _NoEmptyReview(llm.tokenizer)]
    if content_filter:
        processors.append(safety.word_mask(llm.tokenizer))
    return LogitsProcessorList(processors)


def stopping_criteria(llm: LLM, settings: SamplingSettings, stop: threading.Event | None,
                      end_after: Sequence[int | None] = ()) -> StoppingCriteriaList:
    """What ends a row early: scaffolding or loops, a sentence end after the row's word target (`end_after`,
    one per row or none), the time budget, a reader that went away."""
    criteria: list[StoppingCriteria] = [_StopWhereHygieneCuts(llm.tokenizer, end_after)]
    if settings.time_budget_s is not None:
        criteria.append(_StopAfter(settings.time_budget_s))
    if stop is not None:
        criteria.append(_StopWhenSet(stop))
    return StoppingCriteriaList(criteria)


def _prefill(llm: LLM, decoder: torch.nn.Module, batch: torch.Tensor, mask: torch.Tensor,
             max_new_tokens: int) -> StaticCache:
    """The prompt's keys and values (`prompt_cache`) handed to the decoder in a static cache."""
    prompt = prompt_cache(llm.model, batch, mask, llm.prefill_dtype)
    cache = StaticCache(config=decoder.config, max_cache_len=batch.shape[1] + max_new_tokens)
    for layer, source in zip(cache.layers, prompt.layers):
        layer.update(source.keys.to(decoder.dtype), source.values.to(decoder.dtype))
    return cache


def _generate(llm: LLM, embeds: Sequence[torch.Tensor], settings: SamplingSettings,
              streamer: _BatchStreamer | None = None, stop: threading.Event | None = None,
              end_after: Sequence[int | None] = ()) -> list[Output]:
    tokenizer = llm.tokenizer
    if (remote := vllm_backend.client_for(llm)) is not None:  # vLLM servers (vllm_backend.py), no lock: they batch
        output = remote.decode(embeds, settings, end_after, streamer.queue.put if streamer else None, stop)
        if streamer is not None:
            streamer.end()
        return output
    if (fast := decoder_for(llm)) is not None:  # the CPU default: ONNX Runtime (onnx_decode.py)
        with generation_lock, torch.inference_mode():
            output = fast.decode(embeds, settings, stopping_criteria(llm, settings, stop, end_after),
                                 tokenizer.eos_token_id,
                                 tokenizer.pad_token_id, streamer.put_step if streamer else None,
                                 logits_processors(llm, settings.content_filter))
        if streamer is not None:
            streamer.end()
        return _outputs(tokenizer, output, settings.max_new_tokens)
    batch, mask = left_pad(embeds)
    sample = settings.temperature > 0
    with generation_lock, torch.inference_mode():
        criteria = stopping_criteria(llm, settings, stop, end_after)  # the time budget counts the prompt too
        torch.manual_seed(settings.seed)
        model, prefilled = llm.model, {}
        if batch.shape[1] > 1 and (decoder := llm.decoder()) is not None:
            model, prefilled = decoder, {"cache": _prefill(llm, decoder, batch, mask, settings.max_new_tokens)}
            batch = batch.to(decoder.dtype)
        output = model.generate(
            inputs_embeds=batch, attention_mask=mask, **prefilled, max_new_tokens=settings.max_new_tokens,
            do_sample=sample, temperature=settings.temperature if sample else None,
            top_p=settings.top_p if sample else None, top_k=None, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id, streamer=streamer,
            stopping_criteria=criteria, logits_processor=logits_processors(llm, settings.content_filter))
    return _outputs(tokenizer, output, settings.max_new_tokens)


def generate(llm: LLM, embeds: Sequence[torch.Tensor], settings: SamplingSettings,
             end_after: Sequence[int | None] = ()) -> list[Output]:
    """One Output per prompt embedding; the same seed gives the same texts.

    Each row stops once it reaches scaffolding or a loop, or with `end_after` (a word target per row,
    or None) the first sentence end from its target on; the texts are as decoded, so the caller applies
    `hygiene.clean` with the same targets (and can count what it cut)."""
    return _generate(llm, embeds, settings, end_after=end_after)


def submit(llm: LLM, embeds: Sequence[torch.Tensor], settings: SamplingSettings,
           end_after: Sequence[int | None] = ()) -> concurrent.futures.Future:
    """`generate` as a Future: on vLLM servers every submitted call decodes at once (`vllm_backend`); in
    this process the call runs now and the Future is already done."""
    if (client := vllm_backend.client_for(llm)) is not None:
        return client.submit(embeds, settings, end_after)
    future: concurrent.futures.Future = concurrent.futures.Future()
    future.set_result(generate(llm, embeds, settings, end_after))
    return future


def stream(llm: LLM, embeds: Sequence[torch.Tensor], settings: SamplingSettings,
           end_after: Sequence[int | None] = ()) -> Iterator[list[Output]]:
    """The texts so far after each decoding step; the last item equals `generate`'s result (only it
    says which rows ran out of tokens).

    Closing the generator early (a user pressing Stop) ends decoding at the next step, which
    frees the model for the next request."""
    streamer = _BatchStreamer(llm.tokenizer, len(embeds))
    stop = threading.Event()
    result: dict = {}

    def work() -> None:
        try:
            result["texts"] = _generate(llm, embeds, settings, streamer, stop, end_after=end_after)
        except BaseException as err:  # re-raised in the caller's thread
            result["error"] = err
            streamer.end()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while (texts := streamer.queue.get()) is not None:
            yield texts
    finally:
        stop.set()
        thread.join()
    if "error" in result:
        raise result["error"]
    yield result["texts"]
