"""An ordinary activation cache of a world folder, drawn by the on-device sampler.

    python -m synth.world_cache --world DIR --out CACHE [--tokens N] [--seed S] [--resume]

`make synth WORLD=synthsaebench-16k TOKENS=N` runs it (in `.venv`: it samples with JAX, 6x
faster than SAELens's sampler on a CPU, far more on a GPU). The cache matches `synth.make_world`'s
layout, so `make synth-eval` scores runs trained on it:
* one layer, 0;
* every sample is its own sequence (position 1), as the world's samples are independent;
* the token id is 1 + the strongest true feature, 0 where none fires;
* `ground_truth.safetensors` holds the true dictionary, the firing probabilities, the parents,
  and the held-out tail's true codes;
* the world's SAELens folder is copied to `world/`.

Shard k is drawn from key (seed, k), so `--resume` continues a killed build from its last
complete shard with the draws an uninterrupted build makes.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import jax
import numpy as np
import scipy.sparse as sp
import torch
from safetensors.numpy import load_file
from safetensors.torch import save

from jax_sae.data.cache import CacheError, CacheWriter
from jax_sae.data.synthetic import WORLD_TABLES, WorldError, load_world
from jax_sae.util.files import write_bytes_atomic
from synth.make_world import (
    GROUND_TRUTH,
    MODEL_PREFIX,
    WORLD_DIR,
    ground_truth,
    heldout_offset,
    token_ids,
)

SHARD_TOKENS = 131072
DRAW_ROWS = 4096  # dense codes [4096, 16384] at a time: 256 MB


def draw_shard(world, key: jax.Array, n: int) -> tuple[np.ndarray, np.ndarray, sp.csr_matrix]:
    """(activations [n, d], token ids [n], true codes as CSR) of one shard."""
    acts, tokens, codes = [], [], []
    for index, start in enumerate(range(0, n, DRAW_ROWS)):
        h, x = world.draw(jax.random.fold_in(key, index), min(DRAW_ROWS, n - start))
        x = np.asarray(x)
        tokens.append(token_ids(torch.from_numpy(x)))
        acts.append(np.asarray(h, np.float32))
        codes.append(sp.csr_matrix(x))
    return np.concatenate(acts), np.concatenate(tokens), sp.vstack(codes, format="csr")


def write_world_cache(
    world_dir: Path, out: Path, tokens: int, seed: int = 0, resume: bool = False
) -> Path:
    world = load_world(world_dir)
    if out.exists() and any(out.iterdir()) and not resume:
        raise CacheError(f"{out} is not empty; pass --resume to continue its build, or a new --out")
    settings = {"world": world.name, "tables_sha256": world.record["tables_sha256"],
                "tokens": tokens, "seed": seed, "shard_tokens": SHARD_TOKENS}  # fmt: skip
    metadata = {
        "model_name": MODEL_PREFIX + world.name,
        "dataset": f"{world.name} drawn by jax_sae.data.synthetic (seed {seed})",
        "tokenizer": None,
        "ctx_len": 1,
        "prepend_bos": False,
        "token_ids": "1 + index of the strongest active true feature; 0 when none fires",
    }
    writer = CacheWriter(out, layers=[0], d_model=world.d_model, dtype="bfloat16",
                         settings=settings, metadata=metadata, resume=resume)  # fmt: skip
    if writer.manifest.get("complete"):
        return out
    offset = heldout_offset(tokens, 1)
    heldout = []
    key = jax.random.key(seed)
    for k, first in enumerate(range(0, tokens, SHARD_TOKENS)):
        n = min(SHARD_TOKENS, tokens - first)
        written = k < writer.n_shards
        if written and first + n <= offset:
            continue
        acts, ids, codes = draw_shard(world, jax.random.fold_in(key, k), n)
        if not written:
            writer.write_shard({0: acts}, ids, np.ones(n, np.int32), n)
            print(f"shard {k}: {first + n} of {tokens} tokens", file=sys.stderr)
        if first + n > offset:
            heldout.append(codes[max(0, offset - first) :])
    tables = {k: torch.from_numpy(v) for k, v in load_file(world_dir / WORLD_TABLES).items()}
    truth = ground_truth(
        tables["feature_vectors"],
        tables["bias"],
        tables["firing_probabilities"],
        tables["parent"],
        heldout,
        offset,
    )
    write_bytes_atomic(
        out / GROUND_TRUTH, save(truth, metadata={"world": world.name, "layer": "0"})
    )
    if not (out / WORLD_DIR).exists():
        shutil.copytree(world_dir / WORLD_DIR, out / WORLD_DIR)
    writer.finish()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=Path, required=True, help="a world folder (world.json)")
    parser.add_argument("--out", type=Path, required=True, help="the cache folder to write")
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue a killed build")
    args = parser.parse_args(argv)
    if args.tokens <= 0:
        print("error: --tokens must be > 0", file=sys.stderr)
        return 2
    try:
        out = write_world_cache(args.world, args.out, args.tokens, args.seed, args.resume)
    except (WorldError, CacheError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.tokens} tokens of {args.world} to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
