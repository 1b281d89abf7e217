"""jax_sae against SAELens, sparsify and dictionary_learning, side by side (`make bench-peers`).

    python benchmarks/bench_peers.py --peers-python .venv-peers/bin/python [--quick] [--json F]

The peers run in their own virtual environment (.venv-peers) in a worker process
(`benchmarks/peers_worker.py`), each through its own training code; this process runs ours. Both
use all cores, and only one of them works at a time: each round runs one step of every contender
in turn (interleaved), so a busy moment of the machine hits all of them; tables give medians over
the rounds and per-pair ratios (peer time / our time, > 1 means we are faster). First steps (jit
compilation, lazy initialisation) are excluded.

1. TopK step at d_in 768, F 12288, k 32, batch 2048, float32: ours (sparse path, the default),
   ours with `dense=True`, and the three peers; then the same at k 64, F 32768.
2. Step time against F at fixed k 32: ours sparse and dense, sparsify, and the floor of the sparse
   path (the dense encoder forward + top-k alone).
3. `standard` (ReLU + L1) and `jumprelu` steps against SAELens and dictionary_learning.
4. Quality: every TopK trainer on the same synthetic activations with the same lr, warm-up, k and
   steps; held-out explained variance, L0 and dead fraction (latents that fire on no held-out
   token). Ours with and without `grad_clip_norm=1.0` (the peers' clipping).
5. SAELens `use_sparse_activations=True`: one step, and what happens.
6. The grid (`grid`): ours against sparsify over F (4096 .. 65536) x k (32 .. 320) at d_in 768 and
   2304, beside the floor of a step, the dense encoder forward matmul alone; and where the time of
   our step goes (`step_parts`) at the corners of the grid.

Data: a synthetic sparse-dictionary world (`synthetic_batch`), written once to .npy files that
both processes read.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jax_sae.model.activations import topk  # noqa: E402
from jax_sae.model.architectures import matmul  # noqa: E402
from jax_sae.model.variants import make_variant  # noqa: E402
from jax_sae.training.optim import make_optimizer  # noqa: E402
from jax_sae.training.step import make_train_step  # noqa: E402

PEERS = ("saelens", "dictionary_learning", "sparsify")
FULL = {
    "d": 768,
    "F": 12288,
    "k": 32,
    "big": (64, 32768),
    "F_sweep": (4096, 8192, 16384, 32768),
    "B": 2048,
    "rounds": 5,
    "sweep_rounds": 3,
    "quality": {"d": 128, "F": 2048, "k": 16, "steps": 400, "lr": 3e-3, "warmup": 40},
    "grid": {"d": (768, 2304), "F": (4096, 16384, 65536), "k": (32, 64, 320), "B": 1024},
    "grid_rounds": 3,
}
QUICK = {
    "d": 64,
    "F": 512,
    "k": 8,
    "big": (16, 1024),
    "F_sweep": (256, 1024),
    "B": 256,
    "rounds": 3,
    "sweep_rounds": 2,
    "quality": {"d": 32, "F": 256, "k": 8, "steps": 30, "lr": 3e-3, "warmup": 3},
    "grid": {"d": (32,), "F": (256, 1024), "k": (8, 16), "B": 128},
    "grid_rounds": 2,
}
SPEED_LR, SPEED_WARMUP, SPEED_RUN_STEPS = 1e-4, 10, 100_000


def synthetic_batch(rng: np.random.Generator, atoms: np.ndarray, size: int) -> np.ndarray:
    """Tokens = sums of 24 of `atoms` (power-law frequencies, log-normal magnitudes) + noise,
    scaled so E||x||^2 = d (the project's default input normalisation)."""
    n_atoms, d = atoms.shape
    freq = 1.0 / np.arange(1, n_atoms + 1) ** 0.7
    chosen = rng.choice(n_atoms, size=(size, 24), p=freq / freq.sum())
    magnitude = rng.lognormal(0.0, 0.5, size=(size, 24))
    x = np.einsum("ba,bad->bd", magnitude, atoms[chosen]) + 0.05 * rng.normal(size=(size, d))
    expected_sq_norm = 24 * np.exp(0.5) + 0.05**2 * d  # E m^2 = e^(2 sigma^2), log-normal
    return (x * np.sqrt(d / expected_sq_norm)).astype(np.float32)


def write_data(folder: Path, name: str, d: int, n_tokens: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    atoms = rng.normal(size=(8 * d, d))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    path = folder / f"{name}.npy"
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n_tokens, d))
    for start in range(0, n_tokens, 8192):
        out[start : start + 8192] = synthetic_batch(rng, atoms, min(8192, n_tokens - start))
    out.flush()
    return str(path)


