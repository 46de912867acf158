"""PaperEngine: the authors' DEP (their released checkpoint, their exact inputs) behind DEPEngine's interface.

`EngineConfig(preset="paper")` (`--preset paper`): the checkpoint in the authors' layout (`--adapter`: a
folder or Hub id, converted once into the cache, or a folder `convert-paper-checkpoint` wrote) supplies the
LLM, its tokenizer with the 20 marker tokens, the SAE and the two projectors; `paper.py` builds each
request's prompt and his/diff vectors from BGE-M3 vectors of the pool (computed once and cached), as the
authors' code does. Decoding, streaming, hygiene, the time budget and the content filter are the engine's
own, so the CLI, `evaluate` and the app run the preset as they run the bundled adapter. The pool's MiniLM
store still serves what only the app shows: the catalog, the reviewer list, the voice check.

The preset writes two modes: `dep` (the authors' prompt with the soft tokens) and `nonperso` (their prompt
without the past reviews). Their checkpoint has no population-average reviewer, so `generic`, a strength
and another user's vectors are this project's and refused here.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from . import paper, paper_checkpoint
from .adapter import AdapterError, DEPAdapter
from .choices import Preset
from .data import Review
from .embeddings import cached_encode
from .engine import DEPEngine, EngineConfig, Prepared, Request, embedding_cache_dir, end_after_words
from .llm import LLM, default_device
from .paths import BUNDLED_ADAPTER
from .settings import PersonalizationSettings, SamplingSettings
from .store import PersonalContext, Peer, SelectedReview

log = logging.getLogger(__name__)

PAPER_MODES = ("nonperso", "dep")


def paper_checkpoint_for(source: str | None) -> paper_checkpoint.PaperCheckpoint:
    """A converted folder as it is; a folder or Hub id in the authors' layout converted once into the cache;
    nothing (or the bundled adapter, the studio preset's default) means the authors' own `SnowCharmQ/DEP-model`."""
    if not source or Path(source) == BUNDLED_ADAPTER:
        source = paper.PAPER_CHECKPOINT
    if (Path(source) / paper_checkpoint.MANIFEST).is_file():
        return paper_checkpoint.load(source)
    return paper_checkpoint.convert_cached(source)


def local_encoder(name: str) -> Path:
    """The paper encoder's folder: `name` itself, or a Hub id downloaded once (needs network)."""
    if Path(name).is_dir():
        return Path(name)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as err:  # noqa: BLE001 - offline, unknown id: the same advice
        raise paper.PaperPresetError(f"{name}: no such encoder folder, and the Hub could not provide it "
                                     f"({type(err).__name__}); download {paper.PAPER_ENCODER} and pass its folder "
                                     "with --paper-encoder") from None


class PaperEngine(DEPEngine):
    """The `paper` preset: `DEPEngine` with the authors' checkpoint and input pipeline.

    `paper_encoder` may be passed ready-made (tests pass a tiny random one), as `llm` may."""

    def __init__(self, config: EngineConfig | None = None, progress: bool = True, llm: LLM | None = None,
                 paper_encoder: paper.PaperEncoder | None = None):
        config = config or EngineConfig(preset=Preset.PAPER)
        self.checkpoint = paper_checkpoint_for(config.adapter)
        self.device_note = paper.check_device(config.device or default_device(),
                                              int(self.checkpoint.manifest["parameters"]), config.allow_cpu)
        config = dataclasses.replace(config, preset=Preset.PAPER, llm=str(self.checkpoint.llm_dir),
                                     adapter=str(self.checkpoint.folder))
        super().__init__(config, progress, llm)
        paper.marker_ids(self.llm.tokenizer)  # refuses a tokenizer without the checkpoint's markers now
        self.paper_encoder = paper_encoder or paper.PaperEncoder(local_encoder(config.paper_encoder),
                                                                 name=config.paper_encoder, device=str(self.llm.device))
        cache = Path(config.cache_dir) if config.cache_dir else embedding_cache_dir(config.data)
        vectors = cached_encode(self.paper_encoder, [r.text for r in self.dataset.reviews], cache,
                                "paper-reviews", progress)
        self.paper_pool = paper.PaperPool(self.dataset.reviews, vectors)
        self._pool_reviews = {user: sorted(history, key=lambda r: r.timestamp) for user, history in self.users.items()}

    def _load_adapter(self) -> DEPAdapter:
        adapter = self.checkpoint.adapter()
        if adapter.config.hidden_size != self.llm.hidden_size:
            raise AdapterError(f"{self.checkpoint.folder}: projectors for hidden size {adapter.config.hidden_size}, "
                               f"but its LLM has {self.llm.hidden_size}")
        return adapter.to(self.llm.device).eval().requires_grad_(False)

    @property
    def adapter_trained(self) -> bool:
        return True  # the authors' trained checkpoint

    @property
    def population_from_another_pool(self) -> bool:
        return False  # no population-average reviewer is used

    def prepare(self, request: Request, modes: Sequence[str] = PAPER_MODES,
                personalization: PersonalizationSettings | None = None,
                sampling: SamplingSettings | None = None) -> Prepared:
        """The authors' prompt and soft tokens for `dep`, their prompt without past reviews for `nonperso`;
        `personalization` does not apply (their pipeline fixes K = 8, the history and the peers)."""
        sampling = sampling or SamplingSettings()
        request.validate()
        refused = [m for m in modes if m not in PAPER_MODES]
        if refused:
            raise ValueError(f"the paper preset writes {' and '.join(PAPER_MODES)}, not {', '.join(map(repr, refused))}"
                             " (its checkpoint has no population-average reviewer or separate his/diff modes)")
        timings: dict[str, float] = {}
        start = time.perf_counter()
        tokenizer, items = self.llm.tokenizer, {**self.store.items, **request.extra_items}
        built = (paper.build_request(self.paper_pool, tokenizer, request.profile, request.item, request.rating,
                                     request.review_title, items, encoder=self.paper_encoder)
                 if "dep" in modes else None)
        timings["retrieval_and_differences"] = time.perf_counter() - start
        start = time.perf_counter()
        prompts = {"dep": built.prompt} if built else {}
        if "nonperso" in modes:  # their prompt without the past reviews
            prompts["nonperso"] = paper.build_prompt(tokenizer, request.item, request.rating, request.review_title,
                                                     [], items)
        embeds = []
        for mode in modes:
            ids = torch.tensor([prompts[mode].input_ids], device=self.llm.device)
            with torch.no_grad():
                if mode == "dep" and len(built.his):
                    his, diff = paper.soft_tokens(self.adapter, built.his.to(self.llm.device),
                                                  built.diff.to(self.llm.device), self._adapter_dtype)
                    embeds.append(paper.paper_inputs_embeds(self.llm.model, ids, his, diff, tokenizer)[0])
                else:
                    embeds.append(self.llm.embed(ids[0]))
        timings["adapter"] = time.perf_counter() - start
        context = self._context(built.history if built else None, items)
        notes = list(self.llm.notes) + [self.device_note] * bool(self.device_note) + (built.notes if built else [])
        return Prepared(context, {mode: prompts[mode].text for mode in modes}, embeds, notes, timings,
                        end_after_words(request.profile, sampling))

    @property
    def _adapter_dtype(self) -> torch.dtype | None:
        """On a GPU the SAE and projectors run in bf16, as `DEPModel.forward` ran them; float32 on the CPU."""
        return torch.bfloat16 if self.llm.device.type == "cuda" else None

    def _context(self, history: paper.PaperHistory | None, items: dict) -> PersonalContext:
        """The evidence the app and CLI show: the reviews whose vectors fill the slots, their peers and weights
        (relevance is not part of the authors' rule: NaN), and the his and diff vectors."""
        if history is None:
            return PersonalContext([], np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32))
        selected = []
        for j, peers in zip(history.selected, history.peers):
            review: Review = history.profile[j]
            item = items.get(review.item_id)
            selected.append(SelectedReview(review, item.title if item else review.item_id, float("nan"),
                                           [self._peer(user, index, weight) for user, index, weight in peers], False))
        return PersonalContext(selected, history.his.numpy(), history.diff.numpy())

    def _peer(self, user: str, index: int, weight: float) -> Peer:
        review = self._pool_reviews[user][index]  # `PaperPool`'s entry (user, index): their time order
        return Peer(user, review.item_id, review.text, review.rating, weight)

    def method_embeddings(self, request: Request, own: PersonalContext, borrowed: PersonalContext,
                          methods: Sequence, personalization: PersonalizationSettings) -> list[torch.Tensor]:
        """`evaluate`'s rows: `nonperso` and `dep` only, at the authors' K, with the user's own vectors."""
        for method in methods:
            if method.mode not in PAPER_MODES or method.shuffled or method.strength != 1:
                raise ValueError(f"method {method.name!r}: the paper preset evaluates nonperso and dep")
        return self.prepare(request, [m.mode for m in methods]).embeds


def build_engine(config: EngineConfig, progress: bool = True) -> DEPEngine:
    """The engine a config asks for: `PaperEngine` for the paper preset, else `DEPEngine`."""
    return PaperEngine(config, progress) if config.preset == Preset.PAPER else DEPEngine(config, progress)
