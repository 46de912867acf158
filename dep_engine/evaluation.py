"""Evaluation: every method on users the adapter never saw, with paired bootstrap intervals.

A method is `mode[-shuffled][@k=N][@alpha=A]`, for instance `dep`, `rag@k=1`, `dep-shuffled`,
`dep@alpha=0.5`, `generic`. `-shuffled` is the control that decides whether anything is personal: the
same prompt, but the his and diff vectors of another user (a fixed derangement of the evaluated users).
`generic` is the same prompt as `dep` with the population-average reviewer's vectors; `@alpha=A` mixes
them: generic + A * (user - generic). `--split val` evaluates the validation users
(for choices made before the test users are looked at), `test` (default) the test users.
Every output goes through the same hygiene (`hygiene.clean`); the raw text, whether it ran out of
tokens, and the cut are kept.
All methods of a group of users are decoded in one batch with one seed, so every method sees the
same sampling noise. Generations are appended group by group to generations.jsonl, so an
interrupted run resumes where it stopped.
"""
from __future__ import annotations

import json
import random
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from . import hygiene, safety
from .data import DataError, Sample, by_user, load_dataset
from .engine import DEPEngine, EngineConfig, end_after_words
from .generation import submit
from .llm import decoding, forward_setup
from .paper_engine import build_engine
from .prompt import get_mode
from .settings import PersonalizationSettings, SamplingSettings
from .splits import derangement, held_out_targets, test_samples, validation_samples
from .store import PersonalContext, ReviewStore

# The version of what `evaluate` writes (generations.jsonl records, results.json, pooled.json): bump it when
# a field's meaning changes. Files without it are older: their records may lack `ran_out`.
FORMAT_VERSION = 1

_METHOD = re.compile(r"^(?P<mode>[a-z+]+)(?P<shuffled>-shuffled)?(@k=(?P<k>\d+))?(@alpha=(?P<alpha>[0-9.]+))?$")


@dataclass(frozen=True)
class Method:
    name: str
    mode: str
    k: int
    shuffled: bool
    strength: float = 1.0


def parse_method(name: str, default_k: int) -> Method:
    match = _METHOD.match(name.strip())
    if not match:
        raise ValueError(f"method {name!r}: expected mode[-shuffled][@k=N][@alpha=A], e.g. dep, "
                         "rag@k=1, dep-shuffled, dep@alpha=0.5")
    mode = get_mode(match["mode"])
    if (match["shuffled"] or match["alpha"]) and not mode.soft:
        raise ValueError(f"method {name!r}: only soft-token modes take another user's vectors or a strength")
    k = int(match["k"]) if match["k"] is not None else default_k
    strength = float(match["alpha"]) if match["alpha"] is not None else 1.0
    return Method(name.strip(), mode.name, k if mode.uses_history else 0, bool(match["shuffled"]), strength)


@dataclass
class EvalSettings:
    methods: list[str]
    out: str = "runs/eval"
    limit: int | None = None
    seed: int = 0
    eval_reviews: str | None = None
    batch_users: int = 4
    generate_only: bool = False
    split: str = "test"               # "val": validation users (for choices), "test": test users (to report)
    personalization: PersonalizationSettings = field(default_factory=PersonalizationSettings)
    sampling: SamplingSettings = field(default_factory=SamplingSettings)


def evaluation_samples(engine: DEPEngine, settings: EvalSettings) -> list[Sample]:
    """Test targets of the held-out users, or the latest review of each user in --eval-reviews."""
    if settings.eval_reviews:
        extra = load_dataset(settings.eval_reviews)
        samples = [Sample(history[-1], tuple(history[:-1]), "test")
                   for history in by_user(extra.reviews).values() if len(history) >= 2]
    elif settings.split == "val":
        samples = validation_samples(engine.dataset.reviews)
    elif settings.split == "test":
        samples = test_samples(engine.dataset.reviews)
    else:
        raise ValueError(f"split must be val or test, got {settings.split!r}")
    samples.sort(key=lambda s: s.target.user_id)
    random.Random(settings.seed).shuffle(samples)
    return samples[:settings.limit] if settings.limit else samples


