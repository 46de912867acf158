"""Training and evaluation plumbing on a tiny random Llama (the bundled-model run is in test_end_to_end)."""
import dataclasses
import json

import pytest
import torch

from dep_engine.adapter import DEPAdapter
from dep_engine.engine import DEPEngine, EngineConfig
from dep_engine.settings import PersonalizationSettings, SamplingSettings
from dep_engine.soft_prompt import prompt_embeddings
from dep_engine.splits import training_samples
from dep_engine.training import (TrainSettings, batch_loss, contrast_partners, datasets, evaluate_loss,
                                 generic_reviewer, held_out_likelihood, new_adapter, prepare, train)
from dep_engine import splits, training

from conftest import TINY_LLM


def checksum(model):
    return sum(float(p.double().sum()) for p in model.parameters())


def test_short_training_lowers_loss_and_keeps_llm_frozen(tiny_engine, tmp_path):
    before = checksum(tiny_engine.llm.model)
    settings = TrainSettings(out=str(tmp_path / "run"), personalization=PersonalizationSettings(k=2, words_per_review=10),
                             max_target_tokens=24,
                             max_samples=8, val_samples=4, epochs=6, batch_size=4, lr=3e-3, eval_every=6,
                             sae_loss_weight=1.0, seed=0)
    out = train(tiny_engine, settings)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert len(steps) == 12
    first, last = steps[:2], steps[-2:]
    assert sum(r["lm_loss"] for r in last) < sum(r["lm_loss"] for r in first)
    assert sum(r["sae_loss"] for r in last) < sum(r["sae_loss"] for r in first)
    assert checksum(tiny_engine.llm.model) == before
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["trained"] and config["llm"] == TINY_LLM
    assert config["training"]["data_fingerprint"]
    control = config["training"]["personal_likelihood"]
    assert control["n"] == 4 and control["lm_loss_own"] > 0
    assert control["gain_over_population_nats"]["mean_diff"] == pytest.approx(
        control["lm_loss_population"] - control["lm_loss_own"], abs=1e-5)
    # a finished run resumes to nothing more to do
    again = train(tiny_engine, settings)
    assert len((again / "log.jsonl").read_text().splitlines()) == len(log)


def test_fine_tuning_starts_from_the_given_adapter(tiny_engine, tmp_path):
    """init_from loads a trained adapter's weights (fine-tuning), and refuses one of another kind."""
    torch.manual_seed(3)
    start = DEPAdapter(tiny_engine.adapter.config)
    start.save_pretrained(tmp_path / "start")
    settings = TrainSettings(personalization=PersonalizationSettings(k=2, words_per_review=10), max_target_tokens=8)
    samples = prepare(tiny_engine, training_samples(tiny_engine.dataset.reviews)[:4], settings, "test")
    fresh = new_adapter(tiny_engine, settings, samples)
    tuned = new_adapter(tiny_engine, dataclasses.replace(settings, init_from=str(tmp_path / "start")), samples)
    learned = [name for name in start.state_dict() if not name.startswith("population")]
    assert all(torch.equal(tuned.state_dict()[n].cpu(), start.state_dict()[n]) for n in learned)
    assert not all(torch.equal(fresh.state_dict()[n].cpu(), start.state_dict()[n]) for n in learned)
    assert torch.equal(tuned.population_his, fresh.population_his)  # the training samples' average reviewer
    other = dataclasses.replace(start.config, sae_activation="relu" if start.config.sae_activation == "gelu" else "gelu")
    DEPAdapter(other).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="other"):
        new_adapter(tiny_engine, dataclasses.replace(settings, init_from=str(tmp_path / "other")), samples)


