"""DEPEngine: data -> embeddings -> peers and differences -> adapter -> soft prompt -> LLM, for one request.

    engine = DEPEngine()                                   # bundled data, encoder, LLM, adapter
    request = engine.user_request("A2EZWZ8MBEDOLN")        # a bundled user's latest review, held out
    result = engine.generate(request, ("generic", "dep"))  # result.texts["dep"], result.context, result.prompts
"""
from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from . import hygiene, safety, vllm_backend, voice
from .adapter import CONFIG_NAME, AdapterError, DEPAdapter, DEPAdapterConfig
from .choices import Backend, CpuBackend, CpuDecode, CpuPrefill, KvCache, Preset, StyleFeatures, choice
from .data import DataError, Dataset, Item, Review, Sample, by_user, data_fingerprint, load_dataset, parse_history, \
    parse_rating, profile_before, without_twins
from .embeddings import BUNDLED_ENCODER, Encoder, style_set
from .generation import Output, stream
from .llm import BUNDLED_LLM, CPU_DECODE_DTYPES, LLM, load_llm
from .onnx_decode import decoder_for
from .paths import BUNDLED_ADAPTER, BUNDLED_DATA
from .prompt import WORDS_PER_REVIEW, PastReview, PromptIds, PromptLayout, build_prompt, get_mode, readable_prompt, \
    typical_length
from .settings import PersonalizationSettings, SamplingSettings, described
from .soft_prompt import prompt_embeddings
from .store import PersonalContext, ReviewStore
from .voice import VoiceCheck

log = logging.getLogger(__name__)

# what a result's notes say of each hygiene cut (`hygiene.Cleaned.reason`)
_CUT_NOTES = {"scaffolding": "cut where the model began to write scaffolding",
              "repetition": "cut where the model began to write repetition",
              "token limit": "ended at its last full sentence: the {limit}-token limit came mid-sentence",
              "length": "ended at its first sentence end from {words} words on (the user's typical length)"}


@dataclass
class EngineConfig:
    """What the engine loads. Every field is also a command-line option (`cli.py`)."""
    data: str = field(default=str(BUNDLED_DATA), metadata=described("the review pool: a file or folder of Amazon reviews"))
    encoder: str = field(default=BUNDLED_ENCODER, metadata=described("sentence-transformers id or folder"))
    llm: str = field(default=BUNDLED_LLM, metadata=described("Hugging Face causal chat LM id, folder, or .gguf file"))
    adapter: str | None = field(default=str(BUNDLED_ADAPTER), metadata=described(
        "a trained adapter folder"))
    device: str | None = field(default=None, metadata=described("cpu or cuda (default: cuda where there is one)"))
    four_bit: bool | None = field(default=None, metadata=described(
        "load the LLM in 4-bit NF4 with bf16 compute (default: on CUDA, never on the CPU)", option="4bit"))
    cpu_decode: CpuDecode = field(default=CpuDecode.BFLOAT16, metadata=described(
        "with --cpu-backend torch: the dtype PyTorch decodes in (bfloat16 reads half the bytes per token)"))
    cpu_backend: CpuBackend = field(default=CpuBackend.ONNX, metadata=described(
        "who generates on the CPU: ONNX Runtime with int8 weights (3x+ faster per token), or PyTorch"))
    cpu_kv_cache: KvCache = field(default=KvCache.INT8, metadata=described(
        "ONNX Runtime's KV cache: int8 (faster decoding of long prompts) or float32"))
    cpu_prefill: CpuPrefill = field(default=CpuPrefill.AUTO, metadata=described(
        "dtype of CPU prompts and training's forward passes (auto: bfloat16 on AMX or AVX512-BF16, else float32)"))
    backend: Backend = field(default=Backend.LOCAL, metadata=described(
        "who decodes: this process, or vLLM (the servers of --vllm-url, else one started on 127.0.0.1 from "
        ".venv-vllm/; docs/vllm.md)"))
    vllm_url: str | None = field(default=None, metadata=described(
        "running vLLM servers' URLs, comma-separated, requests spread over them (implies --backend vllm)"))
    extra_reviews: str | None = field(default=None, metadata=described("more reviews (a file or folder) joining the pool"))
    style_features: StyleFeatures | None = field(default=None, metadata=described(
        "features beside each text embedding (default: as the adapter was trained)"))
    cache_dir: str | None = field(default=None, metadata=described(
        "embedding cache (default: beside the data, else ~/.cache/dep-studio)"))
    preset: Preset = field(default=Preset.STUDIO, metadata=described(
        "studio: this project's adapter and prompt; paper: the authors' checkpoint (--adapter: a folder or Hub id "
        "in their layout, or a converted folder; default SnowCharmQ/DEP-model) with their exact inputs, for a GPU"))
    paper_encoder: str = field(default="BAAI/bge-m3", metadata=described(
        "with --preset paper: the BGE-M3 folder (or Hub id, downloaded once) the authors' vectors come from"))
    allow_cpu: bool = field(default=False, metadata=described(
        "with --preset paper: run a multi-billion-parameter LLM on the CPU anyway (minutes per review)"))


