"""The multi-device runs of tests/test_mesh.py, in a process of its own: XLA must be told to
split the CPU into 4 devices before JAX is imported.

    python tests/mesh_runs.py OUT_DIR

writes OUT_DIR/arrays.npz (final states per variant and mesh, the sweep, top-k results, a
checkpoint restored on another mesh) and OUT_DIR/facts.json (output layouts, HLO facts).
"""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_sae.model.variants import make_variant
from jax_sae.parallel import layout
from jax_sae.training.checkpoint import Checkpoints
from jax_sae.training.optim import make_optimizer
from jax_sae.training.step import make_train_step

D_IN, D_SAE, BATCH, STEPS = 32, 128, 64, 20
VARIANTS = {
    "topk": {"k": 8},
    "standard": {},
    "hier_ortho": {"k": 8, "counts": "ema"},  # with its [F, F] co-firing state
    "temporal": {},
}
MESHES = {"4x1": (4, 1), "2x2": (2, 2), "1x4": (1, 4)}
OTHER_VARIANTS = {
    "batchtopk": {"k": 8},
    "matryoshka": {"k": 8},
    "jumprelu": {},
    "freq": {},
    "pair_ortho": {},
    "two_level": {},
}
"""Every other variant, on the 2 x 2 mesh (it splits both axes)."""
OTHER_TOPK_FAMILY = ("batchtopk", "matryoshka", "two_level")
"""...and the rest of the TopK family on 1 x 4 too, where the sparse path's pairs cross shards."""
COLLECTIVE_RUNS = {
    "topk": {"k": 8},
    "batchtopk": {"k": 8},
    "matryoshka": {"k": 8},
    # one token chunk: the compiled loop body is then the whole step's co-firing traffic
    "hier_ortho": {"k": 8, "token_chunk": BATCH},
    "two_level": {"k_b": 8, "k_c": 2},
    "topk_dense": {"k": 8, "dense": True},
}
"""The TopK family (and the dense reference path) whose compiled collectives are read."""


def batches(keys: tuple[str, ...]) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    out = []
    for _ in range(STEPS):
        batch = {"x": rng.normal(size=(BATCH, D_IN)).astype(np.float32)}
        if "x_prev" in keys:
            batch["x_prev"] = rng.normal(size=(BATCH, D_IN)).astype(np.float32)
            batch["seq_start"] = rng.random(BATCH) < 0.1
        out.append(batch)
    return out


def initial(variant, opt, seed: int, sample: np.ndarray):
    params = variant.init_params(jax.random.key(seed), sample)
    return params, opt.init(params), variant.init_state()


def mesh_of(name: str):
    data, model = MESHES[name]
    return layout.make_mesh({"data": data, "model": model})


def train(step_fn, state, data):
    for i, batch in enumerate(data):
        *state, _ = step_fn(*state, batch, jnp.int32(i))
    return tuple(state)


def flat(prefix: str, tree) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {f"{prefix}/{jax.tree_util.keystr(path)}": np.asarray(leaf) for path, leaf in leaves}


def layouts_kept(state, shardings) -> bool:
    pairs = zip(jax.tree.leaves(state), jax.tree.leaves(shardings), strict=True)
    return all(leaf.sharding.is_equivalent_to(s, leaf.ndim) for leaf, s in pairs)


def meshes_vs_one_device(
    arrays: dict, facts: dict, variants: dict, meshes: tuple, skip_one_device: bool = False
) -> None:
    """Train each variant on one device (unless already done) and on each mesh."""
    for name, hparams in variants.items():
        variant = make_variant(name, D_IN, D_SAE, **hparams)
        opt = make_optimizer(lr=1e-3, warmup_steps=2)
        data = batches(variant.batch_keys)
        step_fn = make_train_step(variant, opt)
        if not skip_one_device:
            one = train(step_fn, initial(variant, opt, 0, data[0]["x"]), data)
            arrays |= flat(f"{name}/1", one)
        for mesh_name in meshes:
            mesh = mesh_of(mesh_name)
            state = initial(variant, opt, 0, data[0]["x"])
            shardings = layout.state_shardings(mesh, state, D_SAE)
            state = jax.device_put(state, shardings)
            state = train(layout.shard_train_step(step_fn, mesh, shardings, BATCH), state, data)
            arrays |= flat(f"{name}/{mesh_name}", state)
            facts[f"layouts_kept/{name}/{mesh_name}"] = layouts_kept(state, shardings)


def sweep(arrays: dict) -> None:
    """Two members (different seeds) vmapped over a shared batch, unsharded and on 2 x 2."""
    variant = make_variant("topk", D_IN, D_SAE, k=8)
    opt = make_optimizer(lr=1e-3, warmup_steps=2)
    data = batches(variant.batch_keys)
    members = [initial(variant, opt, seed, data[0]["x"]) for seed in (0, 1)]
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *members)
    step_fn = jax.vmap(make_train_step(variant, opt), in_axes=(0, 0, 0, None, None))
    arrays |= flat("sweep/1", train(jax.jit(step_fn), stacked, data))
    mesh = mesh_of("2x2")
    shardings = layout.state_shardings(mesh, stacked, D_SAE, member_axis=True)
    sharded_step = layout.shard_train_step(step_fn, mesh, shardings, BATCH)
    arrays |= flat("sweep/2x2", train(sharded_step, jax.device_put(stacked, shardings), data))