def test_same_item_contrast_takes_another_reviewer_of_the_product(tiny_engine, tmp_path, monkeypatch):
    settings = TrainSettings(personalization=PersonalizationSettings(k=2, words_per_review=10), max_target_tokens=8,
                             contrast_weight=1.0, contrast_partner="same-item")
    raw = training_samples(tiny_engine.dataset.reviews)
    # training draws its partners from every training sample: a slice of the pool's stands for all of them,
    # so that preparing them (history, peers, prompt of each) takes a second, not half a minute
    partners_pool = sorted(raw, key=lambda s: s.target.item_id)[:400]
    monkeypatch.setattr(training, "training_samples", lambda reviews: list(partners_pool))
    reviewers = {}
    for sample in raw:
        reviewers.setdefault(sample.target.item_id, set()).add(sample.target.user_id)
    shared_items = sorted(item for item, users in reviewers.items() if len(users) > 1)[:3]
    chosen = [s for s in raw if s.target.item_id in shared_items]
    chosen += [s for s in raw if len(reviewers[s.target.item_id]) == 1][:3]
    samples = prepare(tiny_engine, chosen, settings, "test")  # a few products, not the whole data: seconds
    by_item = {}
    for sample in samples:
        by_item.setdefault(sample.item_id, []).append(sample)
    shared = [s for s in samples if any(o.user_id != s.user_id for o in by_item[s.item_id])]
    alone = [s for s in samples if s not in shared]
    assert shared and alone  # the tiny data has both kinds
    batch = shared[:3] + alone[:1]
    for step in range(5):
        partners = contrast_partners(batch, settings, step, by_item)
        for sample, partner in zip(batch[:3], partners):
            assert partner.item_id == sample.item_id and partner.user_id != sample.user_id
        assert any(partners[3] is m for m in batch[:3])  # no other reviewer of its product: a batch-mate
    batch_mates = contrast_partners(batch, dataclasses.replace(settings, contrast_partner="batch"), 0, by_item)
    assert all(any(p is m for m in batch) and p is not s for s, p in zip(batch, batch_mates))
    capped = dataclasses.replace(settings, max_samples=4, val_samples=2)
    train_set, _, pool = datasets(tiny_engine, capped)  # partners from every training sample, not the capped set
    assert len(train_set) <= 4 < len(pool) and all(any(p is t for p in pool) for t in train_set)
    batch_train, _, batch_pool = datasets(tiny_engine, dataclasses.replace(capped, contrast_partner="batch"))
    assert batch_pool is batch_train  # a batch-mate contrast needs nothing beyond the training set
    run = dataclasses.replace(settings, out=str(tmp_path / "run"), max_samples=8, val_samples=4, epochs=1,
                              batch_size=4, eval_every=2, sae_loss_weight=1.0, seed=0)
    log = [json.loads(line) for line in (train(tiny_engine, run) / "log.jsonl").read_text().splitlines()]
    assert all(r["own_minus_other"] != 0 for r in log if "loss" in r)  # the partner's vectors were used
    with pytest.raises(ValueError, match="contrast_partner"):
        dataclasses.replace(run, contrast_partner="peer")


def test_population_vectors_are_the_generic_reviewers(tiny_engine):
    """The likelihood control's "population" source is the generic mode's reviewer: a sample whose
    own rows all equal it scores the same both ways, and a real sample's own vectors score otherwise."""
    settings = TrainSettings(personalization=PersonalizationSettings(k=2, words_per_review=10), max_target_tokens=8)
    samples = prepare(tiny_engine, training_samples(tiny_engine.dataset.reviews)[:4], settings, "test")
    torch.manual_seed(1)
    adapter = new_adapter(tiny_engine, settings, samples)
    population = generic_reviewer(adapter)
    as_generic = [dataclasses.replace(s, his=population.his.repeat(len(s.his), 0),
                                      diff=population.diff.repeat(len(s.diff), 0)) for s in samples]
    assert evaluate_loss(tiny_engine, adapter, as_generic, 2).tolist() == pytest.approx(
        evaluate_loss(tiny_engine, adapter, as_generic, 2, "population").tolist(), abs=1e-6)
    own, generic = (evaluate_loss(tiny_engine, adapter, samples, 2, v) for v in ("own", "population"))
    assert abs(own - generic).max() > 1e-4
    with pytest.raises(ValueError, match="vectors must be one of own, shuffled, population, got 'peers'"):
        evaluate_loss(tiny_engine, adapter, samples, 2, "peers")


