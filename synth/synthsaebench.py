"""SynthSAEBench-16k, the field's standard synthetic benchmark world, built offline.

    python -m synth.synthsaebench --out activations_cache/worlds/synthsaebench-16k [--small]

Chanin et al. 2026 (arXiv 2602.14687) define the world; SAELens's docs ("SynthSAEBench") and
its build script (decoderesearch/synth-sae-bench-experiments,
``experiments/create_synth_bench_16k_model.py``) give the settings below, which are SAELens's own
config classes filled in. The released world (hub ``decoderesearch/synth-sae-bench-16k-v2``) cannot
be downloaded here, and was drawn on CUDA, whose generator differs from the CPU's: this build is
the same distribution over worlds, not the same draw.

What takes SAELens half an hour on two CPU cores, the orthogonalisation (Adam on
``sum_{i != j} (w_i . w_j)^2 + N sum_i (|w_i|^2 - 1)^2`` over 100 steps), is computed here from
the identity ``sum_{i,j} (w_i . w_j)^2 = |W^T W|_F^2``: [d, d] products instead of [N, N], the
same loss and the same Adam steps (``orthogonalize``; tested against SAELens's function on a
small world). The world is then saved twice in one folder:

* ``world/`` - SAELens's own format (``SyntheticModel.load_from_disk`` reads it; the sampler
  equivalence test and SAELens's trainer use it);
* ``world.safetensors`` + ``world.json`` - the flat tables the JAX sampler of
  ``jax_sae.data.synthetic`` draws from on the training device (no SAELens, no torch there),
  with the SHA-256 of the tables in ``world.json``.

The build is deterministic (seed 42 as published): building twice gives the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sae_lens.synthetic import (
    FoldedNormalMagnitudeConfig,
    HierarchyConfig,
    LinearMagnitudeConfig,
    LowRankCorrelationConfig,
    OrthogonalizationConfig,
    SyntheticModel,
    SyntheticModelConfig,
    ZipfianFiringProbabilityConfig,
)
from safetensors.numpy import save_file

from jax_sae.util.cli import OneLineParser
from jax_sae.util.files import write_bytes_atomic

WORLD_TABLES, WORLD_JSON, SAELENS_DIR = "world.safetensors", "world.json", "world"
FORMAT = "jax-sae-lab synthetic world v1"
PUBLISHED: dict[str, Any] = {
    "num_features": 16_384,  # paper, Table 1: "16k"
    "hidden_dim": 768,  # paper: the width of GPT-2 small's residual stream
    "zipf": {"exponent": 0.5, "max_prob": 0.4, "min_prob": 5e-4},  # build script
    "hierarchy": {"total_root_nodes": 128, "branching_factor": 4, "max_depth": 3},  # build script
    "mean_magnitude": {"start": 5.0, "end": 4.0},  # build script: linear over feature index
    "std_magnitude": {"mean": 0.5, "std": 0.5},  # build script: folded normal per feature
    "correlation": {"rank": 25, "correlation_scale": 0.1},  # build script
    "orthogonalization": {"num_steps": 100, "lr": 3e-4},  # build script
    "bias": 0.5,  # build script: a random direction of norm 0.5
    "seed": 42,  # build script
}
"""The published settings and where each comes from; docs/synthetic.md repeats them."""
SMALL = {"num_features": 1024, "hidden_dim": 64, "total_root_nodes": 8}
"""``--small``: the same world shrunk (8 trees of 85 features, the rest free) for tests."""


def world_config(
    num_features: int = PUBLISHED["num_features"],
    hidden_dim: int = PUBLISHED["hidden_dim"],
    total_root_nodes: int = PUBLISHED["hierarchy"]["total_root_nodes"],
) -> SyntheticModelConfig:
    """SynthSAEBench-16k's SAELens config (sizes overridable for small test worlds)."""
    p = PUBLISHED
    return SyntheticModelConfig(
        num_features=num_features,
        hidden_dim=hidden_dim,
        firing_probability=ZipfianFiringProbabilityConfig(**p["zipf"]),
        hierarchy=HierarchyConfig(
            total_root_nodes=total_root_nodes,
            branching_factor=p["hierarchy"]["branching_factor"],
            max_depth=p["hierarchy"]["max_depth"],
            mutually_exclusive_portion=1.0,  # every sibling group mutually exclusive
            mutually_exclusive_min_depth=0,
            compensate_probabilities=True,
            scale_children_by_parent=True,  # what the v2 release fixed
        ),
        orthogonalization=OrthogonalizationConfig(**p["orthogonalization"]),
        correlation=LowRankCorrelationConfig(**p["correlation"]),
        mean_firing_magnitudes=LinearMagnitudeConfig(**p["mean_magnitude"]),
        std_firing_magnitudes=FoldedNormalMagnitudeConfig(**p["std_magnitude"]),
        bias=p["bias"],
        dtype="float32",
        seed=p["seed"],
    )


