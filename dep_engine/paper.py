"""The `paper` preset: a request's inputs built as the authors' released code builds them, for their checkpoint.

The authors' checkpoint (Qwen2.5-7B-Instruct + SAE + two projectors, `SnowCharmQ/DEP-model`) was trained on
inputs made by their code (github SnowCharmQ/DEP): `embedding.py` (BGE-M3 vectors), `create-dataset.py`
(the peer pool), `data/personal_dataset.py` (`PersonalDataset.__init__`: history, peers, weights, prompt,
shortening), `utils/templates.py` (`Qwen2PromptTemplate.build_prompt`) and `model/personal_model.py`
(`DEPModel.forward`: the SAE on the 16 stacked vectors, the marker-token replacement). This module is an
independent implementation of what those functions do; where their code, the paper and this project's
defaults differ, the differences are listed in docs/paper-preset.md, and the preset follows the code
(the checkpoint learned from what the code did).

In short, for one request (K = 8 slots, d = 1024, H = the LLM's hidden size):

    profile      the user's past reviews, newest first (stable sort on the timestamp)
    his_j        e_u,j: the BGE-M3 vector (CLS, L2-normalised) of the user's own review text
    selection    the first 8 reviews of that order whose item has more than one entry in the pool's
                 item -> reviewers map (the user's own entry counts, but is skipped as a peer)
    peers        every other pool entry (user, index) of that item, sorted
    weights      w = softmax_r( ||m_u - m_r|| / sum_r' ||m_u - m_r'|| ),  m_x: x's pool mean
    diff_j       sum_r w_r (e_u,j - e_r)
    vectors      his_0..his_7 then diff_0..diff_7: (16, d), the SAE's input
    text         the 8 newest reviews overall (not the selected ones), each with
                 `<his_token_start>[HIS_TOKEN_i]<his_token_end>` and `<diff_token_start>[DIFF_TOKEN_i]<diff_token_end>`;
                 fewer blocks (8, 7, ..., 1) while the history does not fit in 3072 tokens
    prompt       their hand-written ChatML (no newline between the system turn's <|im_end|> and the user's turn)
    injection    every [HIS_TOKEN_i] position's input embedding := his_tokens[i], [DIFF_TOKEN_i] := diff_tokens[i]
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from .data import Item, Review

log = logging.getLogger(__name__)

PAPER_CHECKPOINT = "SnowCharmQ/DEP-model"    # the authors' trained model on the Hub
PAPER_BASE_LLM = "Qwen/Qwen2.5-7B-Instruct"  # the frozen LLM inside it
PAPER_ENCODER = "BAAI/bge-m3"                # the encoder their vectors came from
PAPER_SLOTS = 8                              # K: his slots, then as many diff slots
PAPER_MAX_LENGTH = 3072                      # `PersonalDataset(max_length=3072)`

# The 20 tokens `create-dataset.py` adds to the tokenizer, in the order it adds them.
HIS_TOKENS = tuple(f"[HIS_TOKEN_{i}]" for i in range(PAPER_SLOTS))
DIFF_TOKENS = tuple(f"[DIFF_TOKEN_{i}]" for i in range(PAPER_SLOTS))
BRACKETS = ("<his_token_start>", "<his_token_end>", "<diff_token_start>", "<diff_token_end>")
MARKER_TOKENS = HIS_TOKENS + DIFF_TOKENS + BRACKETS

# `PersonalDataset.__init__`'s system prompt, verbatim: the checkpoint was trained under it.
SYSTEM_PROMPT = (
    "Given the title and description of an item, "
    "along with the user's past reviews (including item title, item description, review rating, review title, "
    "review text, review embedding, review difference embedding), "
    "and the output review rating and review title, "
    "generate a personalized item review for the user.\n"
    "Note: [Review Embedding] denotes a soft prompt of the review text and [Review Difference Embedding] "
    "denotes a soft prompt showing the difference between the review text and other reviews on the same item. "
    "[Review Embedding] and [Review Difference Embedding] should serve as hints for personalized review text "
    "generation.\n"
)

# `model-eval.py`: vLLM SamplingParams(max_tokens=2048, temperature=0.8, top_p=0.95), one sample.
PAPER_GENERATION = {"do_sample": True, "temperature": 0.8, "top_p": 0.95, "max_new_tokens": 2048}

CPU_PARAMETER_LIMIT = 3_000_000_000  # above this the preset refuses a CPU unless told otherwise


class PaperPresetError(ValueError):
    """The paper preset cannot run as asked (a CPU for the 7B model, a tokenizer without the markers...)."""


@dataclass(frozen=True)
class PaperConfig:
    """The authors' settings; every field's default is what their code does.

    slots:               K, his vectors then as many diff vectors (`range(8)` in `DEPModel.forward`)
    max_length:          token budget the history is shortened to fit (`max_length=3072`)
    peer_exclude_newest: each user's newest reviews left out of the peer pool (`create-dataset.py`:
                         `profile[:-2]` of the test sample's profile, i.e. all but the newest 3 reviews)
    mean_exclude_newest: each user's newest reviews left out of m_x (`his_emb[:-2]` of the embedding file
                         whose last row is the test target: all but the newest 2 reviews)
    template:            "authors": their hand-written ChatML (`Qwen2PromptTemplate`); "tokenizer": the
                         tokenizer's own chat template (Qwen2's adds one newline the checkpoint never saw)
    align_text:          False: the text blocks are the newest reviews overall, as their code writes them;
                         True: the text blocks are the reviews that own the soft tokens (the paper's intent)
    truncate:            cut the prompt's ids to max_length as their training did (their evaluation, through
                         vLLM, passes the string and does not cut)
    """
    slots: int = PAPER_SLOTS
    max_length: int = PAPER_MAX_LENGTH
    peer_exclude_newest: int = 3
    mean_exclude_newest: int = 2
    template: str = "authors"
    align_text: bool = False
    truncate: bool = False


# ---- the encoder --------------------------------------------------------------------------------------


def cls_pool(last_hidden_state: torch.Tensor) -> torch.Tensor:
    """(B, T, d) encoder output -> (B, d): the first ([CLS]/<s>) position, L2-normalised (`embedding.py`:
    `normalize(model(**batch)[0][:, 0], p=2, dim=1)`)."""
    return torch.nn.functional.normalize(last_hidden_state[:, 0], p=2, dim=1)


class PaperEncoder:
    """BGE-M3 as the authors ran it: transformers AutoModel on a local folder, the review text alone,
    truncated at the tokenizer's limit (8192 for BGE-M3), CLS vector, L2-normalised, float32.

    Same surface as `embeddings.Encoder` (`name`, `dim`, `encode`), so `embeddings.cached_encode` caches
    its vectors. Loads with `use_safetensors=True`, never with remote code."""

    def __init__(self, path: str | Path, name: str = PAPER_ENCODER, device: str = "cpu", batch_size: int = 16,
                 dtype: torch.dtype = torch.float32):
        self.path = Path(path)
        self.name = name
        self.device = device
        self.batch_size = batch_size
        self.dtype = dtype
        self._model = None
        self._tokenizer = None
        self._dim: int | None = None

    def _load(self) -> None:
        if self._model is not None:
            return
        if not self.path.is_dir():
            raise PaperPresetError(f"{self.path}: no encoder folder (the paper preset needs {PAPER_ENCODER} "
                                   "downloaded into a local folder)")
        from transformers import AutoModel, AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(self.path)
        self._model = AutoModel.from_pretrained(self.path, use_safetensors=True, dtype=self.dtype,
                                                trust_remote_code=False).to(self.device).eval()
        self._dim = int(self._model.config.hidden_size)

    @property
    def dim(self) -> int:
        self._load()
        return self._dim  # type: ignore[return-value]

    @torch.no_grad()
    def encode(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """(N, d) float32 unit vectors of `texts`."""
        self._load()
        out = [np.zeros((0, self._dim), np.float32)]
        for start in range(0, len(texts), self.batch_size):
            batch = self._tokenizer(list(texts[start:start + self.batch_size]), truncation=True, padding=True,
                                    return_tensors="pt").to(self.device)
            hidden = self._model(**batch)[0]
            out.append(cls_pool(hidden.float()).cpu().numpy().astype(np.float32))
        return np.concatenate(out)


# ---- the peer pool and the his / diff vectors ---------------------------------------------------------


def newest_first(reviews: Sequence[Review]) -> list[Review]:
    """`sorted(profile, key=timestamp, reverse=True)`: newest first, ties in their given order."""
    return sorted(reviews, key=lambda r: r.timestamp, reverse=True)


def _chronological(reviews: Sequence[Review]) -> list[Review]:
    return sorted(reviews, key=lambda r: r.timestamp)


class PaperPool:
    """The authors' peer pool (`create-dataset.py`), from every user's reviews and their vectors.

    Per user (reviews oldest first): the first n - `peer_exclude_newest` are pool entries (user, index),
    listed under their item; m_x is the mean of the first n - `mean_exclude_newest` vectors. There is no
    time cut-off: a peer may have written later than the request's target, as in their data."""

    def __init__(self, reviews: Sequence[Review], embeddings: np.ndarray, config: PaperConfig = PaperConfig()):
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if config.mean_exclude_newest > config.peer_exclude_newest:
            raise ValueError("every pool entry's author needs a mean: mean_exclude_newest <= peer_exclude_newest")
        if len(embeddings) != len(reviews):
            raise ValueError(f"{len(reviews)} reviews but {len(embeddings)} embeddings")
        self.config = config
        self.dim = embeddings.shape[1] if embeddings.ndim == 2 else 0
        self.row_of = {(r.user_id, r.item_id, r.timestamp): n for n, r in enumerate(reviews)}
        self.embeddings = torch.from_numpy(embeddings)
        users: dict[str, list[int]] = {}
        for n in sorted(range(len(reviews)), key=lambda n: reviews[n].timestamp):
            users.setdefault(reviews[n].user_id, []).append(n)
        self.user_rows: dict[str, torch.Tensor] = {}  # user -> (n_pool, d) pool entries' vectors, oldest first
        self.means: dict[str, torch.Tensor] = {}
        self.reviewers: dict[str, set[tuple[str, int]]] = {}
        for user, rows in users.items():
            mean_rows = rows[:max(0, len(rows) - config.mean_exclude_newest)]
            if mean_rows:
                self.means[user] = torch.mean(self.embeddings[mean_rows], dim=0)
            pool_rows = rows[:max(0, len(rows) - config.peer_exclude_newest)]
            self.user_rows[user] = self.embeddings[pool_rows]
            for index, row in enumerate(pool_rows):
                self.reviewers.setdefault(reviews[row].item_id, set()).add((user, index))

    def entries(self, item_id: str) -> list[tuple[str, int]]:
        """The item's pool entries (user, index), sorted as `sorted(asin_reviewers_map[asin])`."""
        return sorted(self.reviewers.get(item_id, ()))

    def vector(self, review: Review) -> torch.Tensor | None:
        """(d,) the pool's vector of this exact review, or None."""
        row = self.row_of.get((review.user_id, review.item_id, review.timestamp))
        return None if row is None else self.embeddings[row]