def test_held_out_likelihood_reads_held_out_users_in_one_mode(tiny_engine, monkeypatch):
    settings = TrainSettings(personalization=PersonalizationSettings(k=2, words_per_review=10), max_target_tokens=8,
                             modes=("dep", "his"), batch_size=4)
    torch.manual_seed(4)
    monkeypatch.setattr(tiny_engine, "adapter", DEPAdapter(tiny_engine.adapter.config))
    report = held_out_likelihood(tiny_engine, "val", settings, limit=6)
    assert report["split"] == "val" and report["mode"] == "dep" and 0 < report["n"] <= 6
    llm = tiny_engine.llm  # which forward the losses came from: bf16 on another CPU kind gives other figures
    assert report["forward"]["device"] == str(llm.device) and report["forward"]["cpu"]
    assert report["forward"]["prefill_dtype"] == ("bfloat16" if llm.prefill_dtype == torch.bfloat16 else "float32")
    for gap in (report["gain_over_shuffled_nats"], report["gain_over_population_nats"]):
        assert gap["low"] <= gap["mean_diff"] <= gap["high"] and gap["mean_diff"] != 0
    rows = report["per_sample"]  # each validation user's target once, its losses averaging to the report's
    assert len(rows) == report["n"] == len({(r["user_id"], r["item_id"]) for r in rows})
    val_targets = {(s.target.user_id, s.target.item_id) for s in splits.validation_samples(tiny_engine.dataset.reviews)}
    assert {(r["user_id"], r["item_id"]) for r in rows} <= val_targets
    for key, mean in (("own", "lm_loss_own"), ("shuffled", "lm_loss_shuffled_users"),
                      ("population", "lm_loss_population")):
        assert sum(r[key] for r in rows) / len(rows) == pytest.approx(report[mean], abs=1e-5)
    test_users = {s.target.user_id for s in splits.test_samples(tiny_engine.dataset.reviews)[:3]}
    assert 0 < held_out_likelihood(tiny_engine, "test", settings, limit=3)["n"] <= len(test_users)
    texts_only = held_out_likelihood(tiny_engine, "val", dataclasses.replace(settings, modes=("rag",)), limit=6)
    assert texts_only["mode"] == "rag" and texts_only["n"] == report["n"]  # one loss: no vectors to swap
    assert "lm_loss_population" not in texts_only and "shuffled" not in texts_only["per_sample"][0]
    assert [r["item_id"] for r in texts_only["per_sample"]] == [r["item_id"] for r in rows]
    assert texts_only["lm_loss_own"] != pytest.approx(report["lm_loss_own"])  # another prompt, another loss


def test_checkpoint_reloads_to_identical_outputs(tiny_engine, tiny_llm, tmp_path):
    torch.manual_seed(5)
    tiny_engine.adapter.save_pretrained(tmp_path / "ckpt")
    user = next(u for u, h in tiny_engine.users.items() if len(h) > 6)
    sampling = SamplingSettings(max_new_tokens=10, seed=11)
    first = tiny_engine.generate(tiny_engine.user_request(user), ("dep",), sampling=sampling).texts
    reloaded = DEPEngine(EngineConfig(llm=TINY_LLM, adapter=str(tmp_path / "ckpt")), progress=False, llm=tiny_llm)
    assert reloaded.generate(reloaded.user_request(user), ("dep",), sampling=sampling).texts == first
    assert isinstance(reloaded.adapter, DEPAdapter)


def test_batch_loss_matches_one_sample_at_a_time_without_cache(tiny_engine):
    """Padding, the no-grad prefix cache and the target spans leave loss and gradients as a plain
    forward of each sample's own sequence would give them."""
    settings = TrainSettings(personalization=PersonalizationSettings(k=2, words_per_review=10),
                             max_target_tokens=16, modes=("his+diff", "dep", "his"))
    samples = prepare(tiny_engine, training_samples(tiny_engine.dataset.reviews)[:6], settings, "test")
    torch.manual_seed(0)  # the same adapter whatever ran before (the tolerances below are for this one)
    adapter = DEPAdapter(tiny_engine.adapter.config)
    llm = tiny_engine.llm
    per_sample, _ = batch_loss(tiny_engine, adapter, samples)
    per_sample.mean().backward()
    batched = [p.grad.clone() for p in adapter.parameters() if p.grad is not None]
    adapter.zero_grad()

    plain = plain_losses(llm, adapter, samples)
    plain.mean().backward()
    torch.testing.assert_close(per_sample.detach(), plain.detach(), atol=1e-5, rtol=1e-5)
    for got, want in zip(batched, [p.grad for p in adapter.parameters() if p.grad is not None]):
        # float32 sums in another order: 2e-6 to 5e-5 of each gradient's norm here
        assert float((got - want).norm()) <= 1e-4 * float(want.norm())