def _decode_dtype(name: str) -> torch.dtype | None:
    return CPU_DECODE_DTYPES[choice(CpuDecode, name, "cpu_decode")]


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
class Prepared:
    """Everything decided before decoding: the context, the prompts the model reads, their embeddings."""
    context: PersonalContext
    prompts: dict[str, str]          # mode -> the prompt as read by the model (after any shortening)
    embeds: list[torch.Tensor]       # one (L, H) input embedding per mode
    notes: list[str]
    timings: dict[str, float]
    end_after_words: int | None = None  # every mode's text ends at a sentence end from here on (the user's length)


@dataclass
class Result:
    texts: dict[str, str]
    context: PersonalContext
    notes: list[str]
    timings: dict[str, float]
    new_tokens: int = 0
    prompts: dict[str, str] = field(default_factory=dict)


def end_after_words(profile: Sequence[Review], sampling: SamplingSettings) -> int | None:
    """Where every text of a request ends with `sampling.end_at_user_length`: at the first sentence end
    from the user's typical length on (None: no such end, or no past review to take it from)."""
    return (typical_length(list(profile)) or None) if sampling.end_at_user_length else None


def mix(user: np.ndarray, population: np.ndarray, strength: float) -> np.ndarray:
    """population + strength * (user - population): 0 is the generic reviewer, 1 exactly the user."""
    if strength == 1:
        return user
    if strength == 0:
        return np.broadcast_to(population, user.shape).astype(user.dtype)
    return (population + strength * (user - population)).astype(user.dtype)