def _pool_config(config: EngineConfig, settings: EvalSettings) -> EngineConfig:
    """--eval-reviews users' earlier reviews join the pool; their latest ones never do."""
    return replace(config, extra_reviews=settings.eval_reviews) if settings.eval_reviews else config


def pool_for(engine: DEPEngine, settings: EvalSettings) -> ReviewStore:
    """Validation users are evaluated on the pool training saw (no held-out targets); test users on all of it."""
    return engine.store.without(held_out_targets(engine.dataset.reviews)) if settings.split == "val" else engine.store


def sample_contexts(engine: DEPEngine, store: ReviewStore, samples: list[Sample], methods: list[Method],
                    settings: EvalSettings) -> list[PersonalContext]:
    """Each sample's context at the largest K any method uses (smaller K are its prefixes)."""
    max_k = max([m.k for m in methods] + [0])
    return [engine.context(engine.sample_request(s), replace(settings.personalization, k=max_k), store)
            for s in tqdm(samples, desc="history, peers, differences", leave=False)]


def read_generations(path: Path) -> list[dict]:
    """The records of a generations.jsonl; the raw text is the record, hygiene is applied as it stands now
    (records before format 1 did not say whether they ran out of tokens: they are read as not having)."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for record in records:
        cleaned = hygiene.clean(record.get("raw", record["text"]), record.get("ran_out", False),
                                record.get("end_after_words"))
        record["text"], record["cut"] = cleaned.text, cleaned.reason
        if record.get("content_filter"):  # a run with the filter on: its texts are read as they were shown
            record["text"], record["withheld"] = safety.withhold(record["text"])
    return records


def generate_all(engine: DEPEngine, samples: list[Sample], contexts: list[PersonalContext], methods: list[Method],
                 settings: EvalSettings, path: Path) -> list[dict]:
    """Generations of every sample and method, read back from `path` where an earlier run made them."""
    done = read_generations(path) if path.exists() else []
    finished = {record["group"] for record in done}
    partner = derangement(len(samples), settings.seed)
    starts = range(0, len(samples), settings.batch_users)
    pending: list = []  # groups decoding: on vLLM servers every group at once (generation.submit), here one

    def finish(group: int, chunk: list[Sample], end_after: list, started: float, future) -> None:
        outputs = future.result()
        cleaned = [hygiene.clean(*output, words) for output, words in zip(outputs, end_after)]
        shown = [safety.withhold(c.text) if settings.sampling.content_filter else (c.text, 0) for c in cleaned]
        seconds = (time.perf_counter() - started) / len(outputs)
        records = [{"format": FORMAT_VERSION, "group": group, "user_id": sample.target.user_id,
                    "item_id": sample.target.item_id, "method": method.name, "text": shown[row][0], "raw": outputs[row].text,
                    "content_filter": settings.sampling.content_filter, "withheld": shown[row][1],
                    "ran_out": outputs[row].ran_out, "end_after_words": end_after[row], "cut": cleaned[row].reason,
                    "reference": sample.target.text, "seconds": seconds}
                   for n, sample in enumerate(chunk) for m, method in enumerate(methods)
                   for row in [n * len(methods) + m]]
        with open(path, "a") as out:  # a whole group or nothing: resuming redoes a cut-off group
            out.write("".join(json.dumps(r) + "\n" for r in records))
        done.extend(records)

    for group, start in enumerate(tqdm(starts, desc=f"generating ({len(methods)} methods)", unit="group")):
        if group in finished:
            continue
        chunk = samples[start:start + settings.batch_users]
        started = time.perf_counter()
        rows = [row for n, sample in enumerate(chunk)
                for row in engine.method_embeddings(engine.sample_request(sample), contexts[start + n],
                                                    contexts[partner[start + n]], methods, settings.personalization)]
        end_after = [end_after_words(sample.profile, settings.sampling) for sample in chunk for _ in methods]
        pending.append((group, chunk, end_after, started, submit(
            engine.llm, rows, replace(settings.sampling, seed=settings.sampling.seed + group), end_after)))
        while pending and pending[0][-1].done():
            finish(*pending.pop(0))
    for job in pending:
        finish(*job)
    return done


def summarize(records: list[dict], methods: list[Method], seed: int = 0) -> dict:
    """Per method: mean and 95% interval of each metric, and the paired difference to nonperso."""
    return summarize_draws([records], methods, seed)


def _per_user(records: list[dict], methods: list[Method]) -> dict[str, dict[str, dict]]:
    by_method: dict[str, dict[str, dict]] = {m.name: {} for m in methods}
    for record in records:
        if record["method"] in by_method:
            by_method[record["method"]][record["user_id"]] = record
    return by_method


def draw_scores(draws: list[list[dict]], methods: list[Method]
                ) -> tuple[list[str], dict[str, list[dict]], dict[str, dict[str, np.ndarray]]]:
    """The users every draw has for every method; each method's records over them, draw by draw; and
    each method's metrics as a (draws, users) array per metric."""
    from .metrics import METRICS, score_many

    per_draw = [_per_user(records, methods) for records in draws]
    users = sorted(set.intersection(*(set(v) for draw in per_draw for v in draw.values()))) if methods else []
    records, by_draw = {}, {}
    for method in methods:
        rows = [draw[method.name][u] for draw in per_draw for u in users]  # draw by draw, users in one order
        per_text = score_many([r["text"] for r in rows], [r["reference"] for r in rows])
        records[method.name] = rows
        by_draw[method.name] = {metric: np.reshape(per_text[metric], (len(draws), len(users))) for metric in METRICS}
    return users, records, by_draw


