"""Every GPU figure the project lacks, in one run of under 8 minutes: `make bench-gpu`.

    python benchmarks/bench_gpu.py [--toy] [--budget-s 420] [--out benchmarks/out/gpu.md]

On the default JAX device (a GPU when one is there: check `python -c "import jax;
print(jax.devices())"`), through the trainer's own compiled step (`jax_sae.training.engine`):

1. the matmul roofline: the FLOP/s of a bare [B, d] x [d, F] matmul in bfloat16 and float32;
2. tokens/s of every variant at d 2304 with F 16384 and 65536, in float32 and bfloat16, with the
   fraction of that roofline the step reaches (a step's matmul work counted as 10 B d F FLOPs, the
   dense reference step: encoder and decoder forward, their weight gradients, and the gradient
   into the codes) and the device's peak memory so far;
3. the sparse TopK path against `dense=true`;
4. a vmapped sweep of N = 1, 4, 8 standard SAEs: step time against N single steps;
5. streaming on against off: `train.py` on the tiny model (`models/tiny-gemma2`, carried or made
   by `make tiny-model`) extracting while training, against training on the finished cache.

Measurements run in order of importance and stop when --budget-s is spent; the rest are listed as
skipped, so the script always finishes with a table. It writes the markdown section for
benchmarks/RESULTS.md (device name, command, date) to --out and prints it. `--toy` runs the same
code at toy sizes on any device, as the test suite does.
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jax_sae.model.defaults import adapt_hparams  # noqa: E402
from jax_sae.model.variants import VARIANTS, make_variant  # noqa: E402
from jax_sae.training.engine import initial_state, make_engine, stack_members  # noqa: E402

TINY_MODEL = REPO / "models" / "tiny-gemma2"
RUN_LINE = (
    'make setup && .venv/bin/pip install "jax[cuda13]>=0.6,<0.12" && make tiny-model '
    "&& make bench-gpu"
)


@dataclass(frozen=True)
class Sizes:
    d: int
    widths: tuple[int, ...]
    batch: int
    steps: int  # timed steps per measurement (after one compiling step)
    sweep_width: int
    stream_tokens: int


FULL = Sizes(d=2304, widths=(16384, 65536), batch=4096, steps=10, sweep_width=16384,
             stream_tokens=262144)  # fmt: skip
TOY = Sizes(d=64, widths=(256,), batch=256, steps=2, sweep_width=256, stream_tokens=8192)
DTYPES = ("bfloat16", "float32")
RUN_TOKENS = 10_000_000  # the run whose adapted defaults the steps use
SWEEP_SIZES = (1, 4, 8)


class Budget:
    """Wall-clock budget: a measurement starts only while time is left."""

    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds

    def left(self) -> bool:
        return time.perf_counter() < self.end


def timed(step: Callable[[], object], steps: int) -> float:
    """Median seconds of `steps` calls after one untimed (compiling) call; results fetched."""
    jax.block_until_ready(step())
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(step())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_flops(batch: int, d: int, width: int, dtype: str, steps: int) -> float:
    """FLOP/s of one [batch, d] x [d, width] matmul in `dtype`."""
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (batch, d), dtype=dtype)
    b = jax.random.normal(key_b, (d, width), dtype=dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    return 2 * batch * d * width / timed(lambda: matmul(a, b), steps)


def peak_memory_gb() -> float | None:
    """The device's peak bytes in use so far (None where the backend does not report it)."""
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def adapted(name: str, width: int, sizes: Sizes, given: dict) -> dict:
    """The hyper-parameters a 10M-token run of these sizes trains with (`make train`'s adaptive
    defaults: k-like sizes follow d_in), `given` on top. The measured steps are that run's early
    steps: no latent is dead yet, so AuxK is idle (it selects over dead latents only)."""
    steps = max(sizes.steps + 1, RUN_TOKENS // sizes.batch)
    return (
        adapt_hparams(
            name, sizes.d, steps=steps, batch_size=sizes.batch, overrides=given, d_sae=width
        ).overrides
        | given
    )


def step_seconds(names: list[str], width: int, dtype: str, sizes: Sizes, **hparams) -> float:
    """Seconds per step of one engine over the variants `names` (several: a vmapped sweep)."""
    variants = [make_variant(name, sizes.d, width, **adapted(name, width, sizes, hparams))
                for name in names]  # fmt: skip
    vmapped = len(variants) > 1
    engine = make_engine(variants, sizes.steps + 1, dtype, vmapped)
    states = [initial_state(v, i, sizes.steps + 1, None) for i, v in enumerate(variants)]
    state = stack_members(states, vmapped)
    rng = np.random.default_rng(0)
    batch = {
        "x": jnp.asarray(rng.normal(size=(sizes.batch, sizes.d)).astype(np.float32)),
        "x_prev": jnp.asarray(rng.normal(size=(sizes.batch, sizes.d)).astype(np.float32)),
        "seq_start": jnp.asarray(rng.random(sizes.batch) < 1 / 128),
    }
    batch = {key: batch[key] for key in variants[0].batch_keys}
    holder = {"state": state, "step": 0}

    def one() -> object:
        holder["state"], metrics = engine.step(holder["state"], batch, jnp.int32(holder["step"]))
        holder["step"] += 1
        return metrics["loss"]

    return timed(one, sizes.steps)


def stream_tokens_per_s(stream: bool, sizes: Sizes, tmp: Path) -> float:
    """Training tokens/s of `train.py` on the tiny model, extracting while training (`stream`)
    or reading a finished cache of the same tokens."""
    cache = tmp / ("stream" if stream else "cache")
    corpus = TINY_MODEL / "stdlib_docstrings.jsonl"
    extract = ["--model", str(TINY_MODEL), "--dataset", str(corpus), "--layers", "1",
               "--tokens", str(sizes.stream_tokens), "--ctx-len", "128",
               "--shard-tokens", str(sizes.stream_tokens // 8)]  # fmt: skip
    if not stream:
        subprocess.run([sys.executable, "-m", "extract", *extract, "--out", str(cache)],
                       cwd=REPO, check=True, capture_output=True)  # fmt: skip
    heldout = sizes.stream_tokens // 8
    trained = sizes.stream_tokens // 2  # the stream ends short of --tokens at a document's end
    argv = [sys.executable, "train.py", "--cache", str(cache), "--layer", "1",
            "--variant", "topk", "--tokens", str(trained), "--eval-tokens", str(heldout),
            "--batch-size", str(sizes.batch), "--out", str(tmp / "run"),
            "--set", "d_sae=512"]  # fmt: skip
    if stream:
        argv.append("--stream=" + " ".join(extract))
    shutil.rmtree(tmp / "run", ignore_errors=True)
    start = time.perf_counter()
    subprocess.run(argv, cwd=REPO, check=True, capture_output=True)
    return trained / (time.perf_counter() - start)


@dataclass
class Report:
    sizes: Sizes
    budget: Budget
    sections: dict[str, list[str]]
    skipped: list[str]

    def run(self, section: str, label: str, measure: Callable[[], str]) -> None:
        """Add one table row from `measure` (its cells after the label), or note it skipped."""
        if not self.budget.left():
            self.skipped.append(f"{section}: {label}")
            return
        print(f"{section}: {label}", file=sys.stderr, flush=True)
        try:
            cells = measure()
        except Exception as error:  # noqa: BLE001 - e.g. out of memory: recorded, the rest runs
            first = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
            cells = f"failed: {first}"
        self.sections[section].append(f"| {label} | {cells} |")


HEADERS = {
    "roofline": "| matmul [B, d] x [d, F] | TFLOP/s |\n|---|---|",
    "variants": "| variant, F, dtype | s/step | tokens/s | fraction of the matmul roofline | "
    "peak device memory so far (GB) |\n|---|---|---|---|---|",
    "sparse": "| topk, F (bfloat16) | sparse s/step | dense s/step | dense / sparse |"
    "\n|---|---|---|---|",
    "sweeps": "| standard, F, members N (bfloat16) | s/step | N x single step | ratio |"
    "\n|---|---|---|---|",
    "streaming": "| tiny model, topk | tokens/s |\n|---|---|",
}
Row = tuple[str, str, Callable[[], str]]  # section, label, the row's cells


def variant_row(sizes: Sizes, roofline: dict, name: str, width: int, dtype: str) -> Row:
    def cells() -> str:
        seconds = step_seconds([name], width, dtype, sizes)
        fraction = 10 * sizes.batch * sizes.d * width / seconds / roofline.get(dtype, np.nan)
        peak = peak_memory_gb()
        memory = "n/a" if peak is None else f"{peak:.1f}"
        return f"{seconds:.4f} | {sizes.batch / seconds:,.0f} | {fraction:.2f} | {memory}"

    return "variants", f"{name}, F {width}, {dtype}", cells


def sweep_row(sizes: Sizes, members: int, single_s: dict[str, float]) -> Row:
    """`single_s` holds the single step's time, measured once for every N."""

    def cells() -> str:
        if "standard" not in single_s:
            single_s["standard"] = step_seconds(["standard"], sizes.sweep_width, "bfloat16", sizes)
        single = single_s["standard"]
        seconds = step_seconds(["standard"] * members, sizes.sweep_width, "bfloat16", sizes)
        return f"{seconds:.4f} | {members * single:.4f} | {seconds / (members * single):.2f}"

    return "sweeps", f"F {sizes.sweep_width}, N {members}", cells


def sparse_row(sizes: Sizes, width: int) -> Row:
    def cells() -> str:
        sparse = step_seconds(["topk"], width, "bfloat16", sizes)
        dense = step_seconds(["topk"], width, "bfloat16", sizes, dense=True)
        return f"{sparse:.4f} | {dense:.4f} | {dense / sparse:.2f}"

    return "sparse", f"F {width}", cells


def stream_row(sizes: Sizes, tmp: Path, stream: bool) -> Row:
    label = "streaming (extract while training)" if stream else "from a finished cache"
    return "streaming", label, lambda: f"{stream_tokens_per_s(stream, sizes, tmp):,.0f}"


def roofline_row(sizes: Sizes, roofline: dict, dtype: str) -> Row:
    width = sizes.widths[0]

    def cells() -> str:
        roofline[dtype] = matmul_flops(sizes.batch, sizes.d, width, dtype, sizes.steps)
        return f"{roofline[dtype] / 1e12:.3f}"

    return "roofline", f"B {sizes.batch}, d {sizes.d}, F {width}, {dtype}", cells


def plan(sizes: Sizes, tmp: Path) -> list[Row]:
    """Every measurement, most important first: the budget cuts from the end."""
    roofline: dict[str, float] = {}
    first, rest = sizes.widths[0], sizes.widths[1:]
    rows = [roofline_row(sizes, roofline, dtype) for dtype in DTYPES]
    rows += [variant_row(sizes, roofline, name, first, "bfloat16") for name in VARIANTS]
    single_s: dict[str, float] = {}
    rows += [sweep_row(sizes, n, single_s) for n in SWEEP_SIZES]
    rows += [sparse_row(sizes, width) for width in sizes.widths]
    rows += [variant_row(sizes, roofline, name, first, "float32") for name in VARIANTS]
    rows += [variant_row(sizes, roofline, name, width, dtype)
             for width in rest for dtype in DTYPES for name in VARIANTS]  # fmt: skip
    if (TINY_MODEL / "config.json").is_file():
        rows += [stream_row(sizes, tmp, stream) for stream in (False, True)]
    return rows


def markdown(report: Report, command: str) -> str:
    device = jax.devices()[0]
    parts = [
        f"## GPU figures: {device.device_kind} ({jax.default_backend()}, {jax.device_count()} "
        f"device(s))",
        "",
        f"Command: `{command}`, {datetime.date.today()}; jax {jax.__version__}; d "
        f"{report.sizes.d}, batch {report.sizes.batch}, median of {report.sizes.steps} steps after "
        "a compiling one. Fraction of the roofline: 10 B d F FLOPs per step (the dense reference "
        "step's matmuls) over the step time, against the bare matmul's rate in the same dtype.",
    ]
    for section, rows in report.sections.items():
        if rows:
            parts += ["", HEADERS[section], *rows]
    if report.skipped:
        parts += ["", "Skipped (time budget or missing input): " + "; ".join(report.skipped) + "."]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--toy", action="store_true", help="toy sizes (the test suite, any device)")
    p.add_argument("--budget-s", type=float, default=420.0, help="stop measuring after this")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "gpu.md")
    args = p.parse_args(argv)
    if jax.default_backend() == "cpu" and not args.toy:
        print(f"note: no GPU is visible to JAX; on a GPU machine run: {RUN_LINE}", file=sys.stderr)
    sizes = TOY if args.toy else FULL
    report = Report(sizes, Budget(args.budget_s), {key: [] for key in HEADERS}, [])
    tmp = Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    if not (TINY_MODEL / "config.json").is_file():
        report.skipped.append(f"streaming: no tiny model in {TINY_MODEL} (`make tiny-model`)")
    try:
        for section, label, cells in plan(sizes, tmp):
            report.run(section, label, cells)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    command = "python benchmarks/bench_gpu.py" + (" --toy" if args.toy else "")
    text = markdown(report, command)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
