"""The soft prompt: a prompt's token embeddings with the his and diff soft tokens at their slots.

Every decoding path (PyTorch, ONNX Runtime) and training read these input embeddings, so the slots
are filled in one place.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .llm import LLM
from .prompt import PromptIds


def prompt_embeddings(llm: LLM, prompt: PromptIds, his_tokens: torch.Tensor | None = None,
                      diff_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """(L, H) input embeddings of the prompt with (K, H) soft tokens at its K his and K diff slots
    (differentiable in them)."""
    ids = torch.tensor(prompt.ids, dtype=torch.long, device=llm.device)
    with torch.no_grad():
        embeds = llm.embed(ids)
    for positions, tokens in ((prompt.his_positions, his_tokens), (prompt.diff_positions, diff_tokens)):
        if not positions:
            continue
        if tokens is None or len(tokens) != len(positions):
            raise ValueError(f"{len(positions)} slots but {0 if tokens is None else len(tokens)} soft tokens")
        embeds = embeds.index_put((torch.tensor(positions, device=llm.device),), tokens.to(embeds.dtype))
    return embeds


def left_pad(sequences: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (L_i, H) sequences into (B, L, H) with padding on the left, and the (B, L) attention mask."""
    length = max(len(s) for s in sequences)
    batch = sequences[0].new_zeros((len(sequences), length, sequences[0].shape[-1]))
    mask = torch.zeros((len(sequences), length), dtype=torch.long, device=sequences[0].device)
    for row, seq in enumerate(sequences):
        batch[row, length - len(seq):] = seq
        mask[row, length - len(seq):] = 1
    return batch, mask