@dataclass
class PaperHistory:
    """The slots of one request.

    profile: the user's past reviews, newest first; selected: indexes into it of the reviews whose vectors
    fill the slots; his, diff: (n, d) float32 with n <= K; peers: per selected review, [(user, index, weight)]."""
    profile: list[Review]
    selected: list[int]
    his: torch.Tensor
    diff: torch.Tensor
    peers: list[list[tuple[str, int, float]]]

    @property
    def vectors(self) -> torch.Tensor:
        """(2n, d): his_0..his_{n-1} then diff_0..diff_{n-1}, the SAE's input (`his_diff_emb`)."""
        return torch.cat([self.his, self.diff], dim=0)


def select_history(pool: PaperPool, profile: Sequence[Review], profile_vectors: torch.Tensor | np.ndarray,
                   user_id: str, user_mean: torch.Tensor | None = None, slots: int = PAPER_SLOTS) -> PaperHistory:
    """The authors' history, peers, weights and vectors (`PersonalDataset.__init__`'s loop over `profile`).

    profile: the user's past reviews in any order; profile_vectors: (P, d) their vectors, same order;
    user_mean: (d,) m_u, by default the pool's (a user outside the pool, e.g. a pasted history, needs one:
    the mean of `profile_vectors` is used then). Returns his and diff of shape (n, d), n <= slots."""
    vectors = torch.as_tensor(np.asarray(profile_vectors, dtype=np.float32))
    order = sorted(range(len(profile)), key=lambda n: profile[n].timestamp, reverse=True)
    ordered = [profile[n] for n in order]
    if user_mean is None:
        user_mean = pool.means.get(user_id)
    if user_mean is None:
        user_mean = vectors.mean(dim=0) if len(vectors) else torch.zeros(pool.dim)
    his, diff, selected, peers = [], [], [], []
    for j, review in enumerate(ordered):
        entries = pool.entries(review.item_id)
        if len(entries) > 1:  # the user's own entry counts here; it is skipped as a peer below
            e_u = vectors[order[j]]
            shifts, deltas, names = [], [], []
            for peer, index in entries:
                if peer == user_id:
                    continue
                shifts.append(user_mean - pool.means[peer])
                deltas.append(e_u - pool.user_rows[peer][index])
                names.append((peer, index))
            if shifts:  # two entries both the user's own cannot happen with one review per item
                weights = torch.norm(torch.stack(shifts), dim=1)
                weights = torch.softmax(weights / torch.sum(weights), dim=0)
                diff.append(torch.sum(torch.stack([weights[i] * deltas[i] for i in range(len(deltas))]), dim=0))
                his.append(e_u)
                selected.append(j)
                peers.append([(p, i, float(w)) for (p, i), w in zip(names, weights)])
        if len(his) == slots:
            break
    dim = vectors.shape[1] if vectors.ndim == 2 else pool.dim
    stack = (lambda xs: torch.stack(xs)) if his else (lambda xs: torch.zeros((0, dim)))
    return PaperHistory(ordered, selected, stack(his), stack(diff), peers)