# ------------------------------------------------------------------------------ contenders


class Ours:
    """Our real jitted train step (`make_train_step`) on the same batches."""

    def __init__(self, variant: str, cfg: dict, lr: float, warmup: int, **hparams) -> None:
        clip = hparams.pop("grad_clip_norm", None)
        hp = {"lr": lr, "warmup_steps": warmup, **hparams}
        if variant == "topk":
            hp["k"] = cfg["k"]
        self.variant = make_variant(variant, cfg["d"], cfg["F"], **hp)
        opt = make_optimizer(lr=lr, warmup_steps=warmup, grad_clip_norm=clip)
        self.step_fn = make_train_step(self.variant, opt)
        self.batch_size, self.data = cfg["B"], {}
        self.params, self.opt = None, opt

    def _array(self, path: str) -> np.ndarray:
        if path not in self.data:
            self.data[path] = np.load(path, mmap_mode="r")
        return self.data[path]

    def step(self, path: str, index: int) -> float:
        array, b = self._array(path), self.batch_size
        i = index % (len(array) // b)
        x = jax.device_put(np.array(array[i * b : (i + 1) * b]))
        if self.params is None:  # TopK family: b_dec = geometric median of the first batch
            self.params = self.variant.init_params(jax.random.key(0), np.asarray(x[:1024]))
            self.opt_state, self.state = self.opt.init(self.params), self.variant.init_state()
        start = time.perf_counter()
        self.params, self.opt_state, self.state, metrics = self.step_fn(
            self.params, self.opt_state, self.state, {"x": x}, jnp.int32(index)
        )
        jax.block_until_ready((self.params, metrics))
        return time.perf_counter() - start

    def evaluate(self, path: str) -> dict:
        x = jnp.asarray(np.array(self._array(path)))
        h = self.variant.encode(self.params, x)
        x_hat = self.variant.decode(self.params, h)
        residual = jnp.sum((x - x_hat) ** 2)
        return {
            "explained_variance": float(1 - residual / jnp.sum((x - x.mean(0)) ** 2)),
            "l0": float(jnp.mean(jnp.sum(h > 0, axis=1))),
            "dead_frac": float(jnp.mean(jnp.sum(h > 0, axis=0) == 0)),
        }


class Worker:
    """The peers' process; one JSON line per request."""

    def __init__(self, python: str, log: Path) -> None:
        worker = Path(__file__).resolve().parent / "peers_worker.py"
        self.log = open(log, "w")  # noqa: SIM115 - lives as long as the worker
        self.proc = subprocess.Popen(
            [python, str(worker)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self.log, text=True, bufsize=1,
        )  # fmt: skip

    def request(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"peer worker died; see {self.log.name}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply


class Peer:
    def __init__(self, worker: Worker, lib: str, variant: str, cfg: dict, lr, warmup, steps):
        self.worker, self.batch_size = worker, cfg["B"]
        spec = {"d": cfg["d"], "F": cfg["F"], "k": cfg["k"], "lr": lr, "warmup": warmup}
        spec |= {"steps": steps, "batch": cfg["B"], "seed": 0}
        self.id = worker.request(cmd="build", lib=lib, variant=variant, **spec)["id"]

    def step(self, path: str, index: int) -> float:
        reply = self.worker.request(
            cmd="step", id=self.id, data=path, batch=self.batch_size, index=index
        )
        return reply["seconds"]

    def evaluate(self, path: str) -> dict:
        return self.worker.request(cmd="eval", id=self.id, data=path)

    def close(self) -> None:
        self.worker.request(cmd="free", id=self.id)


# ------------------------------------------------------------------------------ measuring


def interleaved(builders: dict[str, Callable[[], object]], path: str, rounds: int) -> dict:
    """Median step seconds per contender (None + the error where one fails), all rounds."""
    contenders, errors = {}, {}
    for name, build in builders.items():
        try:
            contenders[name] = build()
            contenders[name].step(path, 0)  # compile / lazy init, not timed
        except Exception as error:  # a failing peer is recorded, not fatal
            errors[name] = f"{type(error).__name__}: {error}"
            print(f"  {name} failed: {errors[name]}", file=sys.stderr)
    print(f"  timing {', '.join(contenders)}", file=sys.stderr, flush=True)
    times = {name: [] for name in contenders}
    for r in range(rounds):
        for name, contender in contenders.items():
            times[name].append(contender.step(path, r + 1))
    for contender in contenders.values():
        if isinstance(contender, Peer):
            contender.close()
    return {
        name: {"median": statistics.median(times[name]), "all": times[name]}
        if name in times
        else {"median": None, "error": errors[name]}
        for name in builders
    }


def floor_seconds(cfg: dict, path: str, rounds: int) -> float:
    """The sparse path's floor: the dense encoder forward and the top-k, jitted alone."""
    w = jax.random.normal(jax.random.key(0), (cfg["d"], cfg["F"]))
    x = jnp.asarray(np.array(np.load(path, mmap_mode="r")[: cfg["B"]]))
    fn = jax.jit(lambda x, w: topk(matmul(x, w, jnp.float32), cfg["k"]))
    return _median_seconds(fn, (x, w), rounds)


def matmul_floor_seconds(cfg: dict, path: str, rounds: int) -> float:
    """The floor of any step at these sizes: the dense encoder forward [B, d] x [d, F] alone."""
    w = jax.random.normal(jax.random.key(0), (cfg["d"], cfg["F"]))
    x = jnp.asarray(np.array(np.load(path, mmap_mode="r")[: cfg["B"]]))
    return _median_seconds(jax.jit(lambda x, w: matmul(x, w, jnp.float32)), (x, w), rounds)


def _median_seconds(fn: Callable, args: tuple, rounds: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_parts(cfg: dict, path: str, rounds: int) -> dict[str, float]:
    """Where our TopK step's time goes, each part jitted and timed alone (cumulative): the
    encoder matmul, + the top-k, the loss forward, + its gradient, + Adam (the whole step); and
    the optimizer update alone (projection, Adam, renormalisation) on one gradient."""
    ours = Ours("topk", cfg, SPEED_LR, SPEED_WARMUP)
    ours.step(path, 0)
    x = jnp.asarray(np.array(np.load(path, mmap_mode="r")[: cfg["B"]]))
    params, state, v = ours.params, ours.state, ours.variant
    w = params["W_enc"]
    step = jnp.int32(1)

    def loss(p):
        return v.loss(p, state, {"x": x}, step)[0]

    parts = {
        "encoder matmul": jax.jit(lambda x, w: matmul(x, w, jnp.float32)),
        "+ top-k": jax.jit(lambda x, w: topk(matmul(x, w, jnp.float32), cfg["k"])),
        "loss forward": jax.jit(loss),
        "loss + gradient": jax.jit(jax.grad(loss)),
    }
    args = {"encoder matmul": (x, w), "+ top-k": (x, w)}
    out = {
        name: _median_seconds(fn, args.get(name, (params,)), rounds) for name, fn in parts.items()
    }
    grads = jax.jit(jax.grad(loss))(params)

    def update(params, opt_state):
        updates, opt_state = ours.opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    optimizer = _median_seconds(jax.jit(update), (params, ours.opt_state), rounds)
    whole = [ours.step(path, i + 1) for i in range(rounds)]  # donates `params`: last
    return out | {
        "whole step (+ Adam, projection)": statistics.median(whole),
        "optimizer alone": optimizer,
    }


def top_ops(cfg: dict, path: str, steps: int = 2, top: int = 8) -> list[tuple[str, float]]:
    """The compiled ops of our TopK step that take the most time, ms per step, from a
    `jax.profiler` trace of `steps` steps after two untimed ones (names as XLA gives them:
    a `ynn_fusion` is a matmul, a `multiply_add_fusion` an elementwise loop, `wrapped_broadcast`
    an array filled with a constant; host-side events are left out)."""
    ours = Ours("topk", cfg, SPEED_LR, SPEED_WARMUP)
    for index in range(2):
        ours.step(path, index)
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        for index in range(2, 2 + steps):
            ours.step(path, index)
        jax.profiler.stop_trace()
        (trace,) = Path(trace_dir).rglob("*.trace.json.gz")
        events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    total: dict[str, float] = {}
    for event in events:
        name = event.get("name", "")
        is_op = re.fullmatch(r"[a-z][\w-]*\.\d+|[a-z][\w-]*_fusion", name) is not None
        if event.get("ph") == "X" and "dur" in event and is_op:
            total[name] = total.get(name, 0.0) + event["dur"] / 1e3 / steps
    return sorted(total.items(), key=lambda item: -item[1])[:top]


def grid(worker, cfg: dict, folder: Path, out: dict) -> str:
    """Ours (sparse, the default) against sparsify at every (d, F, k) of the grid, interleaved
    per point, beside the matmul floor; then `step_parts` at the grid's corners."""
    g = cfg["grid"]
    rounds = cfg["grid_rounds"]
    rows = [
        "| d_in | F | k | ours s/step | sparsify s/step | floor (encoder matmul) | sparsify / ours "
        "| ours / floor |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for d in g["d"]:
        path = write_data(folder, f"grid_{d}", d, 4 * g["B"], seed=4)
        for F in g["F"]:
            for k in g["k"]:
                c = {"d": d, "F": F, "k": k, "B": g["B"]}
                print(f"grid d {d} F {F} k {k}", file=sys.stderr, flush=True)
                result = interleaved(topk_builders(worker, c, ("sparsify",), dense=False), path,
                                     rounds)  # fmt: skip
                floor = matmul_floor_seconds(c, path, rounds)
                out[f"grid_d{d}_F{F}_k{k}"] = result | {"floor": floor}
                ours, peer = (result[name]["median"] for name in result)
                peer_text = "failed" if peer is None else f"{peer:.3f}"
                ratio = "" if peer is None else f"{peer / ours:.2f}"
                rows.append(f"| {d} | {F} | {k} | {ours:.3f} | {peer_text} | {floor:.3f} "
                            f"| {ratio} | {ours / floor:.2f} |")  # fmt: skip
    report = [f"#### TopK grid, batch {g['B']}, float32 ({rounds} rounds per point)", "", *rows]
    corners = [
        (d, F, k) for d in g["d"] for F in (g["F"][0], g["F"][-1]) for k in (g["k"][0], g["k"][-1])
    ]  # noqa: E501
    report += ["", "#### Where our step's time goes (s, each part jitted alone, cumulative)", ""]
    names: list[str] = []
    for d, F, k in corners:
        c = {"d": d, "F": F, "k": k, "B": g["B"]}
        parts = step_parts(c, str(folder / f"grid_{d}.npy"), rounds)
        out[f"parts_d{d}_F{F}_k{k}"] = parts
        if not names:
            names = list(parts)
            report += [
                "| d_in | F | k | " + " | ".join(names) + " |",
                "|---" * (3 + len(names)) + "|",
            ]
        report.append(f"| {d} | {F} | {k} | " + " | ".join(f"{parts[n]:.3f}" for n in names) + " |")
    d, F, k = g["d"][-1], g["F"][-1], g["k"][1 if len(g["k"]) > 1 else 0]
    ops = top_ops({"d": d, "F": F, "k": k, "B": g["B"]}, str(folder / f"grid_{d}.npy"))
    out[f"top_ops_d{d}_F{F}_k{k}"] = ops
    report += ["", f"#### Top ops of our step, d_in {d}, F {F}, k {k} (ms per step)", ""]
    report += ["| op | ms |", "|---|---|", *(f"| `{name}` | {ms:.0f} |" for name, ms in ops)]
    return "\n".join(report) + "\n"


def table(title: str, result: dict, base: str) -> str:
    """Medians, the ratio of medians, and the median of the per-round ratios (same round)."""
    lines = [
        f"#### {title}",
        "",
        f"| contender | s/step (median) | / {base} | median per-round ratio |",
        "|---|---|---|---|",
    ]
    base_result = result[base]
    for name, r in result.items():
        if r["median"] is None:
            lines.append(f"| {name} | failed: {r['error']} | | |")
            continue
        pairs = zip(r["all"], base_result["all"], strict=True)
        per_round = statistics.median(a / b for a, b in pairs)
        ratio = r["median"] / base_result["median"]
        lines.append(f"| {name} | {r['median']:.3f} | {ratio:.2f} | {per_round:.2f} |")
    return "\n".join(lines) + "\n"


def topk_builders(worker, cfg: dict, peers: tuple[str, ...], dense: bool = True) -> dict:
    builders = {"jax_sae topk (sparse)": lambda: Ours("topk", cfg, SPEED_LR, SPEED_WARMUP)}
    if dense:
        builders["jax_sae topk (dense)"] = lambda: Ours(
            "topk", cfg, SPEED_LR, SPEED_WARMUP, dense=True
        )
    for lib in peers:
        builders[lib] = lambda lib=lib: Peer(
            worker, lib, "topk", cfg, SPEED_LR, SPEED_WARMUP, SPEED_RUN_STEPS
        )
    return builders


def speed(worker, cfg: dict, folder: Path, out: dict) -> list[str]:
    report = []
    path = write_data(folder, f"speed_{cfg['d']}", cfg["d"], 4 * cfg["B"], seed=1)
    k_big, f_big = cfg["big"]
    for k, F in ((cfg["k"], cfg["F"]), (k_big, f_big)):
        c = cfg | {"k": k, "F": F}
        result = interleaved(topk_builders(worker, c, PEERS), path, cfg["rounds"])
        out[f"topk_k{k}_F{F}"] = result
        title = f"TopK step, d_in {c['d']}, F {F}, k {k}, batch {c['B']}, float32"
        report.append(table(title, result, "jax_sae topk (sparse)"))

    rows = ["| F | ours sparse | ours dense | sparsify | floor (encoder + top-k) | sparse / floor "
            "| sparsify / ours sparse |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for F in cfg["F_sweep"]:
        c = cfg | {"F": F}
        result = interleaved(topk_builders(worker, c, ("sparsify",)), path, cfg["sweep_rounds"])
        floor = floor_seconds(c, path, cfg["sweep_rounds"])
        out[f"sweep_F{F}"] = result | {"floor": floor}
        s, dn, sp = (result[n]["median"] for n in list(result))
        sp_text = "failed" if sp is None else f"{sp:.3f}"
        ratio = "" if sp is None else f"{sp / s:.2f}"
        rows.append(f"| {F} | {s:.3f} | {dn:.3f} | {sp_text} | {floor:.3f} | {s / floor:.2f} "
                    f"| {ratio} |")  # fmt: skip
    title = f"#### Step time (s) vs F, k {cfg['k']}, d_in {cfg['d']}"
    report.append(title + "\n\n" + "\n".join(rows) + "\n")

    for variant in ("standard", "jumprelu"):
        builders = {f"jax_sae {variant}": lambda v=variant: Ours(v, cfg, SPEED_LR, SPEED_WARMUP)}
        for lib in ("saelens", "dictionary_learning"):
            builders[lib] = lambda lib=lib, v=variant: Peer(
                worker, lib, v, cfg, SPEED_LR, SPEED_WARMUP, SPEED_RUN_STEPS
            )
        result = interleaved(builders, path, cfg["rounds"])
        out[variant] = result
        title = f"{variant} step, d_in {cfg['d']}, F {cfg['F']}, batch {cfg['B']}, float32"
        report.append(table(title, result, f"jax_sae {variant}"))
    return report


def quality(worker, cfg: dict, folder: Path, out: dict) -> str:
    q = cfg["quality"]
    c = {"d": q["d"], "F": q["F"], "k": q["k"], "B": cfg["B"]}
    train = write_data(folder, "quality_train", q["d"], q["steps"] * cfg["B"], seed=2)
    held_out = write_data(folder, "quality_heldout", q["d"], 16384, seed=3)
    run_tokens = q["steps"] * cfg["B"]
    lr, warmup = q["lr"], q["warmup"]
    # train.py shortens the dead-latent window to 10% of the run; the peers keep 10M tokens
    ours_hp = {"dead_tokens": run_tokens // 10}
    builders = {
        "jax_sae topk": lambda: Ours("topk", c, lr, warmup, **ours_hp),
        "jax_sae topk, grad_clip_norm 1.0": lambda: Ours(
            "topk", c, lr, warmup, grad_clip_norm=1.0, **ours_hp
        ),
        "jax_sae topk, dead window 10M": lambda: Ours("topk", c, lr, warmup),
        "jax_sae topk, dead window 10M, clip 1.0": lambda: Ours(
            "topk", c, lr, warmup, grad_clip_norm=1.0
        ),
    }
    for lib in PEERS:
        builders[lib] = lambda lib=lib: Peer(worker, lib, "topk", c, lr, warmup, q["steps"])
    lines = [
        f"#### Quality: TopK, d_in {q['d']}, F {q['F']}, k {q['k']}, {q['steps']} steps of "
        f"{cfg['B']}, lr {lr}, warm-up {warmup}; held-out 16,384 tokens",
        "",
        "| trainer | explained variance | L0 | dead fraction |",
        "|---|---|---|---|",
    ]
    for name, build in builders.items():
        try:
            contender = build()
            for step in range(q["steps"]):
                contender.step(train, step)
            metrics = contender.evaluate(held_out)
            if isinstance(contender, Peer):
                contender.close()
        except Exception as error:
            out[f"quality {name}"] = {"error": str(error)}
            lines.append(f"| {name} | failed: {error} | | |")
            continue
        out[f"quality {name}"] = metrics
        print(f"  quality {name}: {metrics}", file=sys.stderr, flush=True)
        lines.append(
            f"| {name} | {metrics['explained_variance']:.4f} | {metrics['l0']:.1f} "
            f"| {metrics['dead_frac']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def saelens_sparse_activations(worker, cfg: dict, folder: Path) -> str:
    c = {"d": cfg["d"], "F": cfg["F"], "k": cfg["k"], "B": cfg["B"]}
    path = str(folder / f"speed_{cfg['d']}.npy")
    try:
        peer = Peer(worker, "saelens", "topk_sparse", c, SPEED_LR, SPEED_WARMUP, SPEED_RUN_STEPS)
        seconds = peer.step(path, 0)
        return f"SAELens `use_sparse_activations=True`: one step ran ({seconds:.2f} s)."
    except RuntimeError as error:
        return f"SAELens `use_sparse_activations=True`: the step fails on CPU: `{error}`."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers-python", default=".venv-peers/bin/python")
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke run")
    parser.add_argument("--json", help="write all timings here")
    parser.add_argument("--skip", nargs="*", default=(), choices=("speed", "grid", "quality"))
    args = parser.parse_args()
    cfg = QUICK if args.quick else FULL
    started = time.time()
    out: dict = {"config": {key: value for key, value in cfg.items()}}
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(f"Machine: {machine}, backend {jax.default_backend()}, jax {jax.__version__}; {when}")
    print(f"Load average before: {os.getloadavg()}\n")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        worker = Worker(args.peers_python, folder / "peers.log")
        packages = ("torch", "sae-lens", "eai-sparsify", "dictionary-learning")
        code = f"import importlib.metadata as m; print([(p, m.version(p)) for p in {packages}])"
        versions = subprocess.run(
            [args.peers_python, "-c", code], capture_output=True, text=True
        ).stdout.strip()
        print(f"Peers: {versions}\n")
        report = []
        if "speed" not in args.skip:
            report += speed(worker, cfg, folder, out)
            report.append(saelens_sparse_activations(worker, cfg, folder))
        if "grid" not in args.skip:
            report.append(grid(worker, cfg, folder, out))
        if "quality" not in args.skip:
            report.append(quality(worker, cfg, folder, out))
        print("\n".join(report))
        worker.proc.stdin.close()
        worker.proc.wait()
    print(f"\nLoad average after: {os.getloadavg()}; {time.time() - started:.0f} s in all.")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