def top_k(arrays: dict) -> None:
    """`sharded_top_k` on rounded values (many ties) against `lax.top_k`."""
    x = np.round(np.random.default_rng(2).normal(size=(16, 64)), 1).astype(np.float32)
    results = {"lax": lax.top_k(jnp.asarray(x), 5)}
    for mesh_name in ("2x2", "1x4"):
        results[mesh_name] = layout.sharded_top_k(jnp.asarray(x), 5, mesh_of(mesh_name))
    for name, (values, indices) in results.items():
        arrays[f"top_k/{name}/values"] = np.asarray(values)
        arrays[f"top_k/{name}/indices"] = np.asarray(indices)


def formula_bytes(name: str, variant, data: int, model: int) -> float:
    """`layout.collective_bytes_per_step` with the variant's own selection widths."""
    hp = variant.hparams
    per_token_k = None if name in ("batchtopk", "matryoshka") else hp.get("k", hp.get("k_b"))
    cofiring_k = hp["k"] if name == "hier_ortho" else None
    return layout.collective_bytes_per_step(
        D_IN, D_SAE, BATCH, data, model, per_token_k, hp.get("k_aux"), cofiring_k
    )["total"]


def whole_gathers(hlo: str) -> list[str]:
    """All-gathers whose result has an axis of d_sae latents or a multiple of it: a gathered
    [B, F] array (also flattened) or decoder; at these sizes no candidate gather is that wide."""
    out = []
    for line in hlo.splitlines():
        if " all-gather(" in line or " all-gather-start(" in line:
            shape = line.split("=", 1)[1].split(" all-gather")[0]
            groups = re.findall(r"\[([0-9,]+)\]", shape)
            dims = [int(d) for group in groups for d in group.split(",")]
            if any(d % D_SAE == 0 for d in dims):
                out.append(line.strip()[:200])
    return out


def collectives(facts: dict) -> None:
    """Per TopK-family variant and mesh: the bytes one device sends per compiled step, the
    formula's, and any all-gather of a whole [B, F] array or decoder."""
    for name, hparams in COLLECTIVE_RUNS.items():
        variant = make_variant(name.removesuffix("_dense"), D_IN, D_SAE, **hparams)
        opt = make_optimizer(lr=1e-3, warmup_steps=2)
        state = initial(variant, opt, 0, None)
        batch = {key: np.zeros((BATCH, D_IN), np.float32) for key in variant.batch_keys}
        for mesh_name, (data, model) in MESHES.items():
            mesh = mesh_of(mesh_name)
            shardings = layout.state_shardings(mesh, state, D_SAE)
            step_fn = layout.shard_train_step(make_train_step(variant, opt), mesh, shardings, BATCH)
            hlo = step_fn.lower(*state, batch, jnp.int32(0)).compile().as_text()
            facts[f"collectives/{name}/{mesh_name}"] = {
                "compiled": layout.compiled_collective_bytes(hlo)["total"],
                "formula": formula_bytes(name, variant, data, model),
                "whole_gathers": whole_gathers(hlo),
            }


def checkpoint_across_meshes(arrays: dict, facts: dict, directory: Path) -> None:
    """Save the state of a 2 x 2 run, restore it onto 1 x 4 into an abstract sharded target."""
    variant = make_variant("hier_ortho", D_IN, D_SAE, **VARIANTS["hier_ortho"])
    opt = make_optimizer(lr=1e-3, warmup_steps=2)
    state = initial(variant, opt, 0, None)
    saved = jax.device_put(state, layout.state_shardings(mesh_of("2x2"), state, D_SAE))
    target_shardings = layout.state_shardings(mesh_of("1x4"), state, D_SAE)
    target = jax.tree.map(
        lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
        state,
        target_shardings,
    )
    with Checkpoints(directory) as checkpoints:
        checkpoints.save(1, saved, {"config_hash": "mesh"})
    with Checkpoints(directory) as checkpoints:
        restored, _ = checkpoints.restore(1, target, "mesh")
    arrays |= flat("restore/saved", state) | flat("restore/1x4", restored)
    facts["restore_layouts"] = layouts_kept(restored, target_shardings)


def main(out: Path) -> None:
    arrays: dict[str, np.ndarray] = {}
    facts: dict = {"devices": jax.device_count()}
    meshes_vs_one_device(arrays, facts, VARIANTS, tuple(MESHES))
    meshes_vs_one_device(arrays, facts, OTHER_VARIANTS, ("2x2",))
    family = {name: OTHER_VARIANTS[name] for name in OTHER_TOPK_FAMILY}
    meshes_vs_one_device(arrays, facts, family, ("1x4",), skip_one_device=True)
    sweep(arrays)
    top_k(arrays)
    collectives(facts)
    checkpoint_across_meshes(arrays, facts, out / "checkpoints")
    np.savez(out / "arrays.npz", **arrays)
    (out / "facts.json").write_text(json.dumps(facts))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
