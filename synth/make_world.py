"""Write a synthetic world as an ordinary activation cache plus its ground truth.

    python -m synth.make_world --world basic|hierarchy|temporal|zipf --out DIR [--tokens N]
        [--d-model D] [--features F] [--seq-len T] [--seed S] [--dtype bfloat16|float32]
        [--resume | --force] [--device cpu|cuda]

DIR gets the cache (`manifest.json`, `L0/`, `tokens/`, `positions/`: one layer, 0, so train with
`--layer 0`), the SAELens world in `world/` (`SyntheticModel.load_from_disk`) and
`ground_truth.safetensors`. Each shard is drawn from a seed derived from (seed, shard index), so a
build is deterministic and `--resume` continues a killed build exactly. An existing cache of the
same world is never overwritten without `--force`; a cache of anything else is always refused.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from safetensors.torch import save

from jax_sae.data.cache import MANIFEST, CacheWriter
from jax_sae.util.files import write_bytes_atomic
from synth import WORLDS

LAYER = 0
GROUND_TRUTH = "ground_truth.safetensors"
WORLD_DIR = "world"
MODEL_PREFIX = "synthetic-"
DEFAULT_SHARD_TOKENS = 131072
BATCH_ELEMENTS = 1 << 25  # dense code entries [tokens x features] sampled at once (128 MiB)
# the trainer holds out the last min(65536, n // 10) tokens; the ground truth covers at least that
HELDOUT_MIN, HELDOUT_MAX = 16384, 65536


class WorldError(ValueError):
    """A world that cannot be built as asked; the message names the problem and the fix."""


def heldout_offset(n_tokens: int, seq_len: int) -> int:
    """First token whose true codes are stored: the last max(16384, min(65536, n // 10)) tokens,
    moved back to a sequence start (so whole held-out sequences are covered)."""
    keep = min(n_tokens, max(HELDOUT_MIN, min(HELDOUT_MAX, n_tokens // 10)))
    return (n_tokens - keep) // seq_len * seq_len


def shard_seed(seed: int, shard: int) -> int:
    """Independent torch seed per shard: shards can be (re)built in any order."""
    return int(np.random.SeedSequence([seed, shard]).generate_state(1)[0])


def token_ids(codes: torch.Tensor) -> np.ndarray:
    """The `tokens` entry of the cache: 1 + the index of the strongest true feature, 0 if none."""
    values, index = codes.max(dim=1)
    return torch.where(values > 0, index + 1, 0).cpu().numpy().astype(np.int32)


@torch.no_grad()
def shard_arrays(
    model, n_sequences: int, seq_len: int, persistence: float, seed: int
) -> tuple[np.ndarray, np.ndarray, sp.csr_matrix]:
    """Activations [n, d] float32, token ids [n] and true codes [n, F] (CSR) of one shard."""
    from synth import worlds

    torch.manual_seed(seed)
    per_batch = max(1, BATCH_ELEMENTS // (model.cfg.num_features * seq_len))
    acts, tokens, codes_csr = [], [], []
    for start in range(0, n_sequences, per_batch):
        codes = worlds.sample_sequences(
            model, min(per_batch, n_sequences - start), seq_len, persistence
        )
        acts.append(model.feature_dict(codes.to_sparse()).cpu().numpy())
        tokens.append(token_ids(codes))
        codes_csr.append(sp.csr_matrix(codes.cpu().numpy()))
    return np.concatenate(acts), np.concatenate(tokens), sp.vstack(codes_csr, format="csr")


def check_out_dir(out: Path, model_name: str, resume: bool, force: bool) -> None:
    """Refuse folders that hold anything but this world; clear this world only with --force."""
    if not out.exists() or not any(out.iterdir()):
        return
    manifest = out / MANIFEST
    if not manifest.exists():
        raise WorldError(f"{out} exists and is not an activation cache; choose another --out")
    found = json.loads(manifest.read_text()).get("model_name")
    if found != model_name:
        raise WorldError(
            f"{out} holds a cache of {found!r}, not {model_name!r}; choose another --out "
            "(it is never overwritten)"
        )
    if force:
        shutil.rmtree(out)
    elif not resume:
        raise WorldError(
            f"{out} already holds {model_name}; pass --resume to continue it or --force to "
            "rebuild it"
        )


def ground_truth(
    feature_vectors: torch.Tensor,
    bias: torch.Tensor,
    firing_probabilities: torch.Tensor,
    parent: torch.Tensor | None,
    heldout: list[sp.csr_matrix],
    offset: int,
) -> dict:
    """Tensors of `ground_truth.safetensors`: the true dictionary, bias and firing
    probabilities, each feature's parent (-1: none; absent without a hierarchy), and the held-out
    codes from token `offset` on as CSR."""
    codes = sp.vstack(heldout, format="csr")
    tensors = {
        "feature_vectors": feature_vectors.detach().float(),
        "bias": bias.detach().float(),
        "firing_probabilities": firing_probabilities.float(),
        "heldout_indptr": torch.from_numpy(codes.indptr.astype(np.int64)),
        "heldout_indices": torch.from_numpy(codes.indices.astype(np.int32)),
        "heldout_values": torch.from_numpy(codes.data.astype(np.float32)),
        "heldout_offset": torch.tensor([offset], dtype=torch.int64),
    }
    if parent is not None:
        tensors["parent"] = parent.long()
    return {k: v.cpu().contiguous() for k, v in tensors.items()}


def build_world(args: argparse.Namespace) -> Path:
    """Write the world's cache, SAELens world and ground truth; returns the output folder."""
    out, world, seq_len = Path(args.out), args.world, args.seq_len
    model_name = MODEL_PREFIX + world
    check_out_dir(out, model_name, args.resume, args.force)
    from sae_lens.synthetic import SyntheticModel  # slow import: after the quick refusals
    from tqdm.auto import tqdm

    from synth import worlds

    config = worlds.world_config(world, args.d_model, args.features, args.seed)
    persistence = worlds.persistence_of(world)
    n_sequences = -(-args.tokens // seq_len)
    n_tokens = n_sequences * seq_len
    shard_sequences = max(1, args.shard_tokens // seq_len)
    world_settings = {"world": world, "config": config.to_dict(), "persistence": persistence}
    settings = json.loads(
        json.dumps(
            world_settings
            | {"tokens": n_tokens, "seq_len": seq_len, "shard_tokens": args.shard_tokens}
            | {"seed": args.seed, "dtype": args.dtype, "persistence_magnitudes": "kept"}
            | {"device": args.device}
        )
    )
    metadata = {
        "model_name": model_name,
        "dataset": f"sae_lens.synthetic world '{world}' (seed {args.seed})",
        "tokenizer": None,
        "ctx_len": seq_len,
        "prepend_bos": False,
        "dropped_special_tokens": [],
        "token_ids": "1 + index of the strongest active true feature; 0 when none fires",
    }
    writer = CacheWriter(
        out, layers=[LAYER], d_model=args.d_model, dtype=args.dtype, settings=settings,
        metadata=metadata, resume=args.resume,
    )  # fmt: skip
    if writer.manifest.get("complete"):
        print(f"{out} is already complete ({writer.n_tokens} tokens)", file=sys.stderr)
        return out
    model = SyntheticModel(config, device=args.device)
    model.save(out / WORLD_DIR)
    offset = heldout_offset(n_tokens, seq_len)
    heldout: list[sp.csr_matrix] = []
    positions = np.tile(np.arange(1, seq_len + 1, dtype=np.int32), shard_sequences)
    n_shards = -(-n_sequences // shard_sequences)
    bar = tqdm(total=n_tokens, initial=writer.n_tokens, unit="tok", unit_scale=True,
               desc=f"synth {world}", disable=args.quiet)  # fmt: skip
    with bar:
        for k in range(n_shards):
            first = k * shard_sequences
            size = min(shard_sequences, n_sequences - first)
            written = k < writer.n_shards
            if written and (first + size) * seq_len <= offset:
                continue  # a resumed build skips finished shards outside the held-out tail
            acts, tokens, codes = shard_arrays(
                model, size, seq_len, persistence, shard_seed(args.seed, k)
            )
            if not written:
                writer.write_shard({LAYER: acts}, tokens, positions[: size * seq_len], size)
                bar.update(size * seq_len)
            if (first + size) * seq_len > offset:
                heldout.append(codes[max(0, offset - first * seq_len) :])
    truth = ground_truth(
        model.feature_dict.feature_vectors,
        model.feature_dict.bias,
        model.activation_generator.firing_probabilities,
        worlds.parent_index(model),
        heldout,
        offset,
    )
    metadata = {"world": world, "persistence": str(persistence), "layer": str(LAYER)}
    write_bytes_atomic(out / GROUND_TRUTH, save(truth, metadata=metadata))
    writer.finish()
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", required=True, choices=WORLDS)
    p.add_argument("--out", required=True, type=Path, help="output folder (the cache)")
    p.add_argument("--tokens", type=int, default=1_000_000, help="rounded up to whole sequences")
    p.add_argument("--d-model", type=int, default=256, help="activation dimension d")
    p.add_argument("--features", type=int, default=4096, help="number of true features F")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence T")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue a killed build")
    mode.add_argument("--force", action="store_true", help="delete and rebuild this world")
    p.add_argument("--device", default="cpu", help="where to sample: cpu, or cuda for big worlds")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    for name in ("tokens", "d_model", "features", "seq_len", "shard_tokens"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        out = build_world(args)
    except ValueError as error:  # WorldError, CacheError, and sizes SAELens refuses
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.world} world to {out} (train with --cache {out} --layer {LAYER})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
