"""The paper preset end to end through the engine, the CLI and `evaluate`, on a tiny checkpoint in the
authors' exact layout (built by test_paper_checkpoint's writer) and a tiny random encoder with BGE-M3's
width, over a slice of the bundled pool. The real 7B checkpoint cannot be downloaded here."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dep_engine import cli, paper
from dep_engine.engine import EngineConfig
from dep_engine.evaluation import EvalSettings, evaluate
from dep_engine.paper_engine import PaperEngine
from dep_engine.settings import SamplingSettings

from test_paper_checkpoint import AuthorsDEP, EMBED, write_authors_checkpoint

GREEDY = SamplingSettings(temperature=0.0, max_new_tokens=6, content_filter=False)


@pytest.fixture(scope="module")
def tokenizer(paper_tokenizer):
    return paper_tokenizer


@pytest.fixture(scope="module")
def world(tokenizer, tmp_path_factory, dataset):
    """A slice of the bundled pool (every review of the items its most prolific reviewer reviewed, each cut
    to 30 words so that two encoders read it in seconds), the authors' checkpoint layout, and a BGE-M3-wide
    random encoder."""
    from transformers import AutoTokenizer, XLMRobertaConfig, XLMRobertaModel

    from dep_engine.paths import bundled_encoder_path

    root = tmp_path_factory.mktemp("paper-engine")
    reviewers: dict[str, list] = {}
    for review in dataset.reviews:
        reviewers.setdefault(review.user_id, []).append(review)
    most = max(reviewers, key=lambda u: (len(reviewers[u]), u))
    items = {review.item_id for review in reviewers[most]}
    pool = root / "pool"
    pool.mkdir()
    (pool / "reviews.jsonl").write_text("".join(json.dumps(
        {"reviewerID": r.user_id, "asin": r.item_id, "overall": r.rating, "summary": r.title, "reviewText": " ".join(r.text.split()[:30]),
         "unixReviewTime": r.timestamp}) + "\n" for r in dataset.reviews if r.item_id in items))
    (pool / "meta.jsonl").write_text("".join(json.dumps(
        {"asin": i, "title": dataset.items[i].title, "description": dataset.items[i].description}) + "\n" for i in items))
    source = write_authors_checkpoint(root / "DEP-model", tokenizer)
    words = AutoTokenizer.from_pretrained(bundled_encoder_path())
    torch.manual_seed(0)
    encoder = XLMRobertaModel(XLMRobertaConfig(vocab_size=len(words), hidden_size=EMBED, num_hidden_layers=1,
                                               num_attention_heads=4, intermediate_size=64, max_position_embeddings=600,
                                               pad_token_id=words.pad_token_id), add_pooling_layer=False)
    encoder.save_pretrained(root / "bge-m3")
    words.save_pretrained(root / "bge-m3")
    return {"pool": pool, "source": source, "encoder": root / "bge-m3", "cache": root / "cache"}


@pytest.fixture(scope="module")
def config(world):
    return EngineConfig(preset="paper", adapter=str(world["source"]), data=str(world["pool"]),
                        paper_encoder=str(world["encoder"]), cache_dir=str(world["cache"]), device="cpu",
                        cpu_backend="torch", cpu_decode="float32", cpu_prefill="float32")


@pytest.fixture(scope="module")
def engine(config, world, monkeypatch_module):
    monkeypatch_module.setenv("DEP_CACHE_DIR", str(world["cache"]))  # the conversion goes to the test's cache
    return PaperEngine(config, progress=False)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def a_user(engine) -> str:
    return max(engine.users, key=lambda u: (len(engine.users[u]), u))


def test_the_engine_writes_the_authors_prompt_with_their_soft_tokens(engine, world, tokenizer):
    """The dep row is the authors' forward on the authors' inputs: its first-step logits equal their
    restated `DEPModel.forward` on the prompt's ids and the slots' vectors; nonperso is their prompt without
    past reviews; evidence names the reviews whose vectors fill the slots, with the peers' weights."""
    request = engine.user_request(a_user(engine))
    prepared = engine.prepare(request, ("nonperso", "dep"), sampling=GREEDY)
    built = paper.build_request(engine.paper_pool, engine.llm.tokenizer, request.profile, request.item,
                                request.rating, request.review_title, engine.store.items,
                                encoder=engine.paper_encoder)
    assert "[HIS_TOKEN_0]" in prepared.prompts["dep"] and "[User's Past Reviews]" in prepared.prompts["dep"]
    assert "[User's Past Reviews]" not in prepared.prompts["nonperso"]
    assert prepared.prompts["dep"].startswith("<|im_start|>system\n" + paper.SYSTEM_PROMPT + "<|im_end|><|im_start|>user")
    n = len(built.history.selected)
    assert 0 < n <= 8 and prepared.context.k == n
    for selected in prepared.context.selected:
        assert selected.peers and sum(p.weight for p in selected.peers) == pytest.approx(1, abs=1e-5)
    assert n == 8  # the most prolific reviewer of the slice fills every slot, as their data always did
    theirs = AuthorsDEP(world["source"], tokenizer)
    with torch.no_grad():
        ours = engine.llm.model(inputs_embeds=prepared.embeds[1][None]).logits[0, -1]
    expected = theirs.first_logits(torch.tensor([built.prompt.input_ids]), built.history.vectors[None])
    torch.testing.assert_close(ours, expected[0], atol=1e-4, rtol=1e-4)
    plain = engine.llm.embed(torch.tensor(built.prompt.input_ids))
    changed = (prepared.embeds[1] != plain).any(-1).nonzero().flatten().tolist()
    his_ids, diff_ids = paper.marker_ids(engine.llm.tokenizer)
    assert [built.prompt.input_ids[p] for p in changed] == [i for i in built.prompt.input_ids
                                                           if i in his_ids[:n] + diff_ids[:n]]


