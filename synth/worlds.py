"""The four synthetic worlds, as SAELens `SyntheticModelConfig`s, plus the one thing SAELens lacks:
sequence persistence for the `temporal` world.

Every world draws feature codes with SAELens's `ActivationGenerator` and maps them to activations
with its `FeatureDictionary` (random unit directions plus a bias of norm 1). Firing magnitudes are
folded-normal around 1 (mean 1, std 0.25, clipped at 0) in every world. docs/synthetic.md
describes each world; the numbers live here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sae_lens.synthetic import (
    ActivationGenerator,
    FiringProbabilityConfig,
    HierarchyConfig,
    LowRankCorrelationConfig,
    RandomFiringProbabilityConfig,
    SyntheticModel,
    SyntheticModelConfig,
    ZipfianFiringProbabilityConfig,
    register_firing_probability,
)

from synth import WORLDS

MEAN_MAGNITUDE, STD_MAGNITUDE = 1.0, 0.25
BIAS_NORM = 1.0
# basic and temporal: each feature's firing probability uniform in [0.001, 0.015] (mean L0 ~ F/128)
BASIC_PROBS = (0.001, 0.015)
# temporal: an active feature stays active at the next token with this probability
PERSISTENCE = 0.8
# zipf: p(rank r) ~ r^-0.6 rescaled to [1e-4, 0.3] - 3.5 decades between most and least frequent
ZIPF = {"exponent": 0.6, "max_prob": 0.3, "min_prob": 1e-4}
ZIPF_CORRELATION = {"rank": 16, "correlation_scale": 0.1}
# hierarchy: one tree (1 root, 3 children, 9 grandchildren) per 32 features, all mutually exclusive
FEATURES_PER_TREE, BRANCHING, DEPTH = 32, 3, 2
ROOT_PROB, CHILD_GIVEN_PARENT_PROB, FREE_PROB = 0.04, 0.3, 0.004


@dataclass
class BlockFiringProbabilityConfig(FiringProbabilityConfig):
    """Constant firing probability per consecutive block of feature indices, `rest_prob` after.

    SAELens numbers hierarchy features breadth-first (roots, then their children, ...), so blocks
    give each tree level its own probability; a child's probability is then its chance of firing
    given that its parent fires (the hierarchy switches it off otherwise).
    """

    block_sizes: tuple[int, ...] = ()
    block_probs: tuple[float, ...] = ()
    rest_prob: float = 0.0

    @classmethod
    def generator_name(cls) -> str:
        return "blocks"

    def generate(self, num_features: int, seed: int | None = None) -> torch.Tensor:
        probs = torch.full((num_features,), self.rest_prob, dtype=torch.float32)
        start = 0
        for size, prob in zip(self.block_sizes, self.block_probs, strict=True):
            probs[start : start + size] = prob
            start += size
        if start > num_features:
            raise ValueError(f"blocks cover {start} features, the world has {num_features}")
        return probs


register_firing_probability("blocks", BlockFiringProbabilityConfig)


def world_config(world: str, d_model: int, n_features: int, seed: int) -> SyntheticModelConfig:
    """The SAELens configuration of one world at the given size."""
    common = {
        "num_features": n_features,
        "hidden_dim": d_model,
        "mean_firing_magnitudes": MEAN_MAGNITUDE,
        "std_firing_magnitudes": STD_MAGNITUDE,
        "bias": BIAS_NORM,
        "seed": seed,
    }
    if world in ("basic", "temporal"):
        low, high = BASIC_PROBS
        return SyntheticModelConfig(
            firing_probability=RandomFiringProbabilityConfig(max_prob=high, min_prob=low), **common
        )
    if world == "zipf":
        return SyntheticModelConfig(
            firing_probability=ZipfianFiringProbabilityConfig(**ZIPF),
            correlation=LowRankCorrelationConfig(**ZIPF_CORRELATION, seed=seed),
            **common,
        )
    if world == "hierarchy":
        roots = max(1, n_features // FEATURES_PER_TREE)
        levels = tuple(roots * BRANCHING**level for level in range(DEPTH + 1))
        if sum(levels) > n_features:
            raise ValueError(f"the hierarchy world needs --features >= {sum(levels)}")
        probs = (ROOT_PROB,) + (CHILD_GIVEN_PARENT_PROB,) * DEPTH
        return SyntheticModelConfig(
            firing_probability=BlockFiringProbabilityConfig(levels, probs, FREE_PROB),
            hierarchy=HierarchyConfig(
                total_root_nodes=roots,
                branching_factor=BRANCHING,
                max_depth=DEPTH,
                mutually_exclusive_portion=1.0,
            ),
            **common,
        )
    raise ValueError(f"unknown world {world!r}; choose one of {', '.join(WORLDS)}")


def persistence_of(world: str) -> float:
    """Probability that an active feature stays active at the next token (0: i.i.d. tokens)."""
    return PERSISTENCE if world == "temporal" else 0.0


def parent_index(model: SyntheticModel) -> torch.Tensor | None:
    """Parent feature of each feature (-1 for roots and free features); None without hierarchy."""
    if model.hierarchy is None:
        return None
    parent = torch.full((model.cfg.num_features,), -1, dtype=torch.int64)
    stack = [(root, -1) for root in model.hierarchy.roots]
    while stack:
        node, up = stack.pop()
        if node.feature_index is not None:
            parent[node.feature_index] = up
        here = node.feature_index if node.feature_index is not None else up
        stack += [(child, here) for child in node.children]
    return parent


def fresh_generator(base: ActivationGenerator, q: float) -> ActivationGenerator:
    """The generator of new firings under persistence q: p' = p(1-q)/(1-pq), so that with the
    persisting firings added the marginal rate stays p (stationary pi = q pi + (1 - q pi) p')."""
    p = base.firing_probabilities
    return ActivationGenerator(
        num_features=base.num_features,
        firing_probabilities=p * (1 - q) / (1 - p * q),
        std_firing_magnitudes=base.std_firing_magnitudes,
        mean_firing_magnitudes=base.mean_firing_magnitudes,
        device=base.firing_probabilities.device,
        dtype=base.firing_probabilities.dtype,
    )


def sample_sequences(
    model: SyntheticModel, n_sequences: int, seq_len: int, persistence: float
) -> torch.Tensor:
    """True feature codes [n_sequences * seq_len, F] in sequence order (global torch RNG).

    Without persistence every token is an independent draw of the world's generator. With
    persistence q, a sequence starts with a draw at the marginal rates; after that each feature
    active at t-1 stays active at t with probability q, keeping its magnitude, and new firings are
    drawn with p' (see `fresh_generator`) with fresh magnitudes.
    """
    base = model.activation_generator
    if persistence == 0.0:
        return base.sample(n_sequences * seq_len)
    fresh = fresh_generator(base, persistence).sample(n_sequences * seq_len)
    codes = fresh.view(n_sequences, seq_len, -1)
    codes[:, 0] = base.sample(n_sequences)
    for t in range(1, seq_len):
        prev = codes[:, t - 1]
        keep = (prev > 0) & (torch.rand(prev.shape, device=prev.device) < persistence)
        codes[:, t] = torch.where(keep, prev, codes[:, t])
    return codes.view(n_sequences * seq_len, -1)
