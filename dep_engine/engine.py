"""DEPEngine: data -> embeddings -> peers and differences -> adapter -> soft prompt -> LLM, for one request."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .adapter import CONFIG_NAME, AdapterError, DEPAdapter, DEPAdapterConfig
from .data import DataError, Dataset, Item, Review, Sample, by_user, load_dataset, parse_rating
from .embeddings import BUNDLED_ENCODER, Encoder
from .generation import SamplingSettings, prompt_embeddings, stream
from .llm import BUNDLED_LLM, CPU_DECODE_DTYPES, LLM, load_llm
from .prompt import MODES, PastReview, PromptIds, build_prompt, get_mode
from .store import HISTORY_RULES, PersonalContext, ReviewStore

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUNDLED_DATA = ASSETS / "data" / "amazon-mi-2014"
BUNDLED_ADAPTER = ASSETS / "adapter"


@dataclass
class EngineConfig:
    data: str = str(BUNDLED_DATA)
    encoder: str = BUNDLED_ENCODER
    llm: str = BUNDLED_LLM
    adapter: str | None = str(BUNDLED_ADAPTER)  # a missing bundled adapter means: untrained
    device: str | None = None
    four_bit: bool | None = None   # default: 4-bit NF4 on CUDA, never on the CPU
    cpu_decode: str = "bfloat16"   # on the CPU: fp32 prompts, decoding in this dtype ("float32": fp32 throughout)
    extra_reviews: str | None = None  # more reviews (file or folder) joining the pool
    style_features: bool | None = None  # rating and length beside text embeddings; default: as the adapter was trained
    cache_dir: str | None = None   # embedding cache; default: next to the data, else ~/.cache/dep-studio


def _decode_dtype(name: str) -> torch.dtype | None:
    if name not in CPU_DECODE_DTYPES:
        raise ValueError(f"cpu_decode must be one of {', '.join(CPU_DECODE_DTYPES)}, got {name!r}")
    return CPU_DECODE_DTYPES[name]


@dataclass
class PersonalizationSettings:
    k: int = 4
    history_rule: str = "relevant"      # "relevant" (dense retrieval) or "recent" (the paper's rule)
    peer_temperature: float = 1.0
    max_peers: int = 64
    words_per_review: int = 60

    def validate(self) -> None:
        if not 0 <= self.k <= 16:
            raise ValueError(f"K must be within 0-16, got {self.k}")
        if self.history_rule not in HISTORY_RULES:
            raise ValueError(f"history rule must be one of {HISTORY_RULES}, got {self.history_rule!r}")
        if not 0.01 <= self.peer_temperature <= 100:
            raise ValueError(f"peer temperature must be within 0.01-100, got {self.peer_temperature}")
        if not 1 <= self.words_per_review <= 500:
            raise ValueError(f"words per review must be within 1-500, got {self.words_per_review}")


@dataclass
class Request:
    """A user's history (before the target), the product, and the rating and title of the review."""
    profile: list[Review]
    item: Item
    rating: float
    review_title: str = ""
    cutoff: float | None = None          # peers' reviews at or after this time are not used
    extra_items: dict[str, Item] = field(default_factory=dict)  # items of a pasted history
    reference: str | None = None         # the real review, when known

    def validate(self) -> None:
        parse_rating(self.rating, "target rating")
        if not self.item.title.strip():
            raise DataError("the product needs a title")


@dataclass
class Result:
    texts: dict[str, str]
    context: PersonalContext
    notes: list[str]
    timings: dict[str, float]
    new_tokens: int = 0