# ---- the prompt ---------------------------------------------------------------------------------------


def rating_text(rating: float) -> str:
    """A rating as their f-string writes Amazon 2023's float ratings: 5.0 -> "5.0"."""
    return str(float(rating))


def review_block(number: int, review: Review, item: Item) -> str:
    """One past review's lines (`PersonalDataset`'s `review_info`), with slot `number` (0-based)'s markers."""
    return (f"- [Review {number + 1}]:\n"
            f"  - [Item Title]: {item.title}\n"
            f"  - [Item Description]: {item.description}\n"
            f"  - [Review Rating]: {rating_text(review.rating)}\n"
            f"  - [Review Title]: {review.title}\n"
            f"  - [Review Text]: {review.text}\n"
            f"  - [Review Embedding]: {BRACKETS[0]}{HIS_TOKENS[number]}{BRACKETS[1]}\n"
            f"  - [Review Difference Embedding]: {BRACKETS[2]}{DIFF_TOKENS[number]}{BRACKETS[3]}\n")


def user_message(target: Item, rating: float, title: str, past_reviews: str = "") -> str:
    """The user turn: target item, the past reviews' section (may be empty), output rating and title."""
    return (f"[Item Title]: {target.title}\n"
            f"[Item Description]: {target.description}\n"
            f"{past_reviews}"
            f"[Output Review Rating]: {rating_text(rating)}\n"
            f"[Output Review Title]: {title}\n")