def summarize_draws(draws: list[list[dict]], methods: list[Method], seed: int = 0) -> dict:
    """`summarize` over several draws of the same users (runs with other seeds): each user's metrics
    are averaged over the draws before the intervals are taken, so that the sampling noise of single
    texts, which is most of a user's spread, shrinks by about the square root of the draws."""
    from .metrics import METRICS, corpus_bleu, mean_ci, paired_bootstrap

    users, records, by_draw = draw_scores(draws, methods)
    scores, results = {}, {}
    for method in methods:
        rows = records[method.name]
        scores[method.name] = {metric: values.mean(axis=0) for metric, values in by_draw[method.name].items()}
        entry = {"n": len(users),
                 "seconds_per_generation": float(np.mean([r["seconds"] for r in rows])) if rows else 0,
                 "corpus_bleu": corpus_bleu([r["text"] for r in rows], [r["reference"] for r in rows]) if rows else 0,
                 "metrics": {}}
        for metric in METRICS:
            mean, low, high = mean_ci(scores[method.name][metric], seed=seed)
            entry["metrics"][metric] = {"mean": mean, "low": low, "high": high}
        results[method.name] = entry
    for baseline_name, label in (("nonperso", "vs_nonperso"), ("generic", "vs_generic")):
        if baseline_name in scores:
            for method in methods:
                for metric in METRICS:
                    results[method.name]["metrics"][metric][label] = paired_bootstrap(
                        scores[method.name][metric], scores[baseline_name][metric], seed=seed)
    for method in methods:  # the personalization gap: own embeddings against another user's
        if method.shuffled:
            own = method.name.replace("-shuffled", "")
            if own in scores:
                results[method.name]["own_minus_shuffled"] = {
                    metric: paired_bootstrap(scores[own][metric], scores[method.name][metric], seed=seed)
                    for metric in METRICS}
                if len(draws) > 1:  # near zero: a user's gap in one draw says nothing about the next
                    gaps = by_draw[own]["rouge1"] - by_draw[method.name]["rouge1"]
                    pairs = np.corrcoef(gaps)[np.triu_indices(len(draws), 1)]
                    results[method.name]["gap_correlation_between_draws"] = float(np.mean(pairs))
    return {"users": len(users), "draws": len(draws), "methods": results}