def orthogonalize(vectors: torch.Tensor, num_steps: int, lr: float) -> torch.Tensor:
    """SAELens's ``orthogonalize_embeddings`` (unit rows, Adam on the off-diagonal squared dot
    products plus N times the squared norm errors, unit rows again), with the loss written as
    ``|W^T W|_F^2 - sum_i |w_i|^4 + N sum_i (|w_i|^2 - 1)^2``: O(N d^2) per step, not O(N^2 d)."""
    n = vectors.shape[0]
    w = vectors.detach().clone()
    w = w / w.norm(dim=1, keepdim=True).clamp(min=1e-8)
    w.requires_grad_(True)
    optimizer = torch.optim.Adam([w], lr=lr)
    for _ in range(num_steps):
        optimizer.zero_grad()
        sq_norms = (w * w).sum(1)
        gram = w.T @ w
        loss = (gram * gram).sum() - (sq_norms * sq_norms).sum()
        loss = loss + n * ((sq_norms - 1) ** 2).sum()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return (w / w.norm(dim=1, keepdim=True).clamp(min=1e-8)).detach().clone()


def build_model(cfg: SyntheticModelConfig) -> SyntheticModel:
    """SAELens's model of ``cfg``, orthogonalised by ``orthogonalize``: SAELens draws the
    directions, bias, probabilities, hierarchy and correlation exactly as it would (the
    orthogonalisation draws nothing), then the feature vectors are replaced."""
    assert cfg.orthogonalization is not None
    model = SyntheticModel(replace(cfg, orthogonalization=None), device="cpu")
    model.cfg = cfg  # recorded as built: SAELens's loader does not re-orthogonalise
    vectors = model.feature_dict.feature_vectors
    vectors.data = orthogonalize(
        vectors.data, cfg.orthogonalization.num_steps, cfg.orthogonalization.lr
    )
    return model


def hierarchy_tables(model: SyntheticModel) -> dict[str, np.ndarray]:
    """The hierarchy as arrays: each feature's parent (-1: none) and depth (-1: outside every
    tree), and the mutually exclusive sibling groups (padded with -1) with their parents."""
    n = model.cfg.num_features
    parent, depth = np.full(n, -1, np.int32), np.full(n, -1, np.int32)
    groups: list[tuple[int, list[int]]] = []
    stack = [(root, -1, 0) for root in (model.hierarchy.roots if model.hierarchy else [])]
    while stack:
        node, up, level = stack.pop()
        if node.feature_index is None:
            raise SystemExit("error: hierarchy nodes without a feature are not supported")
        parent[node.feature_index], depth[node.feature_index] = up, level
        children = [child.feature_index for child in node.children]
        if node.mutually_exclusive_children and len(children) >= 2:
            groups.append((node.feature_index, children))
        stack += [(child, node.feature_index, level + 1) for child in node.children]
    groups.sort()
    width = max((len(members) for _, members in groups), default=1)
    members = np.full((len(groups), width), -1, np.int32)
    for row, (_, children) in enumerate(groups):
        members[row, : len(children)] = children
    return {
        "parent": parent,
        "depth": depth,
        "group_parent": np.array([p for p, _ in groups], np.int32),
        "group_members": members,
    }