def plain_losses(llm, adapter, samples):
    """Each sample's loss from one plain forward of its own sequence: no batch, padding or prefix cache."""
    losses = []
    for sample in samples:
        out = adapter(torch.from_numpy(sample.his), torch.from_numpy(sample.diff))
        prompt = prompt_embeddings(llm, sample.prompt, out["his_tokens"] if sample.prompt.his_positions else None,
                                   out["diff_tokens"] if sample.prompt.diff_positions else None)
        sequence = torch.cat([prompt, llm.embed(torch.tensor(sample.target[:-1]))])
        logits = llm.model(inputs_embeds=sequence[None]).logits[0, len(prompt) - 1:]
        losses.append(torch.nn.functional.cross_entropy(logits.float(), torch.tensor(sample.target)))
    return torch.stack(losses)


@pytest.mark.parametrize("mode", ["nonperso", "dep"])
def test_scoring_reads_every_target_token(tiny_engine, mode):
    """With no slot in a prompt (the plain LLM's, `likelihood --mode nonperso`), the cached prefix stops
    before the prompt's last token, whose output predicts the first target token; with slots, before the
    first slot."""
    settings = TrainSettings(personalization=PersonalizationSettings(k=2, words_per_review=10),
                             max_target_tokens=16, modes=(mode,))
    samples = prepare(tiny_engine, training_samples(tiny_engine.dataset.reviews)[:4], settings, "test")
    torch.manual_seed(0)
    adapter = DEPAdapter(tiny_engine.adapter.config)
    with torch.no_grad():
        torch.testing.assert_close(batch_loss(tiny_engine, adapter, samples)[0],
                                   plain_losses(tiny_engine.llm, adapter, samples), atol=1e-5, rtol=1e-5)


def test_training_forward_in_bf16_stays_close_to_float32(tiny_engine, monkeypatch):
    """On CPUs with AMX the LLM's forward passes run under bf16 autocast (`LLM.prefill_dtype`), training's
    too (1.4-1.5x a step); the adapter stays float32, and the loss and gradients stay near float32's."""
    # The tolerances were set on the paper's prompt; with the product restated the tiny random model's
    # gradient cosine was 0.79, with the past reviews as turns 0.86 (loss still within 2%), not yet
    # understood (issue 10's note).
    settings = TrainSettings(personalization=PersonalizationSettings(k=2, words_per_review=10, restate_item=False,
                                                                     history_as="quoted"),
                             max_target_tokens=16, modes=("his+diff", "dep"))
    samples = prepare(tiny_engine, training_samples(tiny_engine.dataset.reviews)[:4], settings, "test")
    torch.manual_seed(0)
    adapter = DEPAdapter(tiny_engine.adapter.config)
    grads = []
    for dtype in (None, torch.bfloat16):
        monkeypatch.setattr(tiny_engine, "llm", dataclasses.replace(tiny_engine.llm, prefill_dtype=dtype))
        per_sample, _ = batch_loss(tiny_engine, adapter, samples)
        adapter.zero_grad()
        per_sample.mean().backward()
        grads.append((per_sample.detach(), torch.cat([p.grad.flatten() for p in adapter.parameters()
                                                      if p.grad is not None])))
    (f32_loss, f32_grad), (bf16_loss, bf16_grad) = grads
    print(f"loss {f32_loss.tolist()} vs {bf16_loss.tolist()}; gradient cosine "
          f"{float(torch.nn.functional.cosine_similarity(f32_grad, bf16_grad, dim=0)):.4f}")
    assert not torch.equal(f32_loss, bf16_loss)  # bf16 did run
    torch.testing.assert_close(bf16_loss, f32_loss, rtol=0.02, atol=0.02)
    assert torch.nn.functional.cosine_similarity(f32_grad, bf16_grad, dim=0) > 0.98
    assert all(p.dtype == torch.float32 for p in adapter.parameters())