def read_draws(folders: list[str]) -> tuple[list[list[dict]], list[Method]]:
    """The records of several `evaluate` runs (draws), and the methods every run has."""
    paths = [Path(folder) / "generations.jsonl" for folder in folders]
    for path in paths:
        if not path.exists():
            raise DataError(f"{path.parent}: no generations.jsonl (an `evaluate` output folder is needed)")
    draws = [read_generations(path) for path in paths]
    names = [name for name in dict.fromkeys(r["method"] for r in draws[0])
             if all(any(r["method"] == name for r in draw) for draw in draws[1:])]
    return draws, [parse_method(name, PersonalizationSettings.k) for name in names]


def pool_runs(folders: list[str], out: str | None = None, seed: int = 0) -> dict:
    """Several `evaluate` runs of the same users with other seeds (`--seed`), summarized together
    (`summarize_draws`, and `pool_voice` where every run kept its voice.jsonl) over the methods every
    run has; with `out`, written to pooled.json and pooled.md."""
    draws, methods = read_draws(folders)
    summary = summarize_draws(draws, methods, seed)
    summary["format"] = FORMAT_VERSION
    summary["runs"] = list(folders)
    everyone = set().union(*({r["user_id"] for r in draw} for draw in draws))
    if len(everyone) > summary["users"]:  # --limit draws other users under another --seed
        print(f"NOTE: {len(everyone) - summary['users']} users are not in every run (or lack a method) and are left out")
    table = markdown_table(summary)
    voice = pool_voice(folders, seed)
    if voice:
        summary["voice"] = voice
        table += "\n\n" + pooled_voice_table(voice)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "pooled.json").write_text(json.dumps(summary, indent=2))
        (Path(out) / "pooled.md").write_text(table + "\n")
    print(table)
    return summary


VOICE_MEASURES = ("top1", "reciprocal_rank", "own_words", "drifted")
# How voice.jsonl's attribution was measured: its expectation over every candidate set; rows without the
# field are from older runs, one candidate draw each, and do not pool with these.
ATTRIBUTION_FORM = "expected over candidate sets"


def voice_gaps(values: dict[str, dict[str, np.ndarray]], seed: int = 0) -> dict[str, dict[str, dict]]:
    """Per method: its voice measures paired against its shuffled control and against generic (the
    per-example values of every method in one order of examples)."""
    from .metrics import paired_bootstrap

    gaps: dict[str, dict[str, dict]] = {}
    for name in values:
        if name.endswith("-shuffled") or name == "real review":
            continue
        for label, other in (("own_minus_shuffled", name + "-shuffled"), ("minus_generic", "generic")):
            if other in values and other != name:
                gaps.setdefault(name, {})[label] = {k: paired_bootstrap(values[name][k], values[other][k], seed=seed)
                                                    for k in VOICE_MEASURES}
    return gaps


