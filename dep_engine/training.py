"""Training the DEP adapter against the frozen LLM.

Loss = cross-entropy on the target review's tokens only (prompt masked)
     + sae_loss_weight * (smooth-L1 reconstruction + sparsity_weight * KL(rho || mean activation))
     + contrast_weight * mean(relu(contrast_margin - (LM loss with another user's vectors - LM loss with own)))
The last term (off by default; the paper has none) rewards a sample's own vectors over another
user's: without it the adapter can learn a task prompt that any user's vectors unlock. The other
user is a batch-mate (`contrast_partner="batch"`), whose vectors a model can tell apart by topic
alone, another training user who reviewed the same product ("same-item"), which leaves the
person as the difference to learn, or the population-average reviewer ("population", the generic
mode's vectors; its loss is held fixed, so the term cannot win by making the generic prompt worse,
but then its gradient is the LM loss's own on every sample short of the margin: it re-weights the
task and cannot move the gap by itself, as rounds 9 and 22 found). Deviation projectors
(`deviation_projectors`) give the person a path the generic prompt does not take: trained alone,
whatever lowers the loss with a user's own vectors is that user's share.
Only the SAE and the two projectors learn. Each training sample
is assigned one prompt mode from `modes` in turn, so one adapter serves his-only, diff-only,
his+diff and DEP prompts.
Held-out targets (validation and test users' target reviews) never enter a training sample's
peers. The LLM's forward passes run under autocast to `LLM.prefill_dtype` where it is set (bf16 on CPUs
with AMX or AVX512-BF16: 1.6-1.8x a step); the adapter stays float32.
The checkpoint kept is the one with the lowest validation LM loss (generation-free, so cheap);
it stores the population-average reviewer (mean his and diff vectors of the training samples).
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .adapter import DEPAdapter, DEPAdapterConfig, active_fraction
from .atomic import atomic_write
from .data import Review, Sample, data_fingerprint
from .engine import DEPEngine
from .generation import guidance, prompt_embeddings
from .llm import autocast_to, forward_setup, forward_with_cache
from .prompt import PromptIds, get_mode
from .settings import PersonalizationSettings
from .splits import derangement, held_out_targets, test_samples, training_samples, validation_samples
from .store import ReviewStore


CONTRAST_PARTNERS = ("batch", "same-item", "population")
VECTOR_SOURCES = ("own", "shuffled", "population")
GROWN_PARTS = ("none", "joint", "only")  # a part added to the adapter: absent, trained with the rest, or alone


@dataclass
class TrainSettings:
    out: str = "runs/adapter"
    personalization: PersonalizationSettings = field(default_factory=PersonalizationSettings)
    modes: tuple[str, ...] = ("his+diff", "his", "diff", "dep")
    max_target_tokens: int = 128
    max_samples: int | None = None     # cap on training samples (CPU budgets)
    val_samples: int = 128
    epochs: int = 1
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.025
    warmup: float = 0.01
    grad_clip: float = 1.0
    token_norm: str = "auto"           # "auto": rescale soft tokens to the median token norm; "none"; or a number
    sparsity_target: float = 0.05
    sparsity_weight: float = 1e-3
    sae_loss_weight: float = 100.0
    sae_activation: str = "gelu"       # "relu" gives exact zeros; "topk" lets the rho share of units through
    contrast_weight: float = 0.0       # weight of the own-vs-another-user's-vectors margin term
    contrast_margin: float = 0.1       # nats per token the own vectors should beat another user's by
    contrast_partner: str = "batch"    # "batch" (a batch-mate), "same-item" (same product) or "population"
    his_oracle_rate: float = 0.0       # share of training samples with their own target's vector in every his slot
    max_minutes: float | None = None   # stop training after this long (the best checkpoint is kept)
    init_from: str | None = None       # a trained adapter folder to start from (fine-tuning) instead of fresh weights
    end_projectors: str = "none"       # a second projector pair for the "both" layout's copies at the end:
                                       # "none", "joint" (trained with the rest) or "only" (the rest stays as init_from)
    deviation_projectors: str = "none"  # a linear map of each vector's deviation from init_from's population-average
                                        # reviewer, added to its tokens (zero for generic): "none", "joint" or "only"
    eval_every: int = 200              # optimizer steps between validations
    seed: int = 42

    def __post_init__(self):  # refused here, so that the CLI names a bad value before any model loads
        if self.contrast_partner not in CONTRAST_PARTNERS:
            raise ValueError(f"contrast_partner must be one of {', '.join(CONTRAST_PARTNERS)}, "
                             f"got {self.contrast_partner!r}")
        if not 0 <= self.his_oracle_rate <= 1:
            raise ValueError(f"his_oracle_rate must be in [0, 1], got {self.his_oracle_rate}")
        for name in ("end_projectors", "deviation_projectors"):
            if getattr(self, name) not in GROWN_PARTS:
                raise ValueError(f"{name} must be one of {', '.join(GROWN_PARTS)}, got {getattr(self, name)!r}")
            if getattr(self, name) == "only" and not self.init_from:
                raise ValueError(f"{name} 'only' keeps the rest of an adapter as it is: name it with init_from")
        if self.end_projectors != "none" and self.personalization.soft_tokens_at != "both":
            raise ValueError(f"end_projectors {self.end_projectors!r} writes the copies of the 'both' layout; "
                             f"the prompt puts the soft tokens {self.personalization.soft_tokens_at!r}")


class Vectors(NamedTuple):
    """His and diff vectors that stand in for a sample's own (rows are cycled to its slots)."""
    his: np.ndarray
    diff: np.ndarray


