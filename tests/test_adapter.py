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




def test_a_relu_code_has_exact_zeros_and_a_bad_activation_is_named(tmp_path):
    relu = make_adapter(sae_activation="relu")
    code, _ = relu.sae(torch.randn(6, 32))
    assert (code == 0).any() and (code >= 0).all()
    relu.save_pretrained(tmp_path)
    assert DEPAdapter.from_pretrained(tmp_path).config.sae_activation == "relu"
    with pytest.raises(AdapterError, match="sae_activation must be one of gelu, relu, got 'topk'"):
        make_adapter(sae_activation="topk")


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
