"""jax-sae-lab: sparse autoencoders on language-model activations, in JAX.

Layers, each importing only those before it (docs/architecture.md):

    util      one-line CLI errors, disk space, atomic files
    parallel  the device mesh layout and multi-host start-up
    data      the activation cache on disk, the file loader, the streaming cache
    model     architectures, activation functions, sparse paths, loss terms, the variant registry
    report    held-out evaluation, run folders, comparisons, plots
    training  the trainer: config, compiled step, optimiser, checkpoints, loop, sweeps
    export    SAELens folders and SAEBench torch modules (numpy + torch only, never JAX)

Above them, `jax_sae.sae` (`jax_sae.SAE`): a trained SAE loaded, used, exported and shared in a
few lines; and `jax_sae.features`, the feature browser built on it. Only these two may import
every layer.

Entry points: `from jax_sae import SAE` to use a trained SAE, `from jax_sae.training import
Trainer, TrainConfig` to train one. This file imports nothing until `jax_sae.SAE` is first used,
so that `jax_sae.data` and `jax_sae.export` stay importable without JAX.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jax_sae.sae import SAE

__all__ = ["SAE"]


def __getattr__(name: str) -> Any:
    """``jax_sae.SAE``, imported on first use (it needs JAX; the data and export layers do not)."""
    if name == "SAE":
        from jax_sae.sae import SAE

        return SAE
    raise AttributeError(f"module 'jax_sae' has no attribute {name!r}")
