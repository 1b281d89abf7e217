"""Command line of the extraction stage: ``python -m extract --model M --dataset D --layers L``.

Heavy imports (torch, transformers) happen after argument parsing, so ``--help`` is instant and
the hub timeouts below are in place before ``huggingface_hub`` reads them.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from jax_sae.cli import OneLineParser

_DEFAULTS = {
    "model": "google/gemma-2-2b",
    "dataset": ["monology/pile-uncopyrighted"],
    "layers": [12],
    "tokens": "10_000_000",
    "ctx_len": 128,
    "batch_size": 32,
    "shard_tokens": "131072",
}
_SUFFIXES = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}


def parse_count(text: str) -> int:
    """Token counts as people write them: 10000000, 10_000_000, 1e7, 10M, 500k."""
    scale = _SUFFIXES.get(text[-1:].lower(), 1)
    body = text[:-1] if scale > 1 else text
    try:
        value = float(body.replace("_", "")) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a token count: {text!r} (e.g. 10000000, 10M)"
        ) from None
    if value != int(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"not a positive whole token count: {text!r}")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m extract",
        description="Cache residual-stream activations of a causal LM (SPEC 2).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default=_DEFAULTS["model"], help="hub name or local model folder")
    p.add_argument("--revision", help="hub revision (branch, tag or commit) of the model")
    p.add_argument(
        "--dataset",
        nargs="+",
        default=_DEFAULTS["dataset"],
        help="hub name, local folder, or local .json/.jsonl/.txt/.csv/.parquet files",
    )
    p.add_argument("--split", default="train", help="dataset split")
    p.add_argument("--text-field", default="text", help="dataset column holding the text")
    p.add_argument(
        "--layers", nargs="+", type=int, default=_DEFAULTS["layers"],
        help="blocks whose output (blocks.L.hook_resid_post) is cached; one pass for all",
    )  # fmt: skip
    p.add_argument(
        "--tokens", type=parse_count, default=_DEFAULTS["tokens"], help="tokens to cache"
    )
    p.add_argument("--ctx-len", type=int, default=_DEFAULTS["ctx_len"], help="tokens per sequence")
    p.add_argument(
        "--batch-size", type=int, default=_DEFAULTS["batch_size"], help="sequences per forward"
    )
    p.add_argument(
        "--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
        help="storage dtype of the cached activations",
    )  # fmt: skip
    p.add_argument(
        "--model-dtype", choices=["bfloat16", "float16", "float32"],
        help="dtype the model runs in (default: bfloat16 on CUDA, float32 on CPU)",
    )  # fmt: skip
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument(
        "--attn-implementation", default="eager", choices=["eager", "sdpa", "flash_attention_2"],
        help="attention kernel; eager is the only one exact for Gemma-2's logit soft-capping",
    )  # fmt: skip
    p.add_argument(
        "--out", type=Path,
        help="cache folder (default: activations_cache/<model>__<dataset>__L<layers>)",
    )  # fmt: skip
    p.add_argument(
        "--keep-bos", action="store_true", help="cache BOS tokens too (dropped by default)"
    )
    p.add_argument(
        "--drop-norm-outliers", type=float, metavar="N",
        help="drop tokens whose norm exceeds N x the batch median at any cached layer",
    )  # fmt: skip
    p.add_argument(
        "--shard-tokens", type=parse_count, default=_DEFAULTS["shard_tokens"],
        help="tokens per shard (shards end at batch boundaries, so they are slightly larger)",
    )  # fmt: skip
    p.add_argument(
        "--resume", action="store_true",
        help="continue the cache in --out (settings must match); starts it if absent",
    )  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed as one line
        return int(e.code or 0)
    # Fail fast instead of waiting on a dead connection (read when huggingface_hub is imported).
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")

    from extract.errors import ExtractError
    from extract.extractor import ExtractConfig, extract
    from jax_sae.data import ActivationCache, CacheError

    cfg = ExtractConfig(
        model=args.model,
        revision=args.revision,
        dataset=tuple(args.dataset),
        split=args.split,
        text_field=args.text_field,
        layers=tuple(args.layers),
        tokens=args.tokens,
        ctx_len=args.ctx_len,
        batch_size=args.batch_size,
        dtype=args.dtype,
        model_dtype=args.model_dtype,
        device=args.device,
        attn_implementation=args.attn_implementation,
        out=args.out,
        keep_bos=args.keep_bos,
        drop_norm_outliers=args.drop_norm_outliers,
        shard_tokens=args.shard_tokens,
        resume=args.resume,
        progress=not args.quiet,
    )
    try:
        out = extract(cfg)
        cache = ActivationCache(out)
    except (ExtractError, CacheError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: complete shards are kept; rerun with --resume", file=sys.stderr)
        return 130
    print(
        f"{out}: {cache.n_tokens} tokens, layers {cache.layers}, d_model {cache.d_model}, "
        f"{len(cache.shard_sizes)} shards ({cache.manifest['dtype']})"
    )
    return 0