@dataclass
class Prepared:
    """A sample turned into tensors-to-be: prompt ids with slots, his/diff vectors, target ids."""
    prompt: PromptIds
    his: np.ndarray
    diff: np.ndarray
    target: list[int]
    user_id: str
    mode: str = field(default="")
    item_id: str = field(default="")


def prepare(engine: DEPEngine, samples: list[Sample], settings: TrainSettings, desc: str,
            store: ReviewStore | None = None) -> list[Prepared]:
    """Contexts (history, peers, differences, from `store`: by default the engine's) and prompts of
    every sample; samples with no usable history are dropped, since they cannot teach the adapter anything."""
    personalization = settings.personalization
    eos = engine.llm.tokenizer.eos_token_id
    prepared = []
    for n, sample in enumerate(tqdm(samples, desc=desc, unit="sample", leave=False)):
        request = engine.sample_request(sample)
        context = engine.context(request, personalization, store)
        if not context.selected:
            continue
        mode = settings.modes[n % len(settings.modes)]
        target = engine.llm.tokenizer.encode(" ".join(sample.target.text.split()), add_special_tokens=False)
        prompt = engine.prompt(request, context, mode, personalization.words_per_review,
                               layout=personalization.layout)
        prepared.append(Prepared(prompt,
                                 context.his, context.diff, target[:settings.max_target_tokens] + [eos],
                                 sample.target.user_id, mode, sample.target.item_id))
    return prepared


def population_vectors(samples: list[Prepared]) -> tuple[np.ndarray, np.ndarray]:
    """(d,) mean his and diff vectors over the training samples: the population-average reviewer."""
    return (np.concatenate([s.his for s in samples]).mean(axis=0),
            np.concatenate([s.diff for s in samples]).mean(axis=0))


def generic_reviewer(adapter: DEPAdapter) -> Vectors:
    """The adapter's population-average reviewer as one his and one diff row: the generic mode's vectors."""
    his, diff = adapter.population()
    return Vectors(his[None], diff[None])


def batch_loss(engine: DEPEngine, adapter: DEPAdapter, batch: list[Prepared],
               borrowed: Sequence[Prepared | Vectors] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-sample LM loss, SAE loss). `borrowed[i]`, if given, supplies sample i's his/diff
    vectors (another user's, or the population's); its rows are cycled to the slots' count."""
    logits, sae_loss = target_logits(engine, adapter, batch, borrowed)
    losses = [F.cross_entropy(row, torch.tensor(sample.target, device=row.device))
              for row, sample in zip(logits, batch)]
    return torch.stack(losses), sae_loss