def world_tables(model: SyntheticModel) -> dict[str, np.ndarray]:
    """Everything a sampler needs, as float32/int32 arrays (see ``jax_sae.data.synthetic``)."""
    generator = model.activation_generator
    correlation = model.correlation_matrix

    def array(t: torch.Tensor) -> np.ndarray:
        return t.detach().cpu().numpy().astype(np.float32)

    tables = {
        "feature_vectors": array(model.feature_dict.feature_vectors),
        "bias": array(model.feature_dict.bias),
        "firing_probabilities": array(generator.firing_probabilities),
        "mean_magnitudes": array(generator.mean_firing_magnitudes),
        "std_magnitudes": array(generator.std_firing_magnitudes),
    }
    if correlation is not None:
        tables["correlation_factor"] = array(correlation.correlation_factor)
        tables["correlation_diag"] = array(correlation.correlation_diag)
    return tables | hierarchy_tables(model)


def save_world(model: SyntheticModel, out: Path, name: str) -> dict[str, Any]:
    """SAELens's folder and the flat tables with their checksum; returns world.json."""
    out.mkdir(parents=True, exist_ok=True)
    model.save(out / SAELENS_DIR)
    tables = world_tables(model)
    save_file(tables, out / WORLD_TABLES)
    sha = hashlib.sha256((out / WORLD_TABLES).read_bytes()).hexdigest()
    hierarchy = model.cfg.hierarchy
    record = {
        "format": FORMAT,
        "name": name,
        "num_features": model.cfg.num_features,
        "hidden_dim": model.cfg.hidden_dim,
        "scale_children_by_parent": bool(hierarchy and hierarchy.scale_children_by_parent),
        "tables_sha256": sha,
        "published_settings": PUBLISHED,
        "saelens_config": model.cfg.to_dict(),
        "versions": {"sae_lens": version("sae_lens"), "torch": torch.__version__},
    }
    write_bytes_atomic(out / WORLD_JSON, json.dumps(record, indent=1).encode())
    return record


def saelens_statistics(folder: Path, samples: int, seed: int, batch: int = 4096) -> dict:
    """Statistics of ``samples`` codes drawn by SAELens's own sampler from the world in
    ``folder`` (``synth.sampler_stats``), for the sampler equivalence check."""
    from safetensors.numpy import load_file
    from tqdm.auto import tqdm

    from synth.sampler_stats import CodeStats, correlated_pairs

    tables = load_file(folder / WORLD_TABLES)
    model = SyntheticModel.load_from_disk(folder / SAELENS_DIR)
    stats = CodeStats(
        correlated_pairs(tables["correlation_factor"], tables["parent"]),
        tables["parent"],
        tables["group_members"],
    )
    torch.manual_seed(seed)
    for start in tqdm(range(0, samples, batch), desc="SAELens sampler", unit="batch"):
        _, codes = model.sample_with_features(min(batch, samples - start))
        stats.add(codes.numpy())
    return stats.arrays()


def version(package: str) -> str:
    from importlib.metadata import version as installed

    return installed(package)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m synth.synthsaebench", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write the world to")
    parser.add_argument("--small", action="store_true", help="the test-sized world (1024 x 64)")
    parser.add_argument("--hidden", type=int, help="with --small: this hidden size instead of 64")
    parser.add_argument(
        "--stats",
        type=Path,
        help="draw --samples codes of the world in --out "
        "with SAELens's sampler and save their statistics (.npz) here",
    )
    parser.add_argument("--samples", type=int, default=65536)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.stats is not None:
        start = time.perf_counter()
        arrays = saelens_statistics(args.out, args.samples, args.seed)
        took = time.perf_counter() - start
        np.savez(args.stats, seconds=np.array(took), **arrays)
        print(f"SAELens drew {args.samples} samples in {took:.1f} s", file=sys.stderr)
        return 0
    if (args.out / WORLD_JSON).exists():
        print(f"{args.out} already holds a world ({WORLD_JSON}); nothing to do", file=sys.stderr)
        return 0
    if args.out.exists() and any(args.out.iterdir()):
        print(f"error: {args.out} is not empty; pass --out a new folder", file=sys.stderr)
        return 2
    if args.hidden is not None and not args.small:
        parser.error("--hidden resizes the --small world only; add --small")
    cfg = world_config(**(SMALL | {"hidden_dim": args.hidden or SMALL["hidden_dim"]}))
    if not args.small:
        cfg = world_config()
    start = time.perf_counter()
    model = build_model(cfg)
    name = "synthsaebench-small" if args.small else "synthsaebench-16k"
    save_world(model, args.out, name)
    took = time.perf_counter() - start
    print(f"wrote {name} to {args.out} in {took:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
