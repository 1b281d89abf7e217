"""Host-side cost of a multi-host process keeping only its rows of each batch.

    python benchmarks/bench_rows.py [--d 768] [--batch 4096] [--batches 40] [--rounds 3]

Times ``Loader.storage_batches`` (reading chunks into the host buffer and assembling batches in
the storage dtype, as every step does) for the whole batch and for the rows of one of 2 and of
4 processes, interleaved, on a synthetic bfloat16 cache; medians of seconds per batch.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_verify import write_cache  # noqa: E402
from jax_sae.data.cache import ActivationCache  # noqa: E402
from jax_sae.data.loader import Loader  # noqa: E402


def seconds_per_batch(cache: Path, batch: int, batches: int, rows: slice | None) -> float:
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # required with rows; unused
    loader = Loader(ActivationCache(cache), 0, batch_size=batch, rows=rows, sharding=sharding)
    start = time.perf_counter()
    for _ in itertools.islice(loader.storage_batches(0), batches):
        pass
    return (time.perf_counter() - start) / batches


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_rows_"))
    try:
        cache = write_cache(tmp / "cache", args.d, args.batch * args.batches)
        cases = {"whole batch": None}
        cases |= {f"1 of {n} processes": slice(0, args.batch // n) for n in (2, 4)}
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, rows in cases.items():
                times[name].append(seconds_per_batch(cache, args.batch, args.batches, rows))
        whole = statistics.median(times["whole batch"])
        print(f"d_in {args.d}, batch {args.batch}, bfloat16, {args.batches} batches, medians of")
        print(f"{args.rounds} interleaved rounds\n")
        print("| rows kept | ms per batch | vs whole batch |")
        print("|---|---|---|")
        for name, values in times.items():
            ms = 1000 * statistics.median(values)
            print(f"| {name} | {ms:.2f} | {ms / 1000 / whole:.2f} |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
