"""The converter on a checkpoint in the authors' exact layout, built here on a tiny random Qwen2 with a real
tokenizer plus their 20 marker tokens; its soft tokens and first-step logits against an independent
implementation of their forward (`model/personal_model.py`: `DEPModel.forward`)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dep_engine import paper, paper_checkpoint
from dep_engine.adapter import DEPAdapter
from dep_engine.llm import load_tokenizer

from conftest import MARKERS
from test_paper_preset import make_world

EMBED, CODE = 1024, 512  # their EMBED_SIZE, HIDDEN_SIZE


@pytest.fixture(scope="module")
def tokenizer(paper_tokenizer):
    return paper_tokenizer


def qwen2_config(tokenizer):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                       tie_word_embeddings=False, initializer_range=0.5, pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id)


def authors_modules(hidden: int) -> nn.ModuleDict:
    """Their SAE and projectors with their module names: sae.encoder.0, sae.decoder.0, align_mlp_*.{0,2}."""
    sae = nn.Module()
    sae.encoder = nn.Sequential(nn.Linear(EMBED, CODE), nn.GELU())
    sae.decoder = nn.Sequential(nn.Linear(CODE, EMBED), nn.GELU())
    return nn.ModuleDict({
        "sae": sae,
        "align_mlp_his": nn.Sequential(nn.Linear(CODE, hidden), nn.GELU(), nn.Linear(hidden, hidden)),
        "align_mlp_diff": nn.Sequential(nn.Linear(CODE, hidden), nn.GELU(), nn.Linear(hidden, hidden)),
    })


def write_authors_checkpoint(folder, tokenizer, shards: int = 3, architectures=("DEPModel",), seed: int = 0,
                             with_adapter: bool = True):
    """A folder as `model-train.py` leaves one: config.json, bf16 safetensors (sharded with an index, or one
    file), the Qwen2 weights then sae.* and align_mlp_* (save order of `DEPModel`), and the tokenizer."""
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = qwen2_config(tokenizer)
    state = dict(Qwen2ForCausalLM(config).state_dict())
    if with_adapter:
        extra = authors_modules(config.hidden_size)
        for module in extra.modules():  # larger than default init, so the soft tokens matter
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.2)
                nn.init.normal_(module.bias, std=0.2)
        state.update(extra.state_dict())
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in state.items()}
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(state)
    if shards == 1:
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    else:
        size = -(-len(keys) // shards)
        weight_map = {}
        for n in range(shards):
            name = f"model-{n + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: state[k] for k in keys[n * size:(n + 1) * size]}
            save_file(part, folder / name, metadata={"format": "pt"})
            weight_map.update({k: name for k in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": sum(v.numel() * 2 for v in state.values())}, "weight_map": weight_map}))
    raw = config.to_dict()
    raw["architectures"] = list(architectures)
    raw["torch_dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(raw))
    tokenizer.save_pretrained(folder)
    return folder


def read_weights(folder) -> dict[str, torch.Tensor]:
    state = {}
    for path in sorted(folder.glob("*.safetensors")):
        state.update(load_file(path))
    return state


class AuthorsDEP(nn.Module):
    """Their forward, restated independently of dep_engine: SAE on the (B, 16, d) stack, his = first 8
    codes, diff = the rest, each through its projector, then every [HIS_TOKEN_i] / [DIFF_TOKEN_i] position
    of the input embeddings replaced, row by row, before the decoder and lm_head."""

    def __init__(self, folder, tokenizer, dtype=torch.float32):
        super().__init__()
        from transformers import Qwen2Config, Qwen2ForCausalLM

        raw = json.loads((folder / "config.json").read_text())
        raw.pop("architectures")
        state = read_weights(folder)
        self.llm = Qwen2ForCausalLM(Qwen2Config(**raw))
        self.llm.load_state_dict({k: v for k, v in state.items() if k.startswith(("model.", "lm_head."))})
        self.extra = authors_modules(self.llm.config.hidden_size)
        self.extra.load_state_dict({k: v for k, v in state.items() if k.startswith(("sae.", "align_mlp_"))})
        self.to(dtype).eval()
        self.his_ids = tokenizer.convert_tokens_to_ids([f"[HIS_TOKEN_{i}]" for i in range(8)])
        self.diff_ids = tokenizer.convert_tokens_to_ids([f"[DIFF_TOKEN_{i}]" for i in range(8)])

    @torch.no_grad()
    def soft(self, his_diff_emb):
        z = self.extra["sae"].encoder(his_diff_emb)
        return self.extra["align_mlp_his"](z[:, :8, :]), self.extra["align_mlp_diff"](z[:, 8:, :])

    @torch.no_grad()
    def first_logits(self, input_ids, his_diff_emb):
        embs = self.llm.model.get_input_embeddings()(input_ids)
        his, diff = self.soft(his_diff_emb.to(embs.dtype))
        for b in range(embs.shape[0]):
            for i in range(8):
                embs[b][input_ids[b] == self.his_ids[i]] = his[b, i].to(embs.dtype)
            for i in range(8):
                embs[b][input_ids[b] == self.diff_ids[i]] = diff[b, i].to(embs.dtype)
        hidden = self.llm.model(inputs_embeds=embs).last_hidden_state
        return self.llm.lm_head(hidden[:, -1, :])


@pytest.fixture(scope="module")
def converted(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("paper")
    source = write_authors_checkpoint(root / "DEP-model", tokenizer)
    return source, paper_checkpoint.convert(source, root / "converted")


def test_converted_folder_loads_and_holds_their_modules_exactly(converted):
    source, result = converted
    adapter = DEPAdapter.from_pretrained(result.folder)
    theirs = read_weights(source)
    ours = adapter.state_dict()
    for their_name, our_name in paper_checkpoint.KEY_MAP.items():
        assert torch.equal(ours[our_name], theirs[their_name].float()), our_name
    assert adapter.config.embedding_dim == EMBED and adapter.config.hidden_size == 64
    assert adapter.config.encoder == paper.PAPER_ENCODER and adapter.config.token_norm is None
    assert result.manifest["source_architectures"] == ["DEPModel"]
    out = adapter(torch.randn(3, EMBED), torch.randn(3, EMBED))
    assert out["his_tokens"].shape == out["diff_tokens"].shape == (3, 64)


def test_llm_folder_is_a_plain_qwen2_without_their_keys(converted, tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, result = converted
    model, info = AutoModelForCausalLM.from_pretrained(result.llm_dir, dtype=torch.float32, use_safetensors=True,
                                                       output_loading_info=True)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"]
    index = json.loads((result.llm_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert index and not any(k.startswith(("sae.", "align_mlp_")) for k in index)
    assert json.loads((result.llm_dir / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    theirs = read_weights(source)
    for name, value in model.state_dict().items():
        assert torch.equal(value, theirs[name].float()), name
    llm_tokenizer = AutoTokenizer.from_pretrained(result.llm_dir)
    assert llm_tokenizer.convert_tokens_to_ids(MARKERS) == tokenizer.convert_tokens_to_ids(MARKERS)


def request_for(tokenizer):
    reviews, _, catalog = make_world()
    gen = torch.Generator().manual_seed(1)
    vectors = torch.nn.functional.normalize(torch.randn(len(reviews), EMBED, generator=gen), dim=1).numpy()
    pool = paper.PaperPool(reviews, vectors)
    history = sorted([r for r in reviews if r.user_id == "u3"], key=lambda r: r.timestamp)
    return paper.build_request(pool, tokenizer, history[:-1], catalog[history[-1].item_id], 5.0, "A title", catalog)


def test_soft_tokens_and_first_logits_equal_their_forward(converted, tokenizer):
    from transformers import AutoModelForCausalLM

    source, result = converted
    request = request_for(tokenizer)
    assert len(request.history.selected) == 8 and request.prompt.blocks == 8
    his_diff = request.history.vectors.unsqueeze(0)  # (1, 16, d): their `his_diff_emb`
    reference = AuthorsDEP(source, tokenizer)
    ref_his, ref_diff = reference.soft(his_diff)

    adapter = DEPAdapter.from_pretrained(result.folder).eval()
    with torch.no_grad():
        his, diff = paper.soft_tokens(adapter, request.his, request.diff)
    torch.testing.assert_close(his, ref_his[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(diff, ref_diff[0], rtol=1e-5, atol=1e-5)

    ids = torch.tensor([request.prompt.input_ids])
    llm = AutoModelForCausalLM.from_pretrained(result.llm_dir, dtype=torch.float32, use_safetensors=True).eval()
    with torch.no_grad():
        embeds = paper.paper_inputs_embeds(llm, ids, his, diff, tokenizer)
        logits = llm(inputs_embeds=embeds).logits[:, -1]
        plain = llm(input_ids=ids).logits[:, -1]
    expected = reference.first_logits(ids, his_diff)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert (logits - plain).abs().max() > 1e-2  # the soft tokens reach the first step


def test_bf16_soft_tokens_equal_their_bf16_modules(converted, tokenizer):
    source, result = converted
    request = request_for(tokenizer)
    reference = AuthorsDEP(source, tokenizer, dtype=torch.bfloat16)
    ref_his, ref_diff = reference.soft(request.history.vectors.unsqueeze(0).to(torch.bfloat16))
    adapter = DEPAdapter.from_pretrained(result.folder)
    his, diff = paper.soft_tokens(adapter, request.his, request.diff, dtype=torch.bfloat16)
    assert his.dtype == torch.bfloat16
    assert torch.equal(his, ref_his[0]) and torch.equal(diff, ref_diff[0])


def test_single_file_checkpoint_named_qwen2_converts(tokenizer, tmp_path):
    source = write_authors_checkpoint(tmp_path / "single", tokenizer, shards=1, architectures=("Qwen2ForCausalLM",),
                                      seed=4)
    result = paper_checkpoint.convert(source, tmp_path / "out")
    assert (result.llm_dir / "model.safetensors").is_file()
    assert not (result.llm_dir / "model.safetensors.index.json").exists()
    kept = load_file(result.llm_dir / "model.safetensors")
    assert "lm_head.weight" in kept and not any(k.startswith(("sae.", "align_mlp_")) for k in kept)
    adapter = DEPAdapter.from_pretrained(tmp_path / "out")
    assert torch.equal(adapter.state_dict()["diff_projector.2.bias"],
                       load_file(source / "model.safetensors")["align_mlp_diff.2.bias"].float())


def test_plain_qwen2_and_missing_tokenizer_markers_are_refused(tokenizer, tmp_path):
    plain = write_authors_checkpoint(tmp_path / "plain", tokenizer, with_adapter=False)
    with pytest.raises(paper_checkpoint.PaperCheckpointError, match="no sae.encoder.0.weight"):
        paper_checkpoint.convert(plain, tmp_path / "out1")
    bare = write_authors_checkpoint(tmp_path / "bare", tokenizer)
    load_tokenizer().save_pretrained(bare)  # the base tokenizer, without their markers
    with pytest.raises(paper_checkpoint.PaperCheckpointError, match="marker tokens"):
        paper_checkpoint.convert(bare, tmp_path / "out2")
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()


def test_hub_id_offline_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(paper_checkpoint.PaperCheckpointError) as err:
        paper_checkpoint.convert("SnowCharmQ/DEP-model-not-cached-here", tmp_path / "out")
    message = str(err.value)
    assert "model repository" in message and "dataset repository" in message and "local folder" in message
    with pytest.raises(paper_checkpoint.PaperCheckpointError, match="no such folder"):
        paper_checkpoint.convert(str(tmp_path / "nowhere" / "deeper" / "x"), tmp_path / "out")


def test_command_and_cache(converted, tmp_path, capsys, monkeypatch):
    source, _ = converted
    assert paper_checkpoint.main(["convert-paper-checkpoint", str(source), "--out", str(tmp_path / "cli")]) == 0
    assert "adapter:" in capsys.readouterr().out
    DEPAdapter.from_pretrained(tmp_path / "cli")
    assert paper_checkpoint.main(["convert-paper-checkpoint", str(source), "--out", str(tmp_path / "cli")]) == 2
    assert "not empty" in capsys.readouterr().err
    monkeypatch.setenv("DEP_CACHE_DIR", str(tmp_path / "cache"))
    first = paper_checkpoint.convert_cached(source)
    assert str(first.folder).startswith(str(tmp_path / "cache"))
    stamp = (first.folder / "adapter_model.safetensors").stat().st_mtime_ns
    again = paper_checkpoint.convert_cached(source)
    assert again.folder == first.folder
    assert (again.folder / "adapter_model.safetensors").stat().st_mtime_ns == stamp  # converted once