def chat_prompt(message: str, tokenizer=None, template: str = "authors", system: str = SYSTEM_PROMPT) -> str:
    """The whole prompt text. "authors": `Qwen2PromptTemplate.build_prompt`, whose system turn ends in
    <|im_end|> with no newline before <|im_start|>user; "tokenizer": `tokenizer.apply_chat_template`."""
    if template == "authors":
        return (f"<|im_start|>system\n{system}<|im_end|>"
                f"<|im_start|>user\n{message}<|im_end|>\n<|im_start|>assistant\n")
    if template == "tokenizer":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise PaperPresetError("template 'tokenizer' needs a tokenizer with a chat template")
        return tokenizer.apply_chat_template([{"role": "system", "content": system},
                                              {"role": "user", "content": message}],
                                             tokenize=False, add_generation_prompt=True)
    raise PaperPresetError(f"template must be 'authors' or 'tokenizer', got {template!r}")


def _count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass
class PaperPrompt:
    text: str            # the prompt string (what their evaluation hands vLLM)
    input_ids: list[int]  # its tokens, without special tokens added (cut to max_length if `truncate`)
    blocks: int          # past reviews written out (8 unless shortened, or fewer reviews)
    text_reviews: list[Review]  # the reviews of those blocks, in order


def build_prompt(tokenizer, target: Item, rating: float, title: str, text_reviews: Sequence[Review],
                 items: Mapping[str, Item], config: PaperConfig = PaperConfig()) -> PaperPrompt:
    """The authors' prompt with as many of `text_reviews` (newest first) as fit.

    Their shortening: the budget is max_length less the tokens of the prompt without history; the section
    with n = min(K, len(reviews)) blocks, then n-1, ... is tokenized alone until it fits; one block stays
    even if it does not fit (their loop ends there)."""
    head = chat_prompt(user_message(target, rating, title), tokenizer, config.template)
    budget = config.max_length - _count(tokenizer, head)
    past, blocks = "", 0
    for n in range(min(config.slots, len(text_reviews)), 0, -1):
        past = "[User's Past Reviews]:\n" + "".join(
            review_block(i, r, items.get(r.item_id) or Item(r.item_id, r.item_id)) for i, r in enumerate(text_reviews[:n]))
        blocks = n
        if _count(tokenizer, past) <= budget:
            break
    text = chat_prompt(user_message(target, rating, title, past), tokenizer, config.template)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if config.truncate:
        ids = ids[:config.max_length]
    return PaperPrompt(text, list(ids), blocks, list(text_reviews[:blocks]))