def target_logits(engine: DEPEngine, adapter: DEPAdapter, batch: list[Prepared],
                  borrowed: Sequence[Prepared | Vectors] | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(each sample's float32 next-token logits at its target tokens, SAE loss); `borrowed` as in `batch_loss`."""
    llm = engine.llm
    sources = borrowed or batch
    his_rows, diff_rows = [], []
    for sample, source in zip(batch, sources):
        take = np.arange(len(sample.his)) % len(source.his)
        his_rows.append(source.his[take])
        diff_rows.append(source.diff[take])
    his = torch.from_numpy(np.concatenate(his_rows)).to(llm.device)
    diff = torch.from_numpy(np.concatenate(diff_rows)).to(llm.device)
    out = adapter(his, diff)
    counts = [len(rows) for rows in his_rows]
    his_tokens, diff_tokens = out["his_tokens"].split(counts), out["diff_tokens"].split(counts)

    sequences, spans = [], []
    for sample, his_t, diff_t in zip(batch, his_tokens, diff_tokens):
        prompt = prompt_embeddings(llm, sample.prompt, his_t if sample.prompt.his_positions else None,
                                   diff_t if sample.prompt.diff_positions else None)
        with torch.no_grad():
            target = llm.embed(torch.tensor(sample.target[:-1], device=llm.device))
        sequences.append(torch.cat([prompt, target]))
        spans.append((len(prompt) - 1, len(sample.target)))
    length = max(len(s) for s in sequences)
    inputs = sequences[0].new_zeros((len(batch), length, sequences[0].shape[-1]))
    mask = torch.zeros((len(batch), length), dtype=torch.long, device=llm.device)
    for row, seq in enumerate(sequences):  # right padding: targets stay where the prompt ends
        inputs[row, :len(seq)] = seq
        mask[row, :len(seq)] = 1
    # Positions before the batch's first trained soft token hold the same constants at every step: run
    # them without autograd and keep only their keys and values, so the backward pass skips them. The
    # prompt's last position stays out of the cache: its output predicts the first target token.
    first_trained = 1 if out["his_tokens"].dim() == 3 and not out["his_tokens"][..., 0, :].requires_grad else 0
    frozen = min(min(s.prompt.slots_from_copy(first_trained), default=len(s.prompt.ids) - 1) for s in batch)
    logits = []
    with autocast_to(llm.prefill_dtype, llm.device.type):  # bf16 on CPUs with bf16 units (1.6-1.8x a step), else as is
        with torch.no_grad():
            past = forward_with_cache(llm.model.base_model, inputs_embeds=inputs[:, :frozen],
                                      attention_mask=mask[:, :frozen])[1] if frozen else None
        hidden = forward_with_cache(llm.model.base_model, past, inputs_embeds=inputs[:, frozen:],
                                    attention_mask=mask)[0].last_hidden_state
        for row, (start, count) in enumerate(spans):
            start -= frozen  # target tokens only
            logits.append(llm.model.get_output_embeddings()(hidden[row, start:start + count]).float())
    return logits, out["sae_loss"]


def contrast_partners(batch: list[Prepared], settings: TrainSettings, step: int,
                      by_item: dict[str, list[Prepared]] | None = None) -> list[Prepared]:
    """Whose vectors each sample of the batch is contrasted with: a batch-mate, or (same-item) another
    user's sample for the same product, a batch-mate only where the product has no other reviewer."""
    mates = [batch[p] for p in derangement(len(batch), settings.seed + step)]
    if settings.contrast_partner == "batch" or not by_item:
        return mates
    rng = random.Random(settings.seed * 100_003 + step)
    partners = []
    for sample, mate in zip(batch, mates):
        others = [o for o in by_item.get(sample.item_id, ()) if o.user_id != sample.user_id]
        partners.append(rng.choice(others) if others else mate)
    return partners


def training_loss(engine: DEPEngine, adapter: DEPAdapter, batch: list[Prepared], settings: TrainSettings,
                  step: int, by_item: dict[str, list[Prepared]] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss to minimise for one batch, and its parts for the log. With a contrast weight, the
    batch runs twice in one forward pass: with its own vectors and with a partner's (`contrast_partners`);
    against the population, the partner's pass runs first without gradient."""
    if settings.contrast_weight and settings.contrast_partner == "population":
        with torch.no_grad():  # a fixed bar: the generic prompt's loss is not pushed up
            other = batch_loss(engine, adapter, batch, [generic_reviewer(adapter)] * len(batch))[0]
        own, sae_loss = batch_loss(engine, adapter, batch)
        contrast = F.relu(settings.contrast_margin - (other - own)).mean()
    elif settings.contrast_weight and len(batch) > 1:
        partners = contrast_partners(batch, settings, step, by_item)
        per_sample, sae_loss = batch_loss(engine, adapter, batch + batch, batch + partners)
        own, other = per_sample[:len(batch)], per_sample[len(batch):]
        contrast = F.relu(settings.contrast_margin - (other - own)).mean()
    else:
        own, sae_loss = batch_loss(engine, adapter, batch)
        other, contrast = own.detach(), own.new_zeros(())
    lm_loss = own.mean()
    loss = lm_loss + settings.sae_loss_weight * sae_loss + settings.contrast_weight * contrast
    return loss, {"loss": loss.item(), "lm_loss": lm_loss.item(), "sae_loss": sae_loss.item(),
                  "contrast": contrast.item(), "own_minus_other": float((other - own).detach().mean())}


def evaluate_loss(engine: DEPEngine, adapter: DEPAdapter, samples: list[Prepared], batch_size: int,
                  vectors: str | Sequence[Vectors] = "own", seed: int = 0) -> np.ndarray:
    """Per-sample LM loss of the targets with each sample's own his/diff vectors, another user's
    ("shuffled": a derangement drawn with `seed`), the population-average reviewer's ("population"),
    or given ones (one `Vectors` per sample, for instance an oracle's)."""
    given = None if isinstance(vectors, str) else list(vectors)
    if given is None and vectors not in VECTOR_SOURCES:
        raise ValueError(f"vectors must be one of {', '.join(VECTOR_SOURCES)} or one Vectors per sample, "
                         f"got {vectors!r}")
    if given is not None and len(given) != len(samples):
        raise ValueError(f"{len(given)} given vectors for {len(samples)} samples")
    partner = derangement(len(samples), seed)
    population = generic_reviewer(adapter)
    losses = []
    with torch.no_grad():
        for start in tqdm(range(0, len(samples), batch_size), leave=False, unit="batch",
                          desc=f"LM loss with {'given' if given is not None else vectors} vectors"):
            batch = samples[start:start + batch_size]
            borrowed = given[start:start + len(batch)] if given is not None else {
                "own": None, "population": [population] * len(batch),
                "shuffled": [samples[partner[i]] for i in range(start, start + len(batch))]}[vectors]
            losses.append(batch_loss(engine, adapter, batch, borrowed)[0].cpu())
    return torch.cat(losses).numpy() if losses else np.zeros(0)


def guided_loss(engine: DEPEngine, adapter: DEPAdapter, samples: list[Prepared], batch_size: int,
                scales: Sequence[float]) -> tuple[np.ndarray, dict[float, np.ndarray]]:
    """Per-sample LM loss of the targets with the population-average reviewer's vectors, and with the
    sample's own vectors under decode-time guidance at each scale (`generation.guidance`; scale 0 is the
    plain own loss): which guidance makes the user's real next review likeliest, without generating."""
    population = generic_reviewer(adapter)
    generic_losses, guided = [], {scale: [] for scale in scales}
    with torch.no_grad():
        for start in tqdm(range(0, len(samples), batch_size), desc="LM loss with own and population vectors",
                          unit="batch", leave=False):
            batch = samples[start:start + batch_size]
            own = target_logits(engine, adapter, batch)[0]
            generic = target_logits(engine, adapter, batch, [population] * len(batch))[0]
            targets = [torch.tensor(sample.target, device=row.device) for row, sample in zip(own, batch)]
            generic_losses += [F.cross_entropy(g, t).item() for g, t in zip(generic, targets)]
            for scale in scales:
                guided[scale] += [F.cross_entropy(guidance(o.log_softmax(-1), g.log_softmax(-1), scale), t).item()
                                  for o, g, t in zip(own, generic, targets)]
    return np.array(generic_losses), {scale: np.array(losses) for scale, losses in guided.items()}


def _lr_at(step: int, total: int, settings: TrainSettings) -> float:
    warmup = max(1, int(total * settings.warmup))
    if step < warmup:
        return settings.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return settings.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _save_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    """AdamW state as safetensors (no pickle anywhere in a checkpoint)."""
    tensors = {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"{index}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    atomic_write(path, lambda tmp: save_file(tensors, tmp))


def _load_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    flat = load_file(path)
    state: dict = {}
    for name, value in flat.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    full = optimizer.state_dict()
    full["state"] = state
    optimizer.load_state_dict(full)


def _log(path: Path, record: dict) -> None:
    with open(path, "a") as out:
        out.write(json.dumps(record) + "\n")


def datasets(engine: DEPEngine, settings: TrainSettings) -> tuple[list[Prepared], list[Prepared], list[Prepared]]:
    """Prepared training and validation samples, their peers drawn from a pool without held-out targets,
    and the samples contrast partners come from: for a same-item contrast every training sample (a
    product's other reviewers are rarely all within a capped training set), else the training set."""
    reviews = engine.dataset.reviews
    store = engine.store.without(held_out_targets(reviews))
    train_raw = training_samples(reviews)
    rng = random.Random(settings.seed)
    rng.shuffle(train_raw)
    rest = train_raw[settings.max_samples:] if settings.max_samples else []
    train_raw = train_raw[:settings.max_samples] if settings.max_samples else train_raw
    val_raw = validation_samples(reviews)
    rng.shuffle(val_raw)
    train_set = prepare(engine, train_raw, settings, "preparing training samples", store)
    val_set = prepare(engine, val_raw[:settings.val_samples], settings, "preparing validation samples", store)
    partners = train_set
    if settings.contrast_weight and settings.contrast_partner == "same-item" and rest:
        partners = train_set + prepare(engine, rest, settings, "preparing contrast partners", store)
    if settings.his_oracle_rate:
        train_set = with_his_oracle(engine, train_set, train_raw, settings.his_oracle_rate, settings.seed)
    return train_set, val_set, partners


def target_vectors(engine: DEPEngine, samples: list[Prepared], raw: list[Sample]) -> np.ndarray:
    """(n, d) each prepared sample's target review as the pool embeds it (text and style features)."""
    targets = {(s.target.user_id, s.target.item_id): s.target for s in raw}
    return engine.store.embed_reviews([targets[s.user_id, s.item_id] for s in samples])


def with_his_oracle(engine: DEPEngine, samples: list[Prepared], raw: list[Sample], rate: float,
                    seed: int) -> list[Prepared]:
    """The samples, a share `rate` of them (drawn with `seed`) with their target review's own vector in
    every his slot: a restating task, so that the slots learn to carry a review's content (round 11 found
    that, trained on past reviews alone, they carry almost none)."""
    chosen = sorted(random.Random(seed).sample(range(len(samples)), round(rate * len(samples))))
    out = list(samples)
    for n, row in zip(chosen, target_vectors(engine, [samples[n] for n in chosen], raw)):
        out[n] = replace(samples[n], his=np.repeat(row[None], len(samples[n].his), axis=0))
    return out


def new_adapter(engine: DEPEngine, settings: TrainSettings, train_set: list[Prepared]) -> DEPAdapter:
    token_norm = (engine.llm.token_norm() if settings.token_norm == "auto"
                  else None if settings.token_norm == "none" else float(settings.token_norm))
    config = DEPAdapterConfig(
        embedding_dim=engine.store.dim, hidden_size=engine.llm.hidden_size, llm=engine.config.llm,
        encoder=engine.encoder.name, sparsity_target=settings.sparsity_target,
        sparsity_weight=settings.sparsity_weight, sae_loss_weight=settings.sae_loss_weight,
        sae_activation=settings.sae_activation, token_norm=token_norm, style_features=engine.store.style)
    if settings.init_from:  # fine-tuning: its weights, checked against this LLM, encoder and style features
        start = DEPAdapter.from_pretrained(settings.init_from, llm=config.llm, hidden_size=config.hidden_size,
                                           encoder=config.encoder, embedding_dim=config.embedding_dim)
        sparsified = config.sae_activation == "topk"  # any trained code can be made sparse by construction
        if start.config.style_features != config.style_features or (
                start.config.sae_activation != config.sae_activation and not sparsified):
            raise ValueError(f"{settings.init_from}: trained with style features {start.config.style_features!r} and "
                             f"a {start.config.sae_activation} code, not {config.style_features!r} and {config.sae_activation}")
        for part in ("end_projectors", "deviation_projectors"):
            if getattr(start.config, part) and getattr(settings, part) == "none":
                raise ValueError(f"{settings.init_from}: has {part.replace('_', ' ')}; fine-tune it with {part} "
                                 f"'joint' or 'only'" + (" and the 'both' layout" if part == "end_projectors" else ""))
        adapter = DEPAdapter(replace(config, end_projectors=start.config.end_projectors,
                                     deviation_projectors=start.config.deviation_projectors))
        adapter.load_state_dict(start.state_dict())
    else:
        adapter = DEPAdapter(config)
    adapter = adapter.grow(end_projectors=settings.end_projectors != "none",
                           deviation_projectors=settings.deviation_projectors != "none")
    alone = [*(adapter.end_projector_parameters() if settings.end_projectors == "only" else []),
             *(adapter.deviation_parameters() if settings.deviation_projectors == "only" else [])]
    if alone:  # the rest stays as init_from made it
        adapter.requires_grad_(False)
        for parameter in alone:
            parameter.requires_grad_(True)
    if not (settings.init_from and adapter.config.deviation_projectors):  # keep the deviations' zero point
        adapter.set_population(*map(torch.from_numpy, population_vectors(train_set)))
    return adapter.to(engine.llm.device)


def sae_active_fraction(adapter: DEPAdapter, samples: list[Prepared]) -> float:
    """Mean share of SAE code units clearly active on the samples' his and diff vectors."""
    device = next(adapter.parameters()).device
    with torch.no_grad():
        out = adapter.encode(torch.from_numpy(np.concatenate([s.his for s in samples])).to(device),
                             torch.from_numpy(np.concatenate([s.diff for s in samples])).to(device))
    return active_fraction(torch.cat([out["his_code"], out["diff_code"]]))


def personal_likelihood(engine: DEPEngine, adapter: DEPAdapter, samples: list[Prepared], batch_size: int,
                        seed: int = 0, guidance_scales: Sequence[float] = (),
                        his_oracle: Sequence[Vectors] | None = None) -> dict:
    """How much likelier held-out targets are with their own vectors than with another user's or the
    population-average reviewer's (the generic mode): mean LM loss in nats per target token each way
    and the paired gaps, and each sample's three losses (`per_sample`: to pair runs of other settings);
    with `guidance_scales`, the same under decode-time guidance at each scale, against the unguided own
    loss; with `his_oracle` (one `Vectors` per sample), the loss with those vectors, against the own
    loss and the population's. It needs no generation, so it reads the person in the vectors without
    the sampling noise that makes one generated text per user mostly chance."""
    from .metrics import paired_bootstrap

    population, guided = guided_loss(engine, adapter, samples, batch_size, (0.0, *guidance_scales))
    own = guided[0.0]
    shuffled = evaluate_loss(engine, adapter, samples, batch_size, "shuffled", seed)
    report = {"lm_loss_own": float(own.mean()), "lm_loss_shuffled_users": float(shuffled.mean()),
              "lm_loss_population": float(population.mean()),
              "gain_over_shuffled_nats": paired_bootstrap(shuffled, own),
              "gain_over_population_nats": paired_bootstrap(population, own), "n": int(len(own)),
              "sae_active_fraction": sae_active_fraction(adapter, samples), "forward": forward_setup(engine.llm),
              "per_sample": [{"user_id": s.user_id, "item_id": s.item_id, "own": float(o), "shuffled": float(sh),
                              "population": float(po)} for s, o, sh, po in zip(samples, own, shuffled, population)]}
    if guidance_scales:
        report["guidance"] = {f"{scale:g}": {"lm_loss": float(guided[scale].mean()),
                                             "gain_over_unguided_nats": paired_bootstrap(own, guided[scale]),
                                             "gain_over_population_nats": paired_bootstrap(population, guided[scale])}
                              for scale in guidance_scales}
    if his_oracle is not None:
        oracle = evaluate_loss(engine, adapter, samples, batch_size, his_oracle)
        report["his_oracle"] = {"lm_loss": float(oracle.mean()), "gain_over_own_nats": paired_bootstrap(own, oracle),
                                "gain_over_population_nats": paired_bootstrap(population, oracle)}
    return report


def held_out_likelihood(engine: DEPEngine, split: str, settings: TrainSettings, limit: int | None = None,
                        guidance_scales: Sequence[float] = (), his_oracle: bool = False) -> dict:
    """`personal_likelihood` of the engine's adapter on validation or test users' targets, their peers
    drawn as in training (no held-out target among them), every prompt in the first of `settings.modes`.
    `his_oracle`: also with the target review's own vector in every his slot (diff slots keep the
    user's), which no real request has: how much the his channel could carry about the review to write."""
    one_mode = replace(settings, modes=settings.modes[:1])
    soft = get_mode(one_mode.modes[0]).soft
    if not soft and (guidance_scales or his_oracle):
        raise ValueError(f"mode {one_mode.modes[0]!r} has no soft tokens: guidance and the his oracle need them")
    raw = {"val": validation_samples, "test": test_samples}[split](engine.dataset.reviews)
    raw = raw[:limit] if limit else raw
    store = engine.store.without(held_out_targets(engine.dataset.reviews))
    samples = prepare(engine, raw, one_mode, f"preparing {split} samples", store)
    if not soft:  # no vectors to swap: the loss with the prompt's texts alone
        own = evaluate_loss(engine, engine.adapter, samples, settings.batch_size)
        return {"split": split, "mode": one_mode.modes[0], "lm_loss_own": float(own.mean()), "n": int(len(own)),
                "forward": forward_setup(engine.llm),
                "per_sample": [{"user_id": s.user_id, "item_id": s.item_id, "own": float(o)}
                               for s, o in zip(samples, own)]}
    oracle = None
    if his_oracle:
        oracle = [Vectors(row[None], s.diff) for row, s in zip(target_vectors(engine, samples, raw), samples)]
    report = personal_likelihood(engine, engine.adapter, samples, settings.batch_size, settings.seed,
                                 guidance_scales, oracle)
    return {"split": split, "mode": one_mode.modes[0], **report}


def train(engine: DEPEngine, settings: TrainSettings, resume: bool = True) -> Path:
    """Train, validate every `eval_every` steps, keep the best adapter in `settings.out`."""
    out, log_path = Path(settings.out), Path(settings.out) / "log.jsonl"
    last = out / "last"
    out.mkdir(parents=True, exist_ok=True)
    random.seed(settings.seed)
    torch.manual_seed(settings.seed)
    train_set, val_set, partners = datasets(engine, settings)
    by_item: dict[str, list[Prepared]] = {}
    for sample in partners:
        by_item.setdefault(sample.item_id, []).append(sample)
    adapter = new_adapter(engine, settings, train_set)
    optimizer = torch.optim.AdamW([p for p in adapter.parameters() if p.requires_grad], lr=settings.lr,
                                  weight_decay=settings.weight_decay)
    steps_per_epoch = math.ceil(len(train_set) / settings.batch_size)
    total = steps_per_epoch * settings.epochs
    step, best = 0, float("inf")
    if resume and (last / "state.json").exists():
        state = json.loads((last / "state.json").read_text())
        adapter.load_state_dict(DEPAdapter.from_pretrained(last).state_dict())
        _load_optimizer(optimizer, last / "optimizer.safetensors")
        step, best = state["step"], state["best"]
        print(f"resuming from step {step} of {total}")

    def validate() -> dict:
        adapter.eval()
        loss = float(evaluate_loss(engine, adapter, val_set, settings.batch_size).mean())
        adapter.train()
        return {"val_lm_loss": loss, "sae_active_fraction": sae_active_fraction(adapter, val_set)}

    if step == 0:
        _log(log_path, {"step": 0, **validate()})
    adapter.train()
    started = time.perf_counter()
    deadline = started + 60 * settings.max_minutes if settings.max_minutes else float("inf")
    bar = tqdm(total=total, initial=step, desc="training", unit="step")
    while step < total:
        epoch, within = divmod(step, steps_per_epoch)
        order = list(range(len(train_set)))
        random.Random(settings.seed + epoch).shuffle(order)
        batch = [train_set[i] for i in order[within * settings.batch_size:(within + 1) * settings.batch_size]]
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, total, settings)
        loss, parts = training_loss(engine, adapter, batch, settings, step, by_item)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(adapter.parameters(), settings.grad_clip)
        optimizer.step()
        step += 1
        record = {"step": step, "epoch": epoch, **parts, "grad_norm": float(grad_norm),
                  "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.perf_counter() - started, 1)}
        bar.set_postfix(lm=f"{parts['lm_loss']:.3f}", sae=f"{parts['sae_loss']:.4f}")
        bar.update(1)
        out_of_time = time.perf_counter() > deadline
        if step % settings.eval_every == 0 or step == total or out_of_time:
            record.update(validate())
            if record["val_lm_loss"] < best:
                best = record["val_lm_loss"]
                _finalize(adapter, settings, engine, out, {"train_samples": len(train_set), "best_step": step,
                                                           "best_val_lm_loss": best})
            adapter.save_pretrained(last)
            _save_optimizer(optimizer, last / "optimizer.safetensors")
            atomic_write(last / "state.json", lambda p: Path(p).write_text(json.dumps({"step": step, "best": best})))
        _log(log_path, record)
        if out_of_time:
            print(f"stopped at step {step} of {total}: the {settings.max_minutes:g}-minute budget is spent")
            break
    bar.close()

    best_adapter = DEPAdapter.from_pretrained(out).to(engine.llm.device).eval()
    control = personal_likelihood(engine, best_adapter, val_set, settings.batch_size, settings.seed)
    del control["per_sample"]  # the means and gaps go in the adapter's config, not 128 rows of losses
    control["val_lm_loss_before_training"] = json.loads(log_path.read_text().splitlines()[0]).get("val_lm_loss")
    control["steps_done"] = step
    print(json.dumps(control, indent=2))
    best_adapter.config.training["personal_likelihood"] = control
    best_adapter.save_pretrained(out)
    plot_log(log_path, out / "loss.png")
    return out


def plot_log(log_path: Path, png: Path) -> None:
    """Training LM loss (smoothed) and validation LM loss against optimizer steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(log_path).read_text().splitlines()]
    train_steps = [(r["step"], r["lm_loss"]) for r in records if "lm_loss" in r]
    val_steps = [(r["step"], r["val_lm_loss"]) for r in records if "val_lm_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train_steps:
        steps, losses = zip(*train_steps)
        window = max(1, len(losses) // 50)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, label=f"train LM loss (mean of {window} steps)", color="#9ecae9")
    if val_steps:
        ax.plot(*zip(*val_steps), "o-", label="validation LM loss", color="#e45756")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("nats per target token")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _finalize(adapter: DEPAdapter, settings: TrainSettings, engine: DEPEngine, out: Path, extra: dict) -> None:
    adapter.config.trained = True
    adapter.config.training = {"settings": asdict(settings), "data": engine.config.data,
                               "data_fingerprint": data_fingerprint(engine.dataset.reviews),
                               **extra}
    adapter.save_pretrained(out)
