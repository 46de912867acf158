"""Every choice the engine offers, as an enum: one name per thing, and one way to refuse a bad value.

The values are the words the CLI, the API, saved configs and results files use.

    >>> choice(HistoryRule, "recent", "history_rule")
    <HistoryRule.RECENT: 'recent'>
    >>> choice(HistoryRule, "latest", "history_rule")
    Traceback (most recent call last):
    ...
    ValueError: history_rule must be one of relevant, recent, got 'latest'
"""
from __future__ import annotations

from enum import StrEnum
from typing import TypeVar

Choice = TypeVar("Choice", bound=StrEnum)


def choice(kind: type[Choice], value: object, name: str) -> Choice:
    """`value` as a member of `kind`, or a ValueError naming the field and the choices."""
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{name} must be one of {', '.join(kind)}, got {value!r}") from None


class HistoryRule(StrEnum):
    """Which K past reviews personalize a request."""
    RELEVANT = "relevant"  # dense retrieval by the target item (the default)
    RECENT = "recent"      # the K newest whose items have other reviewers (the paper's rule)


class HistoryAs(StrEnum):
    """How the prompt shows the past reviews."""
    TURNS = "turns"    # each one the chat's earlier answer to a request for its own item (the default)
    QUOTED = "quoted"  # listed inside the one user turn (the paper's prompt)


class StyleFeatures(StrEnum):
    """Features appended to each review's text embedding."""
    NONE = "none"
    RATING_LENGTH = "rating-length"  # the review's rating and length, which a text embedding barely holds


class SaeActivation(StrEnum):
    """The sparse autoencoder's code activation."""
    GELU = "gelu"  # the paper's
    RELU = "relu"  # exact zeros


class ContrastPartner(StrEnum):
    """Whose vectors the contrast term of training compares a sample's own with."""
    BATCH = "batch"          # a batch-mate's
    SAME_ITEM = "same-item"  # another training user's who reviewed the same product (the shipped adapter's)


class CpuBackend(StrEnum):
    """Who generates on the CPU."""
    ONNX = "onnx"    # ONNX Runtime, int8 weights (the default: 3x+ faster per token)
    TORCH = "torch"  # PyTorch, in the `CpuDecode` dtype


class CpuDecode(StrEnum):
    """The dtype PyTorch decodes in on the CPU (`CpuBackend.TORCH`)."""
    BFLOAT16 = "bfloat16"  # half the bytes per token
    FLOAT32 = "float32"


class CpuPrefill(StrEnum):
    """The dtype of CPU prompts and training's forward passes."""
    AUTO = "auto"  # bfloat16 where the CPU has bf16 matrix units, else float32
    BFLOAT16 = "bfloat16"
    FLOAT32 = "float32"


class KvCache(StrEnum):
    """ONNX Runtime's KV cache."""
    INT8 = "int8"  # faster decoding of long prompts
    FLOAT32 = "float32"


class Preset(StrEnum):
    """Whose DEP the engine runs."""
    STUDIO = "studio"  # this project's adapter and input pipeline (the default)
    PAPER = "paper"    # the authors' released checkpoint with their exact input pipeline (`paper.py`)


class Backend(StrEnum):
    """Who decodes."""
    LOCAL = "local"  # this process: on the CPU `CpuBackend`'s choice, on CUDA PyTorch (the default)
    VLLM = "vllm"    # vLLM servers, sent the prompt embeddings (`vllm_backend.py`, docs/vllm.md)