def voice_and_hygiene(engine: DEPEngine, store: ReviewStore, samples: list[Sample], contexts: list[PersonalContext],
                      records: list[dict], methods: list[Method], settings: EvalSettings) -> tuple[dict, list[dict]]:
    """Per method: the voice measures (`voice.py`) with own-minus-shuffled and versus-generic gaps,
    and the share of outputs with scaffolding or loops before and after hygiene; and each text's voice
    values (method, user), which `pool` averages per user over draws."""
    from . import voice

    by_key = {(r["method"], r["user_id"]): r for r in records}
    keep = [n for n, s in enumerate(samples) if all((m.name, s.target.user_id) in by_key for m in methods)]
    samples, contexts = [samples[n] for n in keep], [contexts[n] for n in keep]
    profiles = voice.build_profiles(store, [s.profile for s in samples])
    voices = voice.sample_voices(store, samples, contexts)
    references = [s.target.text for s in samples]
    texts = {m.name: [by_key[(m.name, s.target.user_id)]["text"] for s in samples] for m in methods}
    texts["real review"] = references
    values = {name: voice.per_sample(t, references, engine.encoder.encode(t), voices, profiles)
              for name, t in tqdm(texts.items(), desc="voice measures", leave=False)}
    out = {"n": len(samples), "candidates": voice.CANDIDATES, "attribution": ATTRIBUTION_FORM, "chance": voice.chance(),
           "methods": {}}
    gaps = voice_gaps(values, settings.seed)
    for name in texts:
        entry = voice.summary(values[name], settings.seed)
        if name != "real review":
            raw = [by_key[(name, s.target.user_id)] for s in samples]
            entry["scaffolding_or_loops_before"] = float(np.mean([hygiene.flagged(r.get("raw", r["text"])) for r in raw]))
            entry["scaffolding_or_loops_after"] = float(np.mean([hygiene.flagged(r["text"]) for r in raw]))
        entry.update(gaps.get(name, {}))
        out["methods"][name] = entry
    rows = [{"method": name, "user_id": sample.target.user_id, "attribution": ATTRIBUTION_FORM,
             **{k: float(values[name][k][n]) for k in VOICE_MEASURES}}
            for name in texts for n, sample in enumerate(samples)]
    return out, rows


def pool_voice(folders: list[str], seed: int = 0) -> dict | None:
    """The voice measures of several draws (each run's voice.jsonl), each user's values averaged over
    the draws before the intervals, as `summarize_draws` does for the metrics; None if a run has none
    (runs written before `evaluate` kept them)."""
    from . import voice
    from .metrics import mean_ci

    paths = [Path(folder) / "voice.jsonl" for folder in folders]
    if not all(path.exists() for path in paths):
        return None
    draws = [{(r["method"], r["user_id"]): r for r in map(json.loads, path.read_text().splitlines())} for path in paths]
    forms = {str(path.parent): {r.get("attribution") or "one candidate draw" for r in draw.values()}
             for path, draw in zip(paths, draws)}
    (form, *others) = set().union(*forms.values())
    if others:
        raise DataError("the runs measured attribution in different ways, which do not pool: "
                        + "; ".join(f"{run}: {', '.join(sorted(form))}" for run, form in forms.items())
                        + " (rescore the older runs: experiments/voice_values.py --attribution-changed)")
    names = [n for n in dict.fromkeys(m for m, _ in draws[0]) if all(any(m == n for m, _ in d) for d in draws[1:])]
    users = sorted(u for u in {u for _, u in draws[0]} if all((n, u) in d for n in names for d in draws))
    per_draw = {n: {k: np.array([[d[(n, u)][k] for u in users] for d in draws]) for k in VOICE_MEASURES} for n in names}
    values = {n: {k: v.mean(axis=0) for k, v in measures.items()} for n, measures in per_draw.items()}
    out = {"n": len(users), "draws": len(draws), "candidates": voice.CANDIDATES, "attribution": form,
           "chance": voice.chance(), "methods": {}}
    gaps = voice_gaps(values, seed)
    for name in names:
        entry = {}
        for k in VOICE_MEASURES:
            mean, low, high = mean_ci(values[name][k], seed=seed)
            entry[k] = {"mean": mean, "low": low, "high": high}
        entry["top1_per_draw"] = [float(x) for x in per_draw[name]["top1"].mean(axis=1)]
        entry.update(gaps.get(name, {}))
        out["methods"][name] = entry
    return out


def voice_gap_lines(methods: dict[str, dict]) -> list[str]:
    lines = []
    for name, e in methods.items():
        for label in ("own_minus_shuffled", "minus_generic"):
            if label in e:
                gaps = ", ".join(f"{k} {v['mean_diff']:+.3f} [{v['low']:+.3f}, {v['high']:+.3f}]" for k, v in e[label].items())
                lines.append(f"\n{name} {label.replace('_', ' ')}: {gaps}")
    return lines


