"""The DEP adapter: one sparse autoencoder shared by his and diff vectors, and a projector for each.

    SAE:        z = GELU(W_e x),  x_hat = GELU(W_d z)          d -> d/2 -> d
                (or ReLU, or top-k: only the rho share of units, the largest, pass: sparse by construction)
    projectors: soft = W_2 GELU(W_1 z)                          d/2 -> H -> H

With `end_projectors`, a second his and diff projector writes the copy of each slot that the "both"
prompt layout puts after the output title; the first pair writes the slots beside the reviews. With
`deviation_projectors`, a linear map (no bias, zero at the start) per kind adds W (x - population) to
each token before its rescaling: it is zero for the population-average reviewer, so training it cannot
change the generic prompt or learn a cue every user shares, only how a user's tokens depart from it. The
sparse code z (not the reconstruction) is projected to the LLM's hidden size H. Saved as
safetensors beside a JSON config that names the LLM and encoder it was trained for. The weights
also hold the population-average reviewer: the mean his and diff vectors of the training users,
which the `generic` mode and the personalization strength use in place of (or mixed with) a user's.

    >>> adapter = DEPAdapter(DEPAdapterConfig(embedding_dim=386, hidden_size=576, llm="m", encoder="e"))
    >>> adapter(torch.zeros(4, 386), torch.zeros(4, 386))["his_tokens"].shape
    torch.Size([4, 576])
"""
from __future__ import annotations

import json
from functools import partial
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .atomic import atomic_write

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
    sae_activation: str = "gelu"    # of the code: "gelu" (the paper), "relu" (exact zeros) or "topk" (`active_units` pass)
    token_norm: float | None = None  # if set, each soft token is rescaled to this norm
    style_features: bool | str = "none"  # style features beside the text embedding (`embeddings.STYLE_SETS`)
    end_projectors: bool = False    # a second projector pair for the slots' copies at the end ("both" layout)
    deviation_projectors: bool = False  # a linear map of each vector's deviation from the population, added to its tokens
    trained: bool = False
    training: dict = field(default_factory=dict)  # settings, data fingerprint, results of training

    @property
    def code_dim(self) -> int:
        return self.embedding_dim // 2

    @property
    def active_units(self) -> int:
        """Code units a top-k code lets through: the sparsity target's share of them."""
        return max(1, round(self.sparsity_target * self.code_dim))


SAE_ACTIVATIONS = ("gelu", "relu", "topk")


def top_k(x: torch.Tensor, k: int) -> torch.Tensor:
    """Each row's k largest entries (a negative one as zero), every other entry exactly zero: a code that
    is sparse by construction, where a KL penalty on the mean lets every unit stay a little on."""
    values, index = x.topk(k, dim=-1)
    return torch.zeros_like(x).scatter(-1, index, F.relu(values))


class SparseAutoencoder(nn.Module):
    def __init__(self, dim: int, code_dim: int, activation: str = "gelu", active_units: int = 1):
        super().__init__()
        self.encoder = nn.Linear(dim, code_dim)
        self.decoder = nn.Linear(code_dim, dim)
        self.activation = {"gelu": F.gelu, "relu": F.relu, "topk": partial(top_k, k=active_units)}[activation]

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
        if config.sae_activation not in SAE_ACTIVATIONS:
            raise AdapterError(f"sae_activation must be one of {', '.join(SAE_ACTIVATIONS)}, got {config.sae_activation!r}")
        self.sae = SparseAutoencoder(config.embedding_dim, config.code_dim, config.sae_activation, config.active_units)
        self.his_projector = Projector(config.code_dim, config.hidden_size)
        self.diff_projector = Projector(config.code_dim, config.hidden_size)
        if config.end_projectors:
            self.end_his_projector = Projector(config.code_dim, config.hidden_size)
            self.end_diff_projector = Projector(config.code_dim, config.hidden_size)
        if config.deviation_projectors:
            self.his_deviation = nn.Linear(config.embedding_dim, config.hidden_size, bias=False)
            self.diff_deviation = nn.Linear(config.embedding_dim, config.hidden_size, bias=False)
            nn.init.zeros_(self.his_deviation.weight)
            nn.init.zeros_(self.diff_deviation.weight)
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
        """Soft tokens for his and diff vectors (..., d), plus the codes and the SAE loss: (..., H), or
        (..., 2, H) with `end_projectors` (the slot beside its review, then its copy at the end)."""
        out = self.encode(his, diff)
        for kind, vectors in (("his", his), ("diff", diff)):
            code = out[f"{kind}_code"]
            personal = 0.0
            if self.config.deviation_projectors:
                deviation = vectors.float() - getattr(self, f"population_{kind}")
                personal = getattr(self, f"{kind}_deviation")(deviation)
            tokens = self._scale(getattr(self, f"{kind}_projector")(code) + personal)
            if self.config.end_projectors:
                end = self._scale(getattr(self, f"end_{kind}_projector")(code) + personal)
                tokens = torch.stack([tokens, end], dim=-2)
            out[f"{kind}_tokens"] = tokens
        return out

    def grow(self, end_projectors: bool = False, deviation_projectors: bool = False) -> "DEPAdapter":
        """This adapter with the parts asked for added, writing the same tokens as before until trained:
        end projectors start as copies of the first pair (the copies at the end as the slots beside the
        reviews), deviation projectors at zero. The start of `train --end-projectors/--deviation-projectors`."""
        config = replace(self.config, end_projectors=self.config.end_projectors or end_projectors,
                         deviation_projectors=self.config.deviation_projectors or deviation_projectors)
        grown = DEPAdapter(config).to(self.population_his.device)
        state = grown.state_dict()
        state.update(self.state_dict())
        if end_projectors and not self.config.end_projectors:
            state.update({f"end_{name}": value.clone() for name, value in self.state_dict().items()
                          if name.startswith(("his_projector.", "diff_projector."))})
        grown.load_state_dict(state)
        return grown

    def end_projector_parameters(self) -> list[nn.Parameter]:
        """The second projector pair's weights (empty without `end_projectors`)."""
        if not self.config.end_projectors:
            return []
        return [*self.end_his_projector.parameters(), *self.end_diff_projector.parameters()]

    def deviation_parameters(self) -> list[nn.Parameter]:
        """The deviation projectors' weights (empty without `deviation_projectors`)."""
        if not self.config.deviation_projectors:
            return []
        return [self.his_deviation.weight, self.diff_deviation.weight]

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
             "trained": bool, "style_features": (bool, str), "end_projectors": bool, "deviation_projectors": bool, "training": dict}
    for name, kind in kinds.items():
        value = getattr(config, name)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise AdapterError(f"{folder / CONFIG_NAME}: damaged adapter config ({name} = {value!r} has the wrong type)")
