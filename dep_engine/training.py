"""Training the DEP adapter against the frozen LLM.

Loss = cross-entropy on the target review's tokens only (prompt masked)
     + sae_loss_weight * (smooth-L1 reconstruction + sparsity_weight * KL(rho || mean activation))
     + contrast_weight * mean(relu(contrast_margin - (LM loss with another user's vectors - LM loss with own)))
The last term (off by default; the paper has none) rewards a sample's own vectors over another
user's: without it the adapter can learn a task prompt that any user's vectors unlock. The other
user is a batch-mate (`ContrastPartner.BATCH`), whose vectors a model can tell apart by topic
alone, or another training user who reviewed the same product (`SAME_ITEM`, the shipped adapter's),
which leaves the person as the difference to learn.
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
from enum import StrEnum
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .adapter import DEPAdapter, DEPAdapterConfig, active_fraction
from .atomic import atomic_write
from .choices import ContrastPartner, SaeActivation, choice
from .data import Sample, data_fingerprint
from .engine import DEPEngine
from .llm import autocast_to, forward_setup, forward_with_cache
from .prompt import PromptIds, get_mode
from .settings import PersonalizationSettings, described
from .soft_prompt import prompt_embeddings
from .splits import derangement, held_out_targets, test_samples, training_samples, validation_samples
from .store import ReviewStore


class VectorSource(StrEnum):
    """Whose his and diff vectors a sample's prompt gets when its loss is measured."""
    OWN = "own"                # the sample's own
    SHUFFLED = "shuffled"      # another user's (a derangement)
    POPULATION = "population"  # the population-average reviewer's (the generic mode's)


@dataclass
class TrainSettings:
    """How `train` fits the adapter. Every field but `personalization` is also a `train` option (`cli.py`)."""
    out: str = field(default="runs/adapter", metadata=described("where the adapter, its log and checkpoints go"))
    personalization: PersonalizationSettings = field(default_factory=PersonalizationSettings)
    modes: tuple[str, ...] = field(default=("his+diff", "his", "diff", "dep"), metadata=described(
        "prompt modes the training samples take in turn (one adapter serves them all)"))
    max_target_tokens: int = field(default=128, metadata=described("target review tokens trained on"))
    max_samples: int | None = field(default=None, metadata=described("cap on training samples (CPU budgets)"))
    val_samples: int = field(default=128, metadata=described("validation samples for the best-checkpoint loss"))
    epochs: int = field(default=1, metadata=described("passes over the training samples"))
    batch_size: int = field(default=8, metadata=described("samples per optimizer step"))
    lr: float = field(default=1e-4, metadata=described("peak learning rate (cosine decay after warm-up)"))
    weight_decay: float = field(default=0.025, metadata=described("AdamW weight decay"))
    warmup: float = field(default=0.01, metadata=described("share of the steps spent warming up"))
    grad_clip: float = field(default=1.0, metadata=described("gradient norm clip"))
    token_norm: str = field(default="auto", metadata=described(
        "rescale soft tokens: auto (the LLM's median token norm), none, or a number"))
    sparsity_target: float = field(default=0.05, metadata=described("rho of the SAE's KL sparsity penalty"))
    sparsity_weight: float = field(default=1e-3, metadata=described("KL weight inside the SAE loss"))
    sae_loss_weight: float = field(default=100.0, metadata=described("weight of the SAE loss beside the LM loss"))
    sae_activation: SaeActivation = field(default=SaeActivation.GELU, metadata=described(
        "the SAE code's activation: gelu (the paper's) or relu (exact zeros)"))
    contrast_weight: float = field(default=0.0, metadata=described(
        "weight of a margin term rewarding a sample's own vectors over another user's (0: off, the paper's loss)"))
    contrast_margin: float = field(default=0.1, metadata=described(
        "nats per token the own vectors should beat another user's by"))
    contrast_partner: ContrastPartner = field(default=ContrastPartner.BATCH, metadata=described(
        "the other user: a batch-mate, or another reviewer of the same product (then only the person differs)"))
    max_minutes: float | None = field(default=None, metadata=described(
        "stop training after this long (the best checkpoint is kept)"))
    init_from: str | None = field(default=None, metadata=described(
        "a trained adapter folder to fine-tune instead of fresh weights"))
    eval_every: int = field(default=200, metadata=described("optimizer steps between validations"))
    seed: int = field(default=42, metadata=described("shuffling, partners and initial weights"))

    def __post_init__(self):  # refused here, so that the CLI names a bad value before any model loads
        self.contrast_partner = choice(ContrastPartner, self.contrast_partner, "contrast_partner")
        self.sae_activation = choice(SaeActivation, self.sae_activation, "sae_activation")
        for mode in self.modes:
            get_mode(mode)


class Vectors(NamedTuple):
    """His and diff vectors that stand in for a sample's own (rows are cycled to its slots)."""
    his: np.ndarray
    diff: np.ndarray


