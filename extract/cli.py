"""Command line of the extraction stage: ``python -m extract --model M --dataset D --layers L``.

Heavy imports (torch, transformers) happen after argument parsing, so ``--help`` is instant and
the hub timeouts below are in place before ``huggingface_hub`` reads them.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from jax_sae.util.cli import OneLineParser

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
_BYTE_UNITS = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_PR_SET_PDEATHSIG = 1  # prctl option: a signal the kernel sends when the parent exits


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


def parse_size(text: str) -> int:
    """Byte sizes as people write them: 40G, 512M, 1.5T, 40GB, 40GiB, 1000000 (K/M/G/T count
    in powers of 1024, as df -h and du -h print them)."""
    body = text.strip().lower().removesuffix("ib").removesuffix("b")
    scale = _BYTE_UNITS.get(body[-1:], 1)
    try:
        value = float((body[:-1] if scale > 1 else body).replace("_", "")) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 40G, 512M)") from None
    if not value >= 1:
        raise argparse.ArgumentTypeError(f"not a positive size: {text!r}")
    return int(value)


def exit_with_parent(parent: int) -> bool:
    """Have the kernel end this process (SIGTERM) when ``parent`` exits (Linux); False when
    ``parent`` is not (or no longer) this process's parent.

    A streaming extractor blocked on its disk budget waits for a trainer to release shards; if
    that trainer is killed, this keeps the extractor from waiting forever beside the next one.
    """
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    return os.getppid() == parent  # checked after the request: a parent gone before it counts


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m extract",
        description="Cache residual-stream activations of a causal LM.",
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
        "--disk-budget", type=parse_size, metavar="SIZE",
        help="stream: keep at most SIZE (40G, 512M) of shards on disk; wait for the trainer to "
        "release shards, then delete them (jax_sae.data.stream)",
    )  # fmt: skip
    p.add_argument(
        "--parent-pid", type=int, metavar="PID",
        help="exit when process PID, the trainer that started this extractor, exits (Linux)",
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
    if args.parent_pid is not None and not exit_with_parent(args.parent_pid):
        print(
            f"error: --parent-pid {args.parent_pid} is not the parent of this process",
            file=sys.stderr,
        )
        return 2
    # Fail fast instead of waiting on a dead connection (read when huggingface_hub is imported).
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")

    from extract.errors import ExtractError
    from extract.extractor import ExtractConfig, extract
    from jax_sae.data.cache import CacheError, read_manifest

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
        disk_budget=args.disk_budget,
        announce_open=args.parent_pid is not None,
    )
    try:
        out = extract(cfg)
        manifest = read_manifest(out)
    except (ExtractError, CacheError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: complete shards are kept; rerun with --resume", file=sys.stderr)
        return 130
    deleted = sum(bool(shard.get("deleted")) for shard in manifest["shards"])
    print(
        f"{out}: {manifest['n_tokens']} tokens, layers {manifest['layers']}, d_model "
        f"{manifest['d_model']}, {len(manifest['shards'])} shards ({manifest['dtype']})"
        + (f", {deleted} deleted after training read them" if deleted else "")
    )
    return 0