def pooled_voice_table(voice: dict) -> str:
    chance = voice["chance"]
    lines = [f"Voice measures, each user's values averaged over {voice['draws']} draws (n = {voice['n']}; attribution "
             f"among {voice['candidates']} candidates, expected over every set of them; chance top-1 {chance['top1']:.3f}, "
             f"MRR {chance['reciprocal_rank']:.3f}):",
             "", "| method | attribution top-1 | per draw | MRR | own words | drifted |", "|---|---|---|---|---|---|"]
    for name, e in voice["methods"].items():
        lines.append(f"| {name} | {e['top1']['mean']:.3f} [{e['top1']['low']:.3f}, {e['top1']['high']:.3f}] | "
                     + " / ".join(f"{x:.3f}" for x in e["top1_per_draw"])
                     + f" | {e['reciprocal_rank']['mean']:.3f} | {e['own_words']['mean']:.3f} | {e['drifted']['mean']:.3f} |")
    return "\n".join(lines + voice_gap_lines(voice["methods"]))


def voice_table(voice: dict) -> str:
    chance = voice["chance"]
    lines = [f"Voice measures (n = {voice['n']}; attribution among {voice['candidates']} candidates, expected over "
             f"every set of them; chance top-1 {chance['top1']:.3f}, MRR {chance['reciprocal_rank']:.3f}):", "",
             "| method | attribution top-1 | MRR | top-1 on product / drifted (n) | own words | drifted | "
             "length ratio (median) | length corr. | scaffolding/loops before → after hygiene |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, e in voice["methods"].items():
        hyg = (f"{e['scaffolding_or_loops_before']:.1%} → {e['scaffolding_or_loops_after']:.1%}"
               if "scaffolding_or_loops_before" in e else "")
        split = " / ".join("–" if part["mean"] is None else f"{part['mean']:.3f} ({part['n']})"
                           for part in e["top1_by_product"].values())
        lines.append(f"| {name} | {e['top1']['mean']:.3f} [{e['top1']['low']:.3f}, {e['top1']['high']:.3f}] | "
                     f"{e['reciprocal_rank']['mean']:.3f} | {split} | {e['own_words']['mean']:.3f} | {e['drifted']['mean']:.3f} | "
                     f"{e['length_ratio_median']:.2f} | {e['length_correlation']:+.2f} | {hyg} |")
    return "\n".join(lines + voice_gap_lines(voice["methods"]))


def markdown_table(summary: dict) -> str:
    lines = ["| method | n | ROUGE-1 | ROUGE-L | METEOR | corpus BLEU | mean sentence BLEU | ΔROUGE-1 vs nonperso [95% CI] "
             "| ΔMETEOR vs nonperso [95% CI] |", "|---|---|---|---|---|---|---|---|---|"]
    for name, entry in summary["methods"].items():
        m = entry["metrics"]

        def delta(metric: str) -> str:
            d = m[metric].get("vs_nonperso")
            return f"{d['mean_diff']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]" if d and name != "nonperso" else ""

        lines.append(f"| {name} | {entry['n']} | {m['rouge1']['mean']:.4f} | {m['rougeL']['mean']:.4f} | "
                     f"{m['meteor']['mean']:.4f} | {entry['corpus_bleu']:.2f} | {m['bleu']['mean']:.2f} | "
                     f"{delta('rouge1')} | {delta('meteor')} |")
    for name, entry in summary["methods"].items():
        if name not in ("generic", "nonperso") and "vs_generic" in entry["metrics"]["rouge1"]:
            lines.append("")
            lines.append(f"{name} minus generic: " + ", ".join(
                f"{k} {v['vs_generic']['mean_diff']:+.4f} [{v['vs_generic']['low']:+.4f}, {v['vs_generic']['high']:+.4f}]"
                for k, v in entry["metrics"].items()))
    gaps = [(n, e["own_minus_shuffled"]) for n, e in summary["methods"].items() if "own_minus_shuffled" in e]
    for name, gap in gaps:
        lines.append("")
        lines.append(f"Personalization gap, {name.replace('-shuffled', '')} with own minus another user's embeddings: "
                     + ", ".join(f"{k} {v['mean_diff']:+.4f} [{v['low']:+.4f}, {v['high']:+.4f}]"
                                 for k, v in gap.items()))
        correlation = summary["methods"][name].get("gap_correlation_between_draws")
        if correlation is not None:
            lines.append(f"(users' ROUGE-1 gaps correlate {correlation:+.2f} between draws)")
    if summary.get("draws", 1) > 1:
        lines.insert(0, f"Each user's metrics averaged over {summary['draws']} draws (runs with other seeds) "
                        "before the intervals.\n")
    return "\n".join(lines)


def bar_chart(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["methods"])
    fig, axes = plt.subplots(1, 2, figsize=(max(8, len(names) * 1.1), 4.5))
    for ax, metric, label in zip(axes, ("rouge1", "meteor"), ("ROUGE-1", "METEOR")):
        stats = [summary["methods"][n]["metrics"][metric] for n in names]
        means = np.array([s["mean"] for s in stats])
        errors = np.array([[s["mean"] - s["low"] for s in stats], [s["high"] - s["mean"] for s in stats]])
        ax.bar(range(len(names)), means, yerr=errors, capsize=3, color="#4c78a8")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_title(f"{label} (mean, 95% bootstrap CI), n={summary['users']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate(config: EngineConfig, settings: EvalSettings, engine: DEPEngine | None = None) -> dict | None:
    """Generate (or resume), score, and write results.json, generations.jsonl, voice.jsonl, results.md, results.png.

    `engine` may be passed ready-made; it must have been built from `config`."""
    methods = [parse_method(name, settings.personalization.k) for name in settings.methods]
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    engine = engine or build_engine(_pool_config(config, settings))
    if not engine.adapter_trained and any(get_mode(m.mode).soft for m in methods):
        print("NOTE: the adapter is UNTRAINED: soft-token methods measure random soft prompts")
    samples = evaluation_samples(engine, settings)
    if not samples:
        raise ValueError("no users to evaluate (each needs at least two reviews)")
    started = time.perf_counter()
    store = pool_for(engine, settings)  # built once: the validation pool is a copy of the store
    contexts = sample_contexts(engine, store, samples, methods, settings)
    records = generate_all(engine, samples, contexts, methods, settings, out / "generations.jsonl")
    if settings.generate_only:
        return None
    summary = summarize(records, methods, settings.seed)
    summary["voice"], voice_rows = voice_and_hygiene(engine, store, samples, contexts, records, methods, settings)
    (out / "voice.jsonl").write_text("".join(json.dumps(row) + "\n" for row in voice_rows))
    summary["format"] = FORMAT_VERSION
    summary["settings"] = {"methods": settings.methods, "limit": settings.limit, "seed": settings.seed,
                           "split": settings.split, "eval_reviews": settings.eval_reviews,
                           "preset": engine.config.preset, "adapter": engine.config.adapter,
                           "adapter_trained": engine.adapter_trained, "llm": engine.config.llm,
                           "encoder": engine.config.encoder,
                           "personalization": vars(settings.personalization), "sampling": vars(settings.sampling),
                           "decoding": decoding(engine.llm),
                           "forward": forward_setup(engine.llm),  # sampled texts differ between CPU kinds too
                           "seconds": time.perf_counter() - started}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    table = markdown_table(summary) + "\n\n" + voice_table(summary["voice"])
    (out / "results.md").write_text(table + "\n")
    bar_chart(summary, out / "results.png")
    print(table)
    return summary