# ---- one request --------------------------------------------------------------------------------------


@dataclass
class PaperRequest:
    """Everything one generation needs: the prompt and the slots' vectors (his_i beside [HIS_TOKEN_i])."""
    prompt: PaperPrompt
    history: PaperHistory
    notes: list[str] = field(default_factory=list)

    @property
    def his(self) -> torch.Tensor:
        return self.history.his

    @property
    def diff(self) -> torch.Tensor:
        return self.history.diff


def profile_vectors(pool: PaperPool, profile: Sequence[Review], encoder=None) -> np.ndarray:
    """(P, d) vectors of `profile`: the pool's where it holds the same review, `encoder`'s for the rest."""
    out = np.zeros((len(profile), pool.dim), dtype=np.float32)
    missing = []
    for n, review in enumerate(profile):
        vector = pool.vector(review)
        if vector is None:
            missing.append(n)
        else:
            out[n] = vector.numpy()
    if missing:
        if encoder is None:
            raise PaperPresetError(f"{len(missing)} past reviews are not in the pool and no encoder was given")
        out[missing] = encoder.encode([profile[n].text for n in missing])
    return out


def build_request(pool: PaperPool, tokenizer, profile: Sequence[Review], target: Item, rating: float, title: str,
                  items: Mapping[str, Item], user_id: str | None = None, encoder=None,
                  config: PaperConfig = PaperConfig()) -> PaperRequest:
    """The paper preset's inputs for one request: `PersonalDataset.__init__` for one sample.

    profile: the user's reviews before the target; target/rating/title: the item and the rating and
    review title to write for. Returns the prompt and his, diff of shape (n, d), n <= K."""
    if not profile:
        raise PaperPresetError("the paper preset needs at least one past review")
    user_id = user_id or profile[0].user_id
    vectors = profile_vectors(pool, profile, encoder)
    mean = None if user_id in pool.means else torch.from_numpy(vectors).mean(dim=0)
    history = select_history(pool, profile, vectors, user_id, mean, config.slots)
    notes = []
    if mean is not None:
        notes.append("user outside the pool: m_u is the mean of the given history (their code has no such case)")
    if len(history.selected) < config.slots:
        notes.append(f"{len(history.selected)} of {config.slots} slots filled: too few past reviews with peers "
                     "(their data always filled 8; the empty slots keep their marker tokens' own embeddings)")
    texts = [history.profile[j] for j in history.selected] if config.align_text else history.profile
    prompt = build_prompt(tokenizer, target, rating, title, texts, items, config)
    if prompt.blocks < min(config.slots, len(texts)):
        notes.append(f"history shortened to {prompt.blocks} reviews to fit {config.max_length} tokens")
    return PaperRequest(prompt, history, notes)


# ---- soft tokens and their injection ------------------------------------------------------------------


