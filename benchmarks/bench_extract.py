"""Extractor throughput vs the bare forward pass, and cache write bandwidth vs ``np.save``.

Both ratios come from one run on one machine. The model is a randomly initialised Gemma-2 of
hidden size 512 with 4 blocks (both the tokenizer and the corpus are the embedded offline ones):
big enough that compute dominates the per-batch Python overhead, so the throughput ratio says how
much the extractor's extra work (dataset reading, tokenisation, hooks, device-to-host copies,
dtype conversion, checksums, writing) costs on top of the forward pass it cannot avoid.

* bare forward: the same truncated base model (blocks 0..deepest layer) on the same pre-tokenised
  batches, inside ``torch.inference_mode``, nothing kept; timed before and after the extractor
  and averaged, so a change of machine load during the run does not bias the ratio.
* extractor: ``Extraction.run()`` end to end (model loading excluded) writing a real cache.
* write bandwidth: ``CacheWriter.write_shard`` (NaN check, checksums, statistics, fsync, manifest
  included) vs ``np.save`` of the same arrays with and without fsync, on shards of realistic size
  (64k tokens), measured alone so the forward pass does not compete for the CPU.

Usage: ``python benchmarks/bench_extract.py [--quick] [--tokens N] [--device cuda]``
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extract.extractor import (  # noqa: E402
    ExtractConfig,
    Extraction,
    token_batches,
)
from extract.sources import iter_texts  # noqa: E402
from extract.tiny_model import CORPUS_FILE, stdlib_docstrings, train_tokenizer, write_corpus  # noqa: E402
from jax_sae.data.cache import CacheWriter  # noqa: E402

OUT = Path(__file__).resolve().parent / "out" / "bench_extract"
MODEL = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, head_dim=64)  # fmt: skip
LAYERS = (1, 3)


def make_model_folder(path: Path) -> Path:
    """Random-init Gemma-2 + the embedded tokenizer + corpus, saved like a hub model."""
    if (path / "config.json").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    texts = stdlib_docstrings(max_chars=1_500_000)
    write_corpus(texts, path / CORPUS_FILE)
    tokenizer = train_tokenizer(texts, 4096)
    config = Gemma2Config(
        vocab_size=len(tokenizer), query_pre_attn_scalar=MODEL["head_dim"], sliding_window=64,
        pad_token_id=0, eos_token_id=1, bos_token_id=2, **MODEL,
    )  # fmt: skip
    torch.manual_seed(0)
    Gemma2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def bare_forward_seconds(extraction: Extraction, cfg: ExtractConfig) -> tuple[float, int]:
    """Time the truncated base model alone on the batches the extractor will see."""
    texts = iter_texts(extraction.dataset)
    batches, n_kept = [], 0
    for batch in token_batches(texts, extraction.tokenizer, cfg, extraction.drop_ids):
        batches.append(batch)
        n_kept += int(batch.keep.sum())
        if n_kept >= cfg.tokens:
            break
    device = extraction.device
    with torch.inference_mode():
        extraction.forward(input_ids=batches[0].input_ids.to(device), use_cache=False)  # warm-up
        _sync(device)
        started = time.perf_counter()
        for b in batches:
            extraction.forward(
                input_ids=b.input_ids.to(device, non_blocking=True),
                attention_mask=b.attention_mask.to(device, non_blocking=True),
                use_cache=False,
            )
        _sync(device)
    return time.perf_counter() - started, min(n_kept, cfg.tokens)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def extraction_seconds(cfg: ExtractConfig) -> float:
    """Seconds of ``Extraction.run()`` (model loading excluded), writing a fresh cache."""
    shutil.rmtree(cfg.out, ignore_errors=True)
    extraction = Extraction(cfg)
    started = time.perf_counter()
    extraction.run()
    return time.perf_counter() - started


def write_seconds(path: Path, n_shards: int, shard_tokens: int) -> tuple[dict[str, float], int]:
    """Write the same shards (random bfloat16 rows of the benchmark model's width, 2 layers)
    through ``CacheWriter`` and with plain ``np.save``, with and without fsync, alone on the
    CPU. Returns seconds per method and the bytes written."""
    rng = np.random.default_rng(0)
    shards = []
    for _ in range(n_shards):
        acts = {
            layer: rng.standard_normal((shard_tokens, MODEL["hidden_size"]), np.float32).astype(
                ml_dtypes.bfloat16
            )
            for layer in LAYERS
        }
        tokens = rng.integers(0, 4096, shard_tokens, dtype=np.int32)
        positions = np.tile(np.arange(1, 129, dtype=np.int32), shard_tokens // 128 + 1)
        shards.append((acts, tokens, positions[:shard_tokens]))
    arrays = [a for acts, tokens, positions in shards for a in (*acts.values(), tokens, positions)]
    shutil.rmtree(path, ignore_errors=True)
    started = time.perf_counter()
    writer = CacheWriter(
        path, layers=list(LAYERS), d_model=MODEL["hidden_size"], dtype="bfloat16",
        settings={}, metadata={},
    )  # fmt: skip
    for acts, tokens, positions in shards:
        writer.write_shard(acts, tokens, positions, n_sequences=shard_tokens // 128)
    seconds = {"CacheWriter": time.perf_counter() - started}
    for fsync in (False, True):
        shutil.rmtree(path)
        path.mkdir()
        started = time.perf_counter()
        for i, array in enumerate(arrays):
            with open(path / f"{i}.npy", "wb") as f:
                np.save(f, array)
                if fsync:
                    f.flush()
                    os.fsync(f.fileno())
        seconds["np.save + fsync" if fsync else "np.save"] = time.perf_counter() - started
    shutil.rmtree(path)
    return seconds, sum(a.nbytes for a in arrays)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens (a smoke run)")
    parser.add_argument("--tokens", type=int, help="tokens per measurement")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    tokens = args.tokens or (4_000 if args.quick else 30_000)

    model = make_model_folder(OUT / "model")
    cfg = ExtractConfig(
        model=str(model), dataset=(str(model / CORPUS_FILE),), layers=LAYERS, tokens=tokens,
        ctx_len=128, batch_size=args.batch_size, shard_tokens=max(1024, tokens // 8),
        device=args.device, out=OUT / "cache", progress=False,
    )  # fmt: skip
    extraction = Extraction(cfg)
    # bare forward before and after the extractor: their mean cancels a drift of machine load
    before_s, bare_tokens = bare_forward_seconds(extraction, cfg)
    extract_s = extraction_seconds(cfg)
    after_s, _ = bare_forward_seconds(extraction, cfg)
    shard_tokens, n_shards = (16_384, 2) if args.quick else (65_536, 4)
    writes, n_bytes = write_seconds(OUT / "write", n_shards, shard_tokens)

    bare = bare_tokens / ((before_s + after_s) / 2)
    ext, mb = tokens / extract_s, n_bytes / 1e6
    print(
        f"\nGemma-2 random init, hidden {MODEL['hidden_size']}, {MODEL['num_hidden_layers']} "
        f"blocks, layers {list(LAYERS)}, ctx 128, batch {args.batch_size}, {tokens} tokens, "
        f"device {extraction.device}, torch threads {torch.get_num_threads()}, "
        f"storage bfloat16; writes: {n_shards} shards x {shard_tokens} tokens x 2 layers "
        f"({mb:.0f} MB)\n"
    )
    rows = [("throughput (tokens/s) vs bare forward", ext, bare)]
    ours = mb / writes["CacheWriter"]
    for name in ("np.save", "np.save + fsync"):
        rows.append((f"cache write (MB/s) vs {name}", ours, mb / writes[name]))
    print("| measure | extractor | baseline | ratio |")
    print("|---|---|---|---|")
    for name, value, baseline in rows:
        print(f"| {name} | {value:,.0f} | {baseline:,.0f} | {value / baseline:.2f} |")
    print(
        f"\nbare forward: {bare_tokens / before_s:,.0f} tokens/s before, "
        f"{bare_tokens / after_s:,.0f} after the extractor run"
    )


if __name__ == "__main__":
    main()