class DEPEngine:
    """Loads the encoder, pool, LLM and adapter once; each call personalizes one request.

    `llm` may be passed ready-made (tests use a tiny random one); `config.llm` must then name it."""

    def __init__(self, config: EngineConfig | None = None, progress: bool = True, llm: LLM | None = None):
        self.config = config or EngineConfig()
        start = time.perf_counter()
        self.dataset: Dataset = load_dataset(self.config.data)
        self.encoder = Encoder(self.config.encoder)
        cache = Path(self.config.cache_dir) if self.config.cache_dir else embedding_cache_dir(self.config.data)
        extra = earlier_reviews(load_dataset(self.config.extra_reviews)) if self.config.extra_reviews else None
        self.store = ReviewStore.build(self.dataset, self.encoder, cache, progress, style=self._style_features(),
                                       extra=extra, extra_cache_dir=extra and embedding_cache_dir(self.config.extra_reviews))
        self.llm: LLM = llm or self._load_llm()
        if self.config.vllm_url or choice(Backend, self.config.backend, "backend") == Backend.VLLM:
            self.llm = vllm_backend.attach(self.llm, self.config.vllm_url)  # vLLM servers decode (docs/vllm.md)
        else:
            decoder_for(self.llm)  # convert (once) and load now, not at the first request
        self.adapter = self._load_adapter()
        self.users = by_user(self.dataset.reviews)
        self.startup_seconds = time.perf_counter() - start

    def _load_llm(self) -> LLM:
        return load_llm(self.config.llm, self.config.device, four_bit=self.config.four_bit,
                        cpu_decode_dtype=_decode_dtype(self.config.cpu_decode), cpu_backend=self.config.cpu_backend,
                        cpu_kv_cache=self.config.cpu_kv_cache, cpu_prefill=self.config.cpu_prefill)

    def _style_features(self) -> str:
        if self.config.style_features is not None:
            return style_set(self.config.style_features)
        saved = Path(self.config.adapter or "") / CONFIG_NAME
        if self.config.adapter and saved.is_file():
            try:
                return style_set(json.loads(saved.read_text()).get("style_features", False))
            except (json.JSONDecodeError, UnicodeDecodeError, OSError, ValueError):
                return "rating-length"  # the adapter's own loading will report the damage
        return "rating-length"

    def _load_adapter(self) -> DEPAdapter:
        path = self.config.adapter
        expected = dict(llm=self.config.llm, hidden_size=self.llm.hidden_size, encoder=self.encoder.name,
                        embedding_dim=self.store.dim)
        if path and Path(path).exists():
            adapter = DEPAdapter.from_pretrained(path, **expected)
        elif path and Path(path) != BUNDLED_ADAPTER:
            raise AdapterError(f"{path}: no such adapter folder")
        else:
            if path:  # the bundled adapter is missing; None asks for a fresh one (training does)
                log.warning("no trained adapter: soft prompts come from an untrained adapter")
            torch.manual_seed(0)
            adapter = DEPAdapter(DEPAdapterConfig(**expected, token_norm=self.llm.token_norm(),
                                                  style_features=self.store.style))
        return adapter.to(self.llm.device).eval().requires_grad_(False)

    @property
    def adapter_trained(self) -> bool:
        return self.adapter.config.trained

    @cached_property
    def population_from_another_pool(self) -> bool:
        """Whether the generic reviewer, the average of the adapter's training samples, was drawn from other
        reviews than the pool served (the adapter records its pool's fingerprint; older ones do not)."""
        trained_on = self.adapter.config.training.get("data_fingerprint")
        return bool(trained_on) and trained_on != data_fingerprint(self.dataset.reviews)

    # ---- requests ------------------------------------------------------------------------

    def user_request(self, user_id: str, item: str | Item | None = None, rating: float | None = None,
                     review_title: str | None = None) -> Request:
        """A bundled user's request. By default their latest review, held out, with what came before it;
        for an item they reviewed, that review held out; for any other item, their whole history."""
        history = self.users.get(user_id)
        if not history:
            raise DataError(f"unknown user {user_id!r}")
        if item is None:
            item = history[-1].item_id
        item = self.store.item(item) if isinstance(item, str) else item
        own = next((n for n, r in enumerate(history) if r.item_id == item.item_id), None)
        if own is None:
            request = Request(profile=list(history), item=item, rating=5.0)
        else:
            request = self.sample_request(Sample(history[own], tuple(profile_before(history, own)), "test"))
            request.item = item
        request.rating = request.rating if rating is None else rating
        request.review_title = request.review_title if review_title is None else review_title
        return request

    def history_request(self, history: str, item: Item, rating: float, review_title: str = "") -> Request:
        """A pasted or uploaded history (any layout `parse_history` reads) and a product."""
        reviews, items = parse_history(history, user_id="you")
        return Request(profile=reviews, item=item, rating=rating, review_title=review_title, extra_items=items)

    def sample_request(self, sample: Sample) -> Request:
        """The request of a split sample: its profile (less any twin of the target, `without_twins`), its
        target's item, rating and title, its time."""
        target = sample.target
        return Request(profile=without_twins(sample.profile, target), item=self.store.item(target.item_id),
                       rating=target.rating, review_title=target.title, cutoff=target.timestamp, reference=target.text)

    def context(self, request: Request, settings: PersonalizationSettings,
                store: ReviewStore | None = None) -> PersonalContext:
        """The request's K past reviews, peers and difference vectors, from `store` (default: the pool)."""
        return (store or self.store).context(request.profile, request.item, settings.k, settings.history_rule,
                                             request.cutoff, settings.peer_temperature, settings.max_peers,
                                             extra_items=request.extra_items)

    # ---- soft tokens ---------------------------------------------------------------------

    def vectors(self, context: PersonalContext, strength: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """(K, d) his and diff vectors at a personalization strength (0: the population's, 1: the user's)."""
        his, diff = self.adapter.population()
        return mix(context.his, his, strength), mix(context.diff, diff, strength)

    def soft_tokens(self, his: np.ndarray, diff: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, H) his and diff soft tokens of (K, d) his and diff vectors."""
        device = self.llm.device
        with torch.no_grad():
            out = self.adapter(torch.from_numpy(np.ascontiguousarray(his)).to(device),
                               torch.from_numpy(np.ascontiguousarray(diff)).to(device))
        return out["his_tokens"], out["diff_tokens"]

    def sae_codes(self, context: PersonalContext) -> tuple[np.ndarray, np.ndarray]:
        """The sparse codes of his and diff vectors, for showing which features fire."""
        device = self.llm.device
        with torch.no_grad():
            out = self.adapter.encode(torch.from_numpy(context.his).to(device), torch.from_numpy(context.diff).to(device))
        return out["his_code"].float().cpu().numpy(), out["diff_code"].float().cpu().numpy()

    def voice_check(self, request: Request, result: Result, modes: Sequence[str], seed: int = 0) -> dict[str, VoiceCheck]:
        """Per output: its author's rank among this user and `voice.CANDIDATES - 1` bundled others (fixed
        by the seed; each known by the reviews before their latest), and its drift to a past item, as
        `evaluate` measures every output; empty without a history to compare with."""
        if not request.profile:
            return {}
        own = request.profile[0].user_id
        others = sorted(u for u, history in self.users.items() if u != own and len(history) > 1)
        chosen = random.Random(seed).sample(others, min(len(others), voice.CANDIDATES - 1))
        past = [self.store.item(s.review.item_id, request.extra_items) for s in result.context.selected]
        checks = voice.check_texts(self.store, [result.texts[m] for m in modes],
                                   [request.profile] + [self.users[u][:-1] for u in chosen],
                                   request.item, past, self.voice_scale)
        return dict(zip(modes, checks))

    @cached_property
    def voice_scale(self) -> tuple[np.ndarray, np.ndarray]:
        """The pool's voice-feature scale for `voice_check` (a second or two: computed once)."""
        return voice.style_scale(self.store)

    def embed_prompt(self, prompt: PromptIds, his: np.ndarray, diff: np.ndarray) -> torch.Tensor:
        """(L, H) input embeddings of a prompt, its slots filled with the soft tokens of his/diff vectors."""
        if not (prompt.his_positions or prompt.diff_positions):
            return prompt_embeddings(self.llm, prompt)
        his_tokens, diff_tokens = self.soft_tokens(his, diff)
        return prompt_embeddings(self.llm, prompt, his_tokens if prompt.his_positions else None,
                                 diff_tokens if prompt.diff_positions else None)

    def method_embeddings(self, request: Request, own: PersonalContext, borrowed: PersonalContext,
                          methods: Sequence, personalization: PersonalizationSettings) -> list[torch.Tensor]:
        """(L, H) input embeddings of one request under each evaluation method (`evaluation.Method`: a mode at
        a K, with this user's vectors, another user's from `borrowed` when shuffled, or mixed at a strength)."""
        rows = []
        for method in methods:
            context = own.first(method.k)
            source = borrowed.first(method.k) if method.shuffled else context
            prompt = self.prompt(request, context, method.mode, personalization.words_per_review,
                                 layout=personalization.layout)
            take = np.arange(context.k) % max(1, source.k)  # another user may have fewer past reviews
            vectors = PersonalContext(context.selected, source.his[take], source.diff[take]) if source.k else context
            strength = 0.0 if get_mode(method.mode).population else method.strength
            rows.append(self.embed_prompt(prompt, *self.vectors(vectors, strength)))
        return rows

    # ---- prompts -------------------------------------------------------------------------

    def prompt(self, request: Request, context: PersonalContext, mode: str, words_per_review: int = WORDS_PER_REVIEW,
               readable: bool = False, layout: PromptLayout = PromptLayout()) -> PromptIds | str:
        """The prompt's token ids and slots (or, with `readable`, its text as a person reads it)."""
        past = [PastReview.of(s.review, s.item_title) for s in context.selected]
        build = readable_prompt if readable else partial(build_prompt, self.llm.tokenizer)
        return build(request.item, request.rating, request.review_title, past, get_mode(mode), words_per_review,
                     typical_length(request.profile), layout)

    def max_prompt_tokens(self, max_new_tokens: int) -> int:
        return int(getattr(self.llm.model.config, "max_position_embeddings", 2048)) - max_new_tokens

    def fit_prompts(self, request: Request, context: PersonalContext, modes: Sequence[str], words_per_review: int,
                    limit: int, layout: PromptLayout = PromptLayout()
                    ) -> tuple[PersonalContext, list[PromptIds], int, list[str]]:
        """Prompts of every mode, shortened until the longest fits `limit` tokens; also the words kept
        per past review.

        The rule: first halve the words kept per past review (down to 10), then drop the least
        relevant past review (the last of the ranked selection), one at a time. A note says what was cut."""
        words, notes = words_per_review, []
        while True:
            prompts = [self.prompt(request, context, mode, words, layout=layout) for mode in modes]
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
        return context, prompts, words, notes

    def prepare(self, request: Request, modes: Sequence[str] = ("generic", "dep"),
                personalization: PersonalizationSettings | None = None,
                sampling: SamplingSettings | None = None) -> Prepared:
        """History, peers and differences, the prompts of every mode (fitted to the LLM's context),
        and their input embeddings: all that happens before decoding."""
        personalization = personalization or PersonalizationSettings()
        sampling = sampling or SamplingSettings()
        request.validate()
        for mode in modes:
            get_mode(mode)
        timings: dict[str, float] = {}
        start = time.perf_counter()
        context = self.context(request, personalization)
        timings["retrieval_and_differences"] = time.perf_counter() - start
        start = time.perf_counter()
        context, prompts, words, cut = self.fit_prompts(request, context, modes, personalization.words_per_review,
                                                        self.max_prompt_tokens(sampling.max_new_tokens),
                                                        personalization.layout)
        timings["prompt"] = time.perf_counter() - start
        start = time.perf_counter()
        own = self.vectors(context, personalization.strength)
        population = self.vectors(context, 0.0)
        embeds = [self.embed_prompt(prompt, *(population if get_mode(mode).population else own))
                  for mode, prompt in zip(modes, prompts)]
        timings["adapter"] = time.perf_counter() - start
        readable = {mode: self.prompt(request, context, mode, words, readable=True, layout=personalization.layout)
                    for mode in modes}
        notes = list(self.llm.notes) + list(context.notes) + cut
        if not context.selected and any(get_mode(m).uses_history for m in modes):
            notes.append("personalized outputs used no history, so they are baseline generations")
        uses_population = any(get_mode(m).population or (get_mode(m).soft and personalization.strength != 1)
                              for m in modes)  # generic, or a strength that mixes the user with the average
        if self.adapter_trained and uses_population and self.population_from_another_pool:
            notes.append("the generic reviewer is the average of the reviewers the adapter was trained on, "
                         "another pool than this one")
        if not self.adapter_trained and any(get_mode(m).soft for m in modes):
            notes.append("the adapter is UNTRAINED: soft prompts are random projections, not personalization")
        return Prepared(context, readable, embeds, notes, timings, end_after_words(request.profile, sampling))

    # ---- generation ----------------------------------------------------------------------

    def generate(self, request: Request, modes: Sequence[str] = ("generic", "dep"),
                 personalization: PersonalizationSettings | None = None,
                 sampling: SamplingSettings | None = None) -> Result:
        """All modes decoded together with one seed; see `prompt.MODES`."""
        result = None
        for result in self.stream(request, modes, personalization, sampling):
            pass
        return result

    def stream(self, request: Request, modes: Sequence[str] = ("generic", "dep"),
               personalization: PersonalizationSettings | None = None,
               sampling: SamplingSettings | None = None) -> Iterator[Result]:
        """Partial results while decoding; the last one is final."""
        sampling = sampling or SamplingSettings()
        prepared = self.prepare(request, modes, personalization, sampling)
        for results in self._decode([prepared], [list(modes)], sampling):
            yield results[0]

    def stream_compare(self, requests: Sequence[Request], mode: str = "dep",
                       personalization: PersonalizationSettings | None = None,
                       sampling: SamplingSettings | None = None) -> Iterator[list[Result]]:
        """Several reviewers on the same product, settings and seed, decoded in one batch: one
        Result per request at each step, the last step final."""
        sampling = sampling or SamplingSettings()
        prepared = [self.prepare(request, [mode], personalization, sampling) for request in requests]
        yield from self._decode(prepared, [[mode]] * len(prepared), sampling)

    def _decode(self, prepared: list[Prepared], modes: list[list[str]],
                sampling: SamplingSettings) -> Iterator[list[Result]]:
        """Decode every prepared prompt in one batch; yield per-request Results with cleaned texts."""
        embeds = [e for p in prepared for e in p.embeds]
        start = time.perf_counter()
        steps, first_token, raw, timings = 0, None, [Output("")] * len(embeds), {}
        end_after = [p.end_after_words for p, names in zip(prepared, modes) for _ in names]
        for raw in stream(self.llm, embeds, sampling, end_after):
            steps += 1
            elapsed = time.perf_counter() - start
            first_token = first_token if first_token is not None else elapsed
            decoding = elapsed - first_token  # the rate of the steps after the first token, prompt excluded
            timings = {"generation": elapsed, "first_token": first_token,
                       "tokens_per_second": (min(steps, sampling.max_new_tokens) - 1) / decoding if decoding else 0.0}
            yield self._results(prepared, modes, raw, timings, min(steps, sampling.max_new_tokens), final=False,
                                content_filter=sampling.content_filter)
        over_budget = sampling.time_budget_s is not None and time.perf_counter() - start >= sampling.time_budget_s
        final = self._results(prepared, modes, raw, timings, min(steps, sampling.max_new_tokens), final=True,
                              content_filter=sampling.content_filter)
        if over_budget:
            for result in final:
                result.notes.append(f"decoding stopped at the time budget ({sampling.time_budget_s:g} s); "
                                    "the texts are what was written by then")
        yield final

    @staticmethod
    def _results(prepared: list[Prepared], modes: list[list[str]], raw: list[Output], timings: dict[str, float],
                 new_tokens: int, final: bool, content_filter: bool = True) -> list[Result]:
        results, row = [], 0
        for p, names in zip(prepared, modes):
            cleaned = [hygiene.clean(*output, p.end_after_words) for output in raw[row:row + len(names)]]
            row += len(names)
            notes = list(p.notes)
            if final:
                notes += [f"{name}: {_CUT_NOTES[c.reason].format(limit=new_tokens, words=p.end_after_words)}"
                          for name, c in zip(names, cleaned) if c.reason]
            texts = {n: c.text for n, c in zip(names, cleaned)}
            for name in names if content_filter else ():  # what the word mask could not see coming
                texts[name], withheld = safety.withhold(texts[name])
                if withheld and final:
                    notes.append(safety.note(withheld, name))
            results.append(Result(texts, p.context, notes,
                                  {**p.timings, **timings}, new_tokens, p.prompts))
        return results


def earlier_reviews(extra: Dataset) -> Dataset:
    """Another set's reviews less each user's latest one (their evaluation target), to join the pool."""
    return Dataset([r for history in by_user(extra.reviews).values() for r in history[:-1]], extra.items)


def embedding_cache_dir(data: str) -> Path:
    """Where a pool's embeddings are cached: `.dep_cache` beside the reviews (the bundled pool ships its cache)."""
    path = Path(data)
    return (path if path.is_dir() else path.parent) / ".dep_cache"