def marker_ids(tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of [HIS_TOKEN_0..7] and [DIFF_TOKEN_0..7]; refuses a tokenizer that lacks any marker."""
    ids = tokenizer.convert_tokens_to_ids(list(MARKER_TOKENS))
    unk = getattr(tokenizer, "unk_token_id", None)
    missing = [t for t, i in zip(MARKER_TOKENS, ids) if i is None or i == unk]
    if missing or len(set(ids)) != len(ids):
        raise PaperPresetError(f"the tokenizer lacks the paper checkpoint's marker tokens ({', '.join(missing) or 'duplicates'}):"
                               " use the tokenizer saved with the checkpoint")
    return list(ids[:PAPER_SLOTS]), list(ids[PAPER_SLOTS:2 * PAPER_SLOTS])


def soft_tokens(adapter, his: torch.Tensor, diff: torch.Tensor, dtype: torch.dtype | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, d) his and diff vectors -> (n, H) his and diff soft tokens.

    dtype None: the adapter's own forward (float32). dtype torch.bfloat16: as `DEPModel.forward` ran it, the
    SAE and projectors in bf16 on the (2n, d) stack his then diff, split at n."""
    if dtype is None:
        out = adapter(his, diff)
        return out["his_tokens"], out["diff_tokens"]
    import copy

    modules = copy.deepcopy(torch.nn.ModuleDict({"sae": adapter.sae, "his": adapter.his_projector,
                                                 "diff": adapter.diff_projector})).to(dtype)
    with torch.no_grad():
        code, _ = modules["sae"](torch.cat([his, diff]).to(dtype))
        return modules["his"](code[:len(his)]), modules["diff"](code[len(his):])


def inject(embeddings: torch.Tensor, input_ids: torch.Tensor, his_tokens: torch.Tensor, diff_tokens: torch.Tensor,
           his_ids: Sequence[int], diff_ids: Sequence[int]) -> torch.Tensor:
    """(B, T, H) input embeddings with every [HIS_TOKEN_i] position set to his_tokens[..., i, :] and every
    [DIFF_TOKEN_i] to diff_tokens[..., i, :]; his/diff_tokens: (n, H) shared by the batch or (B, n, H).
    Slots past n keep their token's own embedding. A new tensor; `embeddings` is left as it was."""
    out = embeddings.clone()
    if his_tokens.dim() == 2:
        his_tokens = his_tokens.unsqueeze(0).expand(len(out), -1, -1)
        diff_tokens = diff_tokens.unsqueeze(0).expand(len(out), -1, -1)
    for tokens, ids in ((his_tokens, his_ids), (diff_tokens, diff_ids)):
        for i in range(min(tokens.shape[1], len(ids))):
            mask = input_ids == ids[i]
            if mask.any():
                rows = tokens[:, i, :].to(out.dtype).unsqueeze(1).expand_as(out)
                out = torch.where(mask.unsqueeze(-1), rows, out)
    return out


def paper_inputs_embeds(model, input_ids: torch.Tensor, his_tokens: torch.Tensor, diff_tokens: torch.Tensor,
                        tokenizer) -> torch.Tensor:
    """(B, T) ids -> (B, T, H) the LLM's input embeddings with the soft tokens in place: feed them to
    `model(inputs_embeds=...)` or `model.generate(inputs_embeds=..., attention_mask=...)`."""
    his_ids, diff_ids = marker_ids(tokenizer)
    embeddings = model.get_input_embeddings()(input_ids)
    return inject(embeddings, input_ids, his_tokens, diff_tokens, his_ids, diff_ids)


# ---- hardware -----------------------------------------------------------------------------------------


def parameter_count(config) -> int:
    """Parameters of a Qwen2 causal LM from its config (an object or a config.json dict), without loading it."""
    get = (lambda k, d=None: config.get(k, d)) if isinstance(config, Mapping) else (lambda k, d=None: getattr(config, k, d))
    h, v, layers, inter = get("hidden_size"), get("vocab_size"), get("num_hidden_layers"), get("intermediate_size")
    heads = get("num_attention_heads")
    kv = (get("num_key_value_heads") or heads) * (get("head_dim") or h // heads)
    per_layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * inter + 2 * h
    return v * h * (1 if get("tie_word_embeddings", False) else 2) + layers * per_layer + h


def check_device(device: str | torch.device, parameters: int, allow_cpu: bool = False) -> str | None:
    """Refuse (PaperPresetError) a CPU for an LLM of more than 3 B parameters unless `allow_cpu`; a note
    saying how slow it will be when allowed; None on a GPU or for a small model."""
    device = torch.device(device)
    if device.type != "cpu" or parameters <= CPU_PARAMETER_LIMIT:
        return None
    billions = parameters / 1e9
    why = (f"the paper preset's LLM has {billions:.1f} B parameters: on a CPU it needs about "
           f"{parameters * 2 / 2**30:.0f} GB of memory in bf16 ({parameters * 4 / 2**30:.0f} GB in float32) and "
           f"generates roughly one token per second at best, so one 200-word review takes minutes; it is meant for a "
           f"CUDA GPU (4-bit NF4: about 5-6 GB of GPU memory; bf16: about 15 GB)")
    if not allow_cpu:
        raise PaperPresetError(f"refused: {why}. Run it on a GPU, or pass allow_cpu=True (--allow-cpu) to run it anyway.")
    return f"running on a CPU as asked: {why}"