def test_generation_streams_repeats_with_its_seed_and_refuses_this_projects_modes(engine):
    request = engine.user_request(a_user(engine))
    sampling = SamplingSettings(max_new_tokens=6, seed=3, content_filter=False)
    first = engine.generate(request, ("nonperso", "dep"), sampling=sampling)
    assert set(first.texts) == {"nonperso", "dep"} and first.new_tokens > 0
    assert engine.generate(request, ("nonperso", "dep"), sampling=sampling).texts == first.texts
    partial = list(engine.stream(request, ("nonperso", "dep"), sampling=sampling))
    assert len(partial) > 1 and partial[-1].texts["dep"] == first.texts["dep"]
    with pytest.raises(ValueError, match="the paper preset writes nonperso and dep, not 'generic'"):
        engine.prepare(request, ("generic", "dep"))
    from dep_engine.data import Item

    pasted = "item_title,rating,review_title,review_text\n" + "".join(
        f"{r.item_id},{r.rating:g},Title {n},{' '.join(r.text.split()[:12])}\n"
        for n, r in enumerate(engine.users[a_user(engine)][:5]))
    mine = engine.generate(engine.history_request(pasted, Item("x", "A guitar strap", ""), 4.0), ("nonperso", "dep"),
                           sampling=sampling)
    assert mine.texts["dep"] and any("user outside the pool" in note for note in mine.notes)


def test_the_command_line_and_evaluate_run_the_preset(engine, config, world, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DEP_CACHE_DIR", str(world["cache"]))
    user = a_user(engine)
    argv = ["generate", "--preset", "paper", "--adapter", str(world["source"]), "--data", str(world["pool"]),
            "--paper-encoder", str(world["encoder"]), "--cache-dir", str(world["cache"]), "--device", "cpu",
            "--cpu-backend", "torch", "--user", user, "--modes", "nonperso,dep", "--max-new-tokens", "4"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "=== nonperso ===" in out and "=== dep ===" in out and "Past reviews used" in out
    summary = evaluate(config, EvalSettings(methods=["nonperso", "dep"], out=str(tmp_path / "eval"), limit=2,
                                            batch_users=2, sampling=SamplingSettings(max_new_tokens=4)), engine=engine)
    assert set(summary["methods"]) == {"nonperso", "dep"} and summary["settings"]["preset"] == "paper"
    assert summary["settings"]["llm"] == str(engine.checkpoint.llm_dir)
    records = [json.loads(line) for line in (tmp_path / "eval" / "generations.jsonl").read_text().splitlines()]
    assert len(records) == 4
    with pytest.raises(ValueError, match="the paper preset evaluates nonperso and dep"):
        evaluate(config, EvalSettings(methods=["dep-shuffled"], out=str(tmp_path / "bad"), limit=1), engine=engine)


def test_the_preset_is_refused_on_a_cpu_for_a_large_model(config, world, monkeypatch):
    """Before any weight loads: the converted manifest says how many parameters the LLM has."""
    monkeypatch.setenv("DEP_CACHE_DIR", str(world["cache"]))
    monkeypatch.setattr(paper, "CPU_PARAMETER_LIMIT", 1000)
    loaded = []
    monkeypatch.setattr(PaperEngine, "_load_llm", lambda self: loaded.append(1))
    with pytest.raises(paper.PaperPresetError, match="refused: the paper preset.s LLM has .*--allow-cpu"):
        PaperEngine(config, progress=False)
    assert not loaded
    assert np.isfinite(paper.parameter_count(json.loads((world["source"] / "config.json").read_text())))


def test_the_demo_runs_the_preset_and_names_it(engine):
    """The page's form on the paper preset: its default (the generic comparison, every signal) becomes
    DEP beside the plain LLM, with a note; the page names the model and the adapter in use."""
    from demo import events
    from demo.page import build_demo
    from demo.studio import Form, Studio

    studio = Studio(engine)
    user = a_user(engine)
    form = Form(user_id=user, max_new_tokens=4, **studio.held_out(user))
    job = studio.job(form)
    assert (job.baseline, job.mode) == ("nonperso", "dep")
    assert any("paper preset writes DEP" in note for note in job.notes)
    shown: dict = {}
    for changes in events.generate(studio, form):
        shown.update(changes)
    assert "paper preset writes DEP" in str(shown["status"]) and shown["personalized"]
    page = build_demo(studio)
    banner = [block.value for block in page.blocks.values() if "The paper preset" in str(getattr(block, "value", ""))]
    assert banner and str(engine.checkpoint.llm_dir) in banner[0] and str(engine.checkpoint.folder) in banner[0]