@dataclass
class TrainingExample:
    """A sample turned into tensors-to-be: prompt ids with slots, his/diff vectors, target ids."""
    prompt: PromptIds
    his: np.ndarray
    diff: np.ndarray
    target: list[int]
    user_id: str
    mode: str = field(default="")
    item_id: str = field(default="")


def prepare(engine: DEPEngine, samples: list[Sample], settings: TrainSettings, desc: str,
            store: ReviewStore | None = None) -> list[TrainingExample]:
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
        prepared.append(TrainingExample(prompt,
                                 context.his, context.diff, target[:settings.max_target_tokens] + [eos],
                                 sample.target.user_id, mode, sample.target.item_id))
    return prepared


def population_vectors(samples: list[TrainingExample]) -> tuple[np.ndarray, np.ndarray]:
    """(d,) mean his and diff vectors over the training samples: the population-average reviewer."""
    return (np.concatenate([s.his for s in samples]).mean(axis=0),
            np.concatenate([s.diff for s in samples]).mean(axis=0))


def generic_reviewer(adapter: DEPAdapter) -> Vectors:
    """The adapter's population-average reviewer as one his and one diff row: the generic mode's vectors."""
    his, diff = adapter.population()
    return Vectors(his[None], diff[None])


def batch_loss(engine: DEPEngine, adapter: DEPAdapter, batch: list[TrainingExample],
               borrowed: Sequence[TrainingExample | Vectors] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-sample LM loss, SAE loss). `borrowed[i]`, if given, supplies sample i's his/diff
    vectors (another user's, or the population's); its rows are cycled to the slots' count."""
    logits, sae_loss = target_logits(engine, adapter, batch, borrowed)
    losses = [F.cross_entropy(row, torch.tensor(sample.target, device=row.device))
              for row, sample in zip(logits, batch)]
    return torch.stack(losses), sae_loss


