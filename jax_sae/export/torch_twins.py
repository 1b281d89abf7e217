"""Torch twins: SAEBench custom-SAE modules for the architectures SAELens cannot load.

An architecture that exports as a SAELens one (standard, topk, jumprelu) needs nothing here. One
that SAELens lacks registers the torch module that evaluates its export folder in `TWINS`, so the
evaluation code (SAEBench, the synthetic-world scores) loads every export through `load_twin`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from safetensors.numpy import load_file

EXPORT_CONFIG = "cfg.json"  # the names SAELens's disk loader expects
EXPORT_WEIGHTS = "sae_weights.safetensors"


class TwoLevelSAE(torch.nn.Module):
    """The two-level hierarchical SAE as a SAEBench custom SAE.

    The latent code is one vector of `d_base + d_concept` entries: base latents first, then
    concepts. Base latent i belongs to concept i // (d_base // d_concept) and may fire only when
    that concept fires. Decoding is linear in the joint code, so `W_dec` stacks both
    dictionaries and SAEBench's weight metrics, feature clamping and probing work unchanged.
    `cfg` (a SAEBench `CustomSAEConfig`) is attached by the evaluation code, which owns SAEBench.
    """

    # registered in __init__ (register_parameter / register_buffer), read through Module.__getattr__
    W_enc: torch.nn.Parameter
    W_dec: torch.nn.Parameter
    b_enc: torch.nn.Parameter
    b_dec: torch.nn.Parameter
    parent: torch.Tensor

    def __init__(self, arrays: dict[str, np.ndarray], k_base: int, k_concept: int) -> None:
        super().__init__()
        self.d_base, self.d_concept = arrays["b_enc"].shape[0], arrays["b_enc_c"].shape[0]
        self.k_base, self.k_concept = k_base, k_concept
        joint = {
            "W_enc": np.concatenate([arrays["W_enc"], arrays["W_enc_c"]], axis=1),
            "W_dec": np.concatenate([arrays["W_dec"], arrays["W_dec_c"]], axis=0),
            "b_enc": np.concatenate([arrays["b_enc"], arrays["b_enc_c"]]),
            "b_dec": arrays["b_dec"],
        }
        for name, value in joint.items():
            self.register_parameter(name, torch.nn.Parameter(torch.from_numpy(value.copy())))
        parent = torch.arange(self.d_base) // (self.d_base // self.d_concept)
        self.register_buffer("parent", parent, persistent=False)

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @staticmethod
    def _topk(values: torch.Tensor, k: int) -> torch.Tensor:
        top = values.topk(k, dim=-1, sorted=False)
        return torch.zeros_like(values).scatter_(-1, top.indices, top.values)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = (x.to(self.dtype) - self.b_dec) @ self.W_enc + self.b_enc
        pre_base, pre_concept = pre[..., : self.d_base], pre[..., self.d_base :]
        concept = self._topk(torch.relu(pre_concept), self.k_concept)
        parent_active = (concept > 0)[..., self.parent].to(pre.dtype)
        base = self._topk(torch.relu(pre_base) * parent_active, self.k_base)
        return torch.cat([base, concept], dim=-1)

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        return feature_acts @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    @classmethod
    def load(cls, export_dir: str | Path) -> TwoLevelSAE:
        """Rebuild from an export folder written by `export_run`."""
        export_dir = Path(export_dir)
        cfg = json.loads((export_dir / EXPORT_CONFIG).read_text())
        if cfg.get("architecture") != "two_level":
            raise ValueError(f"{export_dir} holds a '{cfg.get('architecture')}' SAE, not two_level")
        arrays = load_file(export_dir / EXPORT_WEIGHTS)
        return cls(arrays, k_base=cfg["k_base"], k_concept=cfg["k_concept"])


class Twin(Protocol):
    """What `TWINS` holds: a module class whose `load(export_dir)` rebuilds it from an export."""

    def load(self, export_dir: str | Path) -> torch.nn.Module: ...


TWINS: dict[str, Twin] = {"two_level": TwoLevelSAE}
"""SAELens-less architecture name -> the module whose `load(export_dir)` rebuilds it."""


def load_twin(export_dir: str | Path) -> torch.nn.Module | None:
    """The torch twin of an export folder, or None when SAELens loads it itself."""
    architecture = json.loads((Path(export_dir) / EXPORT_CONFIG).read_text()).get("architecture")
    twin = TWINS.get(architecture)
    return None if twin is None else twin.load(export_dir)
