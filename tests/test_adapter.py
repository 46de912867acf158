import json

import pytest
import torch

from dep_engine.adapter import AdapterError, DEPAdapter, DEPAdapterConfig


def make_adapter(**kw):
    torch.manual_seed(0)
    config = DEPAdapterConfig(embedding_dim=32, hidden_size=24, llm="llm-a", encoder="enc-a", **kw)
    return DEPAdapter(config)


def test_shapes_and_losses():
    adapter = make_adapter()
    out = adapter(torch.randn(3, 32), torch.randn(3, 32))
    assert out["his_tokens"].shape == (3, 24) and out["diff_tokens"].shape == (3, 24)
    assert out["his_code"].shape == (3, 16)
    assert out["sae_loss"].item() > 0



def test_a_top_k_code_lets_only_the_sparsity_targets_share_of_units_through(tmp_path):
    """Round 43's SAE: each vector's code has at most rho * code_dim nonzero units, the largest of the
    GELU code's pre-activations, with gradients through them; it saves and loads as any adapter."""
    adapter = make_adapter(sae_activation="topk", sparsity_target=0.25)
    assert adapter.config.active_units == 4  # a quarter of 16 code units
    x = torch.randn(6, 32, requires_grad=True)
    code, _ = adapter.sae(x)
    assert ((code != 0).sum(-1) <= 4).all() and (code >= 0).all()
    pre = adapter.sae.encoder(x)
    kept = code != 0
    assert torch.equal(code[kept], pre[kept])  # the kept units pass unchanged
    assert (pre.detach().masked_fill(kept, float("-inf")).amax(-1) <= pre.detach().masked_fill(~kept, float("inf")).amin(-1)).all()
    adapter(x, x)["his_tokens"].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    adapter.save_pretrained(tmp_path)
    assert torch.equal(DEPAdapter.from_pretrained(tmp_path).sae(x)[0], code)
    with pytest.raises(AdapterError, match="sae_activation must be one of gelu, relu, topk"):
        make_adapter(sae_activation="top4")

def test_end_projectors_start_as_copies_and_round_trip(tmp_path):
    """A second projector pair for the "both" layout's copies at the end: grown from an adapter, it writes
    the same tokens as the first pair until trained, and saves and loads as any adapter."""
    adapter = make_adapter(token_norm=2.0)
    grown = adapter.grow(end_projectors=True)
    his, diff = torch.randn(3, 32), torch.randn(3, 32)
    base, out = adapter(his, diff), grown(his, diff)
    assert out["his_tokens"].shape == (3, 2, 24) and out["diff_tokens"].shape == (3, 2, 24)
    for kind in ("his_tokens", "diff_tokens"):
        assert torch.equal(out[kind][:, 0], base[kind]) and torch.equal(out[kind][:, 1], base[kind])
    assert len(grown.end_projector_parameters()) == 8 and adapter.end_projector_parameters() == []
    with torch.no_grad():
        grown.end_his_projector[2].bias += 1.0
    grown.save_pretrained(tmp_path)
    loaded = DEPAdapter.from_pretrained(tmp_path)
    assert loaded.config.end_projectors
    again = loaded(his, diff)
    assert torch.equal(again["his_tokens"], grown(his, diff)["his_tokens"])
    assert not torch.equal(again["his_tokens"][:, 1], again["his_tokens"][:, 0])


def test_deviation_projectors_leave_the_population_alone_and_round_trip(tmp_path):
    """Deviation projectors add W (x - population) to each token: grown at zero they change nothing, and
    whatever they learn, the population-average reviewer (the generic mode) keeps its tokens exactly."""
    adapter = make_adapter(token_norm=2.0)
    adapter.set_population(torch.randn(32), torch.randn(32))
    grown = adapter.grow(deviation_projectors=True)
    his, diff = torch.randn(3, 32), torch.randn(3, 32)
    for kind in ("his_tokens", "diff_tokens"):
        assert torch.equal(grown(his, diff)[kind], adapter(his, diff)[kind])
    assert len(grown.deviation_parameters()) == 2 and adapter.deviation_parameters() == []
    with torch.no_grad():
        for weight in grown.deviation_parameters():
            weight.normal_()
    population = (adapter.population_his[None], adapter.population_diff[None])
    for kind in ("his_tokens", "diff_tokens"):
        assert torch.equal(grown(*population)[kind], adapter(*population)[kind])
        assert not torch.allclose(grown(his, diff)[kind], adapter(his, diff)[kind])
    both = grown.grow(end_projectors=True)  # the copies at the end take the same deviation
    out = both(his, diff)
    assert torch.equal(out["his_tokens"][:, 0], out["his_tokens"][:, 1])
    grown.save_pretrained(tmp_path)
    loaded = DEPAdapter.from_pretrained(tmp_path)
    assert loaded.config.deviation_projectors and not loaded.config.end_projectors
    assert torch.equal(loaded(his, diff)["diff_tokens"], grown(his, diff)["diff_tokens"])


def test_token_norm_rescales():
    adapter = make_adapter(token_norm=2.5)
    out = adapter(torch.randn(4, 32), torch.randn(4, 32))
    torch.testing.assert_close(out["his_tokens"].norm(dim=-1), torch.full((4,), 2.5))


def test_save_and_load_round_trip(tmp_path):
    adapter = make_adapter()
    adapter.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = DEPAdapter.from_pretrained(tmp_path, llm="llm-a", encoder="enc-a", hidden_size=24, embedding_dim=32)
    x = torch.randn(2, 32)
    torch.testing.assert_close(loaded(x, x)["his_tokens"], adapter(x, x)["his_tokens"])


def test_mismatch_names_what_differs(tmp_path):
    make_adapter().save_pretrained(tmp_path)
    with pytest.raises(AdapterError, match="llm = 'llm-a'.*'llm-b'"):
        DEPAdapter.from_pretrained(tmp_path, llm="llm-b")
    with pytest.raises(AdapterError, match="encoder = 'enc-a'"):
        DEPAdapter.from_pretrained(tmp_path, encoder="enc-b")


def test_damaged_files_give_clear_errors(tmp_path):
    make_adapter().save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(AdapterError, match="damaged or mismatched weights"):
        DEPAdapter.from_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{broken")
    with pytest.raises(AdapterError, match="damaged adapter config"):
        DEPAdapter.from_pretrained(tmp_path)
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        DEPAdapter.from_pretrained(tmp_path / "missing")


def test_config_records_dimensions(tmp_path):
    make_adapter().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["embedding_dim"], config["hidden_size"], config["llm"], config["encoder"]) == (32, 24, "llm-a", "enc-a")


def test_config_with_wrong_types_is_refused(tmp_path):
    make_adapter().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "token_norm": "3.1"}))
    with pytest.raises(AdapterError, match="token_norm = '3.1' has the wrong type"):
        DEPAdapter.from_pretrained(tmp_path)