def target_logits(engine: DEPEngine, adapter: DEPAdapter, batch: list[TrainingExample],
                  borrowed: Sequence[TrainingExample | Vectors] | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
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
    # Positions before the batch's first soft token hold the same constants at every step: run them
    # without autograd and keep only their keys and values, so the backward pass skips them. The
    # prompt's last position stays out of the cache: its output predicts the first target token.
    frozen = min(min(s.prompt.his_positions + s.prompt.diff_positions, default=len(s.prompt.ids) - 1) for s in batch)
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


def contrast_partners(batch: list[TrainingExample], settings: TrainSettings, step: int,
                      by_item: dict[str, list[TrainingExample]] | None = None) -> list[TrainingExample]:
    """Whose vectors each sample of the batch is contrasted with: a batch-mate, or (same-item) another
    user's sample for the same product, a batch-mate only where the product has no other reviewer."""
    mates = [batch[p] for p in derangement(len(batch), settings.seed + step)]
    if settings.contrast_partner == ContrastPartner.BATCH or not by_item:
        return mates
    rng = random.Random(settings.seed * 100_003 + step)
    partners = []
    for sample, mate in zip(batch, mates):
        others = [o for o in by_item.get(sample.item_id, ()) if o.user_id != sample.user_id]
        partners.append(rng.choice(others) if others else mate)
    return partners


def training_loss(engine: DEPEngine, adapter: DEPAdapter, batch: list[TrainingExample], settings: TrainSettings,
                  step: int, by_item: dict[str, list[TrainingExample]] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss to minimise for one batch, and its parts for the log. With a contrast weight, the
    batch runs twice in one forward pass: with its own vectors and with a partner's (`contrast_partners`)."""
    if settings.contrast_weight and len(batch) > 1:
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


def evaluate_loss(engine: DEPEngine, adapter: DEPAdapter, samples: list[TrainingExample], batch_size: int,
                  vectors: VectorSource = VectorSource.OWN, seed: int = 0) -> np.ndarray:
    """Per-sample LM loss of the targets with each sample's own his/diff vectors, another user's
    (a derangement drawn with `seed`), or the population-average reviewer's."""
    vectors = choice(VectorSource, vectors, "vectors")
    partner = derangement(len(samples), seed)
    population = generic_reviewer(adapter)
    losses = []
    with torch.no_grad():
        for start in tqdm(range(0, len(samples), batch_size), leave=False, unit="batch",
                          desc=f"LM loss with {vectors} vectors"):
            batch = samples[start:start + batch_size]
            borrowed = {VectorSource.OWN: None, VectorSource.POPULATION: [population] * len(batch),
                        VectorSource.SHUFFLED: [samples[partner[i]] for i in range(start, start + len(batch))]}[vectors]
            losses.append(batch_loss(engine, adapter, batch, borrowed)[0].cpu())
    return torch.cat(losses).numpy() if losses else np.zeros(0)


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


def datasets(engine: DEPEngine, settings: TrainSettings) -> tuple[list[TrainingExample], list[TrainingExample], list[TrainingExample]]:
    """TrainingExample training and validation samples, their peers drawn from a pool without held-out targets,
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
    if settings.contrast_weight and settings.contrast_partner == ContrastPartner.SAME_ITEM and rest:
        partners = train_set + prepare(engine, rest, settings, "preparing contrast partners", store)
    return train_set, val_set, partners


def new_adapter(engine: DEPEngine, settings: TrainSettings, train_set: list[TrainingExample]) -> DEPAdapter:
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
        if (start.config.style_features, start.config.sae_activation) != (config.style_features, config.sae_activation):
            raise ValueError(f"{settings.init_from}: trained with style features {start.config.style_features!r} and "
                             f"a {start.config.sae_activation} code, not {config.style_features!r} and {config.sae_activation}")
    adapter = DEPAdapter(config)
    if settings.init_from:
        adapter.load_state_dict(start.state_dict())
    adapter.set_population(*map(torch.from_numpy, population_vectors(train_set)))
    return adapter.to(engine.llm.device)


def sae_active_fraction(adapter: DEPAdapter, samples: list[TrainingExample]) -> float:
    """Mean share of SAE code units clearly active on the samples' his and diff vectors."""
    device = next(adapter.parameters()).device
    with torch.no_grad():
        out = adapter.encode(torch.from_numpy(np.concatenate([s.his for s in samples])).to(device),
                             torch.from_numpy(np.concatenate([s.diff for s in samples])).to(device))
    return active_fraction(torch.cat([out["his_code"], out["diff_code"]]))


def personal_likelihood(engine: DEPEngine, adapter: DEPAdapter, samples: list[TrainingExample], batch_size: int,
                        seed: int = 0) -> dict:
    """How much likelier held-out targets are with their own vectors than with another user's or the
    population-average reviewer's (the generic mode): mean LM loss in nats per target token each way
    and the paired gaps, and each sample's three losses (`per_sample`: to pair runs of other settings).
    It needs no generation, so it reads the person in the vectors without the sampling noise that makes
    one generated text per user mostly chance."""
    from .metrics import paired_bootstrap

    own = evaluate_loss(engine, adapter, samples, batch_size, VectorSource.OWN)
    population = evaluate_loss(engine, adapter, samples, batch_size, VectorSource.POPULATION)
    shuffled = evaluate_loss(engine, adapter, samples, batch_size, VectorSource.SHUFFLED, seed)
    return {"lm_loss_own": float(own.mean()), "lm_loss_shuffled_users": float(shuffled.mean()),
            "lm_loss_population": float(population.mean()),
            "gain_over_shuffled_nats": paired_bootstrap(shuffled, own),
            "gain_over_population_nats": paired_bootstrap(population, own), "n": int(len(own)),
            "sae_active_fraction": sae_active_fraction(adapter, samples), "forward": forward_setup(engine.llm),
            "per_sample": [{"user_id": s.user_id, "item_id": s.item_id, "own": float(o), "shuffled": float(sh),
                            "population": float(po)} for s, o, sh, po in zip(samples, own, shuffled, population)]}


def held_out_likelihood(engine: DEPEngine, split: str, settings: TrainSettings, limit: int | None = None) -> dict:
    """`personal_likelihood` of the engine's adapter on validation or test users' targets, their peers
    drawn as in training (no held-out target among them), every prompt in the first of `settings.modes`."""
    one_mode = replace(settings, modes=settings.modes[:1])
    raw = {"val": validation_samples, "test": test_samples}[split](engine.dataset.reviews)
    raw = raw[:limit] if limit else raw
    store = engine.store.without(held_out_targets(engine.dataset.reviews))
    samples = prepare(engine, raw, one_mode, f"preparing {split} samples", store)
    if not get_mode(one_mode.modes[0]).soft:  # no vectors to swap: the loss with the prompt's texts alone
        own = evaluate_loss(engine, engine.adapter, samples, settings.batch_size)
        return {"split": split, "mode": one_mode.modes[0], "lm_loss_own": float(own.mean()), "n": int(len(own)),
                "forward": forward_setup(engine.llm),
                "per_sample": [{"user_id": s.user_id, "item_id": s.item_id, "own": float(o)}
                               for s, o in zip(samples, own)]}
    report = personal_likelihood(engine, engine.adapter, samples, settings.batch_size, settings.seed)
    return {"split": split, "mode": one_mode.modes[0], **report}


def train(engine: DEPEngine, settings: TrainSettings, resume: bool = True) -> Path:
    """Train, validate every `eval_every` steps, keep the best adapter in `settings.out`."""
    out, log_path = Path(settings.out), Path(settings.out) / "log.jsonl"
    last = out / "last"
    out.mkdir(parents=True, exist_ok=True)
    random.seed(settings.seed)
    torch.manual_seed(settings.seed)
    train_set, val_set, partners = datasets(engine, settings)
    by_item: dict[str, list[TrainingExample]] = {}
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