class DEPEngine:
    """Loads the encoder, pool, LLM and adapter once; each call personalizes one request.

    `llm` may be passed ready-made (tests use a tiny random one); `config.llm` must then name it."""

    def __init__(self, config: EngineConfig | None = None, progress: bool = True, llm: LLM | None = None):
        self.config = config or EngineConfig()
        start = time.perf_counter()
        self.dataset: Dataset = load_dataset(self.config.data)
        self.encoder = Encoder(self.config.encoder)
        cache = Path(self.config.cache_dir) if self.config.cache_dir else _cache_beside(self.config.data)
        extra = earlier_reviews(load_dataset(self.config.extra_reviews)) if self.config.extra_reviews else None
        self.store = ReviewStore.build(self.dataset, self.encoder, cache, progress, style=self._style_features(),
                                       extra=extra, extra_cache_dir=extra and _cache_beside(self.config.extra_reviews))
        self.llm: LLM = llm or load_llm(self.config.llm, self.config.device, four_bit=self.config.four_bit,
                                        cpu_decode_dtype=_decode_dtype(self.config.cpu_decode))
        self.adapter = self._load_adapter()
        self.users = by_user(self.dataset.reviews)
        self.startup_seconds = time.perf_counter() - start

    def _style_features(self) -> bool:
        if self.config.style_features is not None:
            return self.config.style_features
        saved = Path(self.config.adapter or "") / CONFIG_NAME
        if self.config.adapter and saved.is_file():
            try:
                return bool(json.loads(saved.read_text()).get("style_features", False))
            except (json.JSONDecodeError, UnicodeDecodeError, OSError):
                return True  # the adapter's own loading will report the damage
        return True

    def _load_adapter(self) -> DEPAdapter:
        path = self.config.adapter
        expected = dict(llm=self.config.llm, hidden_size=self.llm.hidden_size, encoder=self.encoder.name,
                        embedding_dim=self.store.dim)
        if path and Path(path).exists():
            adapter = DEPAdapter.from_pretrained(path, **expected)
        elif path and Path(path) != BUNDLED_ADAPTER:
            raise AdapterError(f"{path}: no such adapter folder")
        else:
            log.warning("no trained adapter: soft prompts come from an untrained adapter")
            torch.manual_seed(0)
            adapter = DEPAdapter(DEPAdapterConfig(**expected, token_norm=self.llm.token_norm(),
                                                  style_features=self.store.style))
        return adapter.to(self.llm.device).eval().requires_grad_(False)

    @property
    def adapter_trained(self) -> bool:
        return self.adapter.config.trained

    # ---- requests ------------------------------------------------------------------------

    def user_request(self, user_id: str, item_id: str | None = None) -> Request:
        """A bundled user's request: by default their latest review, held out, with everything before it."""
        history = self.users.get(user_id)
        if not history:
            raise DataError(f"unknown user {user_id!r}")
        if item_id is None:
            target = history[-1]
        else:
            target = next((r for r in history if r.item_id == item_id), None)
            if target is None:  # an item the user never reviewed: the whole history is the profile
                return Request(profile=list(history), item=self.store.item(item_id), rating=5.0)
        return self.sample_request(Sample(target, tuple(history[:history.index(target)]), "test"))

    def sample_request(self, sample: Sample) -> Request:
        """The request of a split sample: its profile, its target's item, rating and title, its time."""
        target = sample.target
        return Request(profile=list(sample.profile), item=self.store.item(target.item_id), rating=target.rating,
                       review_title=target.title, cutoff=target.timestamp, reference=target.text)

    def context(self, request: Request, settings: PersonalizationSettings) -> PersonalContext:
        return self.store.context(request.profile, request.item, settings.k, settings.history_rule,
                                  request.cutoff, settings.peer_temperature, settings.max_peers,
                                  extra_items=request.extra_items)

    def soft_tokens(self, context: PersonalContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, H) his and diff soft tokens of a context."""
        device = self.llm.device
        with torch.no_grad():
            out = self.adapter(torch.from_numpy(context.his).to(device), torch.from_numpy(context.diff).to(device))
        return out["his_tokens"], out["diff_tokens"]

    def sae_codes(self, context: PersonalContext) -> tuple[np.ndarray, np.ndarray]:
        """The sparse codes of his and diff vectors, for showing which features fire."""
        device = self.llm.device
        with torch.no_grad():
            out = self.adapter.encode(torch.from_numpy(context.his).to(device), torch.from_numpy(context.diff).to(device))
        return out["his_code"].float().cpu().numpy(), out["diff_code"].float().cpu().numpy()

    def prompt(self, request: Request, context: PersonalContext, mode: str,
               words_per_review: int = 60) -> PromptIds:
        past = [PastReview.of(s.review, s.item_title) for s in context.selected]
        return build_prompt(self.llm.tokenizer, request.item, request.rating, request.review_title, past,
                            get_mode(mode), words_per_review)

    def max_prompt_tokens(self, max_new_tokens: int) -> int:
        return int(getattr(self.llm.model.config, "max_position_embeddings", 2048)) - max_new_tokens

    def fit_prompts(self, request: Request, context: PersonalContext, modes: Sequence[str], words_per_review: int,
                    limit: int) -> tuple[PersonalContext, list[PromptIds], list[str]]:
        """Prompts of every mode, shortened until the longest fits `limit` tokens.

        The rule: first halve the words kept per past review (down to 10), then drop the least
        relevant past review, one at a time. A note says what was cut."""
        words, notes = words_per_review, []
        while True:
            prompts = [self.prompt(request, context, mode, words) for mode in modes]
            longest = max(len(p.ids) for p in prompts)
            if longest <= limit:
                break
            if words > 10:
                words = max(10, words // 2)
            elif context.k:
                context = context.first(context.k - 1)
            else:
                raise ValueError(f"the product's title and description take {longest} tokens, more than the "
                                 f"{limit} the LLM's context leaves; shorten them")
            notes = [f"prompt shortened to fit the LLM's context ({limit} tokens): {words} words per past review, "
                     f"{context.k} past review(s)"]
        return context, prompts, notes

    def _prepare(self, request: Request, modes: Sequence[str], personalization: PersonalizationSettings,
                 sampling: SamplingSettings):
        request.validate()
        personalization.validate()
        sampling.validate()
        for mode in modes:
            get_mode(mode)
        timings: dict[str, float] = {}
        start = time.perf_counter()
        context = self.context(request, personalization)
        timings["retrieval_and_differences"] = time.perf_counter() - start
        start = time.perf_counter()
        context, prompts, cut = self.fit_prompts(request, context, modes, personalization.words_per_review,
                                                 self.max_prompt_tokens(sampling.max_new_tokens))
        timings["prompt"] = time.perf_counter() - start
        start = time.perf_counter()
        his_tokens, diff_tokens = self.soft_tokens(context)
        timings["adapter"] = time.perf_counter() - start
        start = time.perf_counter()
        embeds = [prompt_embeddings(self.llm, prompt, his_tokens if prompt.his_positions else None,
                                    diff_tokens if prompt.diff_positions else None) for prompt in prompts]
        timings["prompt"] += time.perf_counter() - start
        notes = list(context.notes) + cut
        if not context.selected and any(get_mode(m).uses_history for m in modes):
            notes.append("personalized outputs used no history, so they are baseline generations")
        if not self.adapter_trained and any(get_mode(m).soft for m in modes):
            notes.append("the adapter is UNTRAINED: soft prompts are random projections, not personalization")
        return context, embeds, notes, timings

    def generate(self, request: Request, modes: Sequence[str] = ("nonperso", "dep"),
                 personalization: PersonalizationSettings | None = None,
                 sampling: SamplingSettings | None = None) -> Result:
        """All modes decoded together with one seed; see `prompt.MODES`."""
        result = None
        for result in self.stream(request, modes, personalization, sampling):
            pass
        return result

    def stream(self, request: Request, modes: Sequence[str] = ("nonperso", "dep"),
               personalization: PersonalizationSettings | None = None,
               sampling: SamplingSettings | None = None) -> Iterator[Result]:
        """Partial results while decoding; the last one is final."""
        personalization = personalization or PersonalizationSettings()
        sampling = sampling or SamplingSettings()
        context, embeds, notes, timings = self._prepare(request, modes, personalization, sampling)
        start = time.perf_counter()
        steps = 0
        for texts in stream(self.llm, embeds, sampling):
            steps += 1
            timings["generation"] = time.perf_counter() - start
            yield Result(dict(zip(modes, texts)), context, notes, dict(timings),
                         new_tokens=min(steps, sampling.max_new_tokens))


def earlier_reviews(extra: Dataset) -> Dataset:
    """Another set's reviews less each user's latest one (their evaluation target), to join the pool."""
    return Dataset([r for history in by_user(extra.reviews).values() for r in history[:-1]], extra.items)


def _cache_beside(data: str) -> Path:
    path = Path(data)
    return (path if path.is_dir() else path.parent) / ".dep_cache"


