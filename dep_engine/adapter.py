"""The DEP adapter: one sparse autoencoder shared by his and diff vectors, and a projector for each.

    SAE:        z = GELU(W_e x),  x_hat = GELU(W_d z)          d -> d/2 -> d   (or ReLU: exact zeros)
    projectors: soft = W_2 GELU(W_1 z)                          d/2 -> H -> H

The sparse code z (not the reconstruction) is projected to the LLM's hidden size H. Saved as
safetensors beside a JSON config that names the LLM and encoder it was trained for. The weights
also hold the population-average reviewer: the mean his and diff vectors of the training users,
which the `generic` mode and the personalization strength use in place of (or mixed with) a user's.

    >>> adapter = DEPAdapter(DEPAdapterConfig(embedding_dim=386, hidden_size=576, llm="m", encoder="e"))
    >>> adapter(torch.zeros(4, 386), torch.zeros(4, 386))["his_tokens"].shape
    torch.Size([4, 576])
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .atomic import atomic_write
from .choices import SaeActivation, choice

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


class AdapterError(ValueError):
    """An adapter that is missing, damaged, or made for another LLM or encoder."""


@dataclass
class DEPAdapterConfig:
    embedding_dim: int              # d, the review vector's size (encoder output + style features)
    hidden_size: int                # H, the LLM's hidden size
    llm: str                        # the LLM the projectors were trained against
    encoder: str                    # the encoder that produced the embeddings
    sparsity_target: float = 0.05   # rho of the KL penalty
    sparsity_weight: float = 1e-3   # KL weight inside the SAE loss
    sae_loss_weight: float = 100.0  # weight of (reconstruction + KL) beside the LM loss
    sae_activation: SaeActivation = SaeActivation.GELU  # of the code: the paper's GELU, or ReLU (exact zeros)
    token_norm: float | None = None  # if set, each soft token is rescaled to this norm
    style_features: bool | str = "none"  # style features beside the text embedding (`choices.StyleFeatures`)
    trained: bool = False
    training: dict = field(default_factory=dict)  # settings, data fingerprint, results of training

    @property
    def code_dim(self) -> int:
        return self.embedding_dim // 2


class SparseAutoencoder(nn.Module):
    def __init__(self, dim: int, code_dim: int, activation: SaeActivation = SaeActivation.GELU):
        super().__init__()
        self.encoder = nn.Linear(dim, code_dim)
        self.decoder = nn.Linear(code_dim, dim)
        self.activation = {SaeActivation.GELU: F.gelu, SaeActivation.RELU: F.relu}[activation]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        code = self.activation(self.encoder(x))
        return code, F.gelu(self.decoder(code))


def active_fraction(code: torch.Tensor, threshold: float = 0.01) -> float:
    """Share of code units clearly on (above `threshold`): how sparse the SAE is in use (target: rho)."""
    return float((code > threshold).float().mean()) if code.numel() else 0.0


class Projector(nn.Sequential):
    def __init__(self, code_dim: int, hidden_size: int):
        super().__init__(nn.Linear(code_dim, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))


def kl_sparsity(code: torch.Tensor, rho: float) -> torch.Tensor:
    """KL(rho || mean activation) summed over code units; GELU codes are clamped into (0, 1)."""
    rho_hat = code.mean(dim=0).clamp(1e-6, 1 - 1e-6)
    return (rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))).sum()


class DEPAdapter(nn.Module):
    def __init__(self, config: DEPAdapterConfig):
        super().__init__()
        self.config = config
        try:
            activation = choice(SaeActivation, config.sae_activation, "sae_activation")
        except ValueError as err:
            raise AdapterError(str(err)) from None
        self.sae = SparseAutoencoder(config.embedding_dim, config.code_dim, activation)
        self.his_projector = Projector(config.code_dim, config.hidden_size)
        self.diff_projector = Projector(config.code_dim, config.hidden_size)
        self.register_buffer("population_his", torch.zeros(config.embedding_dim))
        self.register_buffer("population_diff", torch.zeros(config.embedding_dim))

    def set_population(self, his: torch.Tensor, diff: torch.Tensor) -> None:
        """Store the population-average reviewer: (d,) mean his and diff vectors of the training users."""
        self.population_his.copy_(torch.as_tensor(his, dtype=torch.float32))
        self.population_diff.copy_(torch.as_tensor(diff, dtype=torch.float32))

    def population(self) -> tuple[np.ndarray, np.ndarray]:
        """The population-average reviewer as (d,) his and diff arrays, as `set_population` stored it."""
        return self.population_his.detach().cpu().numpy(), self.population_diff.detach().cpu().numpy()

    def encode(self, his: torch.Tensor, diff: torch.Tensor) -> dict[str, torch.Tensor]:
        """Sparse codes of his and diff vectors (..., d) -> (..., d/2), and the SAE loss over both."""
        x = torch.cat([his.reshape(-1, his.shape[-1]), diff.reshape(-1, diff.shape[-1])]).float()
        if len(x) == 0:
            empty = x.new_zeros((*his.shape[:-1], self.config.code_dim))
            return {"his_code": empty, "diff_code": empty, "sae_loss": x.new_zeros(())}
        code, recon = self.sae(x)
        loss = F.smooth_l1_loss(recon, x) + self.config.sparsity_weight * kl_sparsity(code, self.config.sparsity_target)
        his_code, diff_code = code.split([his[..., 0].numel(), diff[..., 0].numel()])
        return {"his_code": his_code.reshape(*his.shape[:-1], -1),
                "diff_code": diff_code.reshape(*diff.shape[:-1], -1), "sae_loss": loss}

    def _scale(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.config.token_norm is None:
            return tokens
        return tokens * (self.config.token_norm / tokens.norm(dim=-1, keepdim=True).clamp_min(1e-6))

    def forward(self, his: torch.Tensor, diff: torch.Tensor) -> dict[str, torch.Tensor]:
        """Soft tokens (..., H) for his and diff vectors (..., d), plus the codes and the SAE loss."""
        out = self.encode(his, diff)
        for kind in ("his", "diff"):
            out[f"{kind}_tokens"] = self._scale(getattr(self, f"{kind}_projector")(out[f"{kind}_code"]))
        return out

    # ---- persistence -------------------------------------------------------------------

    def save_pretrained(self, folder: str | Path) -> None:
        """Weights as safetensors and the config as JSON, each written atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / WEIGHTS_NAME, lambda path: save_file(
            {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, path))
        atomic_write(folder / CONFIG_NAME, lambda path: Path(path).write_text(
            json.dumps(asdict(self.config), indent=2)))

    @classmethod
    def from_pretrained(cls, folder: str | Path, llm: str | None = None, hidden_size: int | None = None,
                        encoder: str | None = None, embedding_dim: int | None = None) -> "DEPAdapter":
        """Load a saved adapter; the optional arguments are checked against its config."""
        folder = Path(folder)
        try:
            raw = json.loads((folder / CONFIG_NAME).read_text())
            config = DEPAdapterConfig(**raw)
        except FileNotFoundError:
            raise AdapterError(f"{folder}: no {CONFIG_NAME}; is this a DEP adapter folder?") from None
        except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as err:
            raise AdapterError(f"{folder / CONFIG_NAME}: damaged adapter config ({err})") from None
        _check_types(folder, config)
        expected = {"llm": llm, "hidden_size": hidden_size, "encoder": encoder, "embedding_dim": embedding_dim}
        for key, value in expected.items():
            if value is not None and getattr(config, key) != value:
                raise AdapterError(f"{folder}: adapter was trained for {key} = {getattr(config, key)!r}, "
                                   f"but the engine uses {value!r}")
        adapter = cls(config)
        try:
            state = load_file(folder / WEIGHTS_NAME)
            adapter.load_state_dict(state)
        except FileNotFoundError:
            raise AdapterError(f"{folder}: no {WEIGHTS_NAME}") from None
        except (SafetensorError, RuntimeError, OSError) as err:
            raise AdapterError(f"{folder / WEIGHTS_NAME}: damaged or mismatched weights ({err})") from None
        return adapter



def _check_types(folder: Path, config: DEPAdapterConfig) -> None:
    """A config whose fields have the wrong types is damaged: refuse it now, not at the first request."""
    kinds = {"embedding_dim": int, "hidden_size": int, "llm": str, "encoder": str, "sparsity_target": (int, float),
             "sparsity_weight": (int, float), "sae_loss_weight": (int, float), "sae_activation": str, "token_norm": (int, float, type(None)),
             "trained": bool, "style_features": (bool, str), "training": dict}
    for name, kind in kinds.items():
        value = getattr(config, name)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise AdapterError(f"{folder / CONFIG_NAME}: damaged adapter config ({name} = {value!r} has the wrong type)")
