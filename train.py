"""Train one SAE on one layer of an activation cache (SPEC 4).

    python train.py --cache DIR --layer L --variant NAME [--set key=value ...]
                    [--steps N | --tokens N] [--batch-size 2048] [--out runs/NAME] [--resume]

Writes ``runs/<variant>_L<layer>/`` (see ``jax_sae.runs``): config.json, metrics.jsonl,
checkpoints/, and at the end sae_params.safetensors, final_info.json (with the fast evaluation
on held-out cached tokens) and plots/. A killed run continues bit for bit with ``--resume``;
``--resume --steps N`` with N larger than before extends a run. Bad input, a damaged cache, a busy
run folder, a full disk or a diverged run print one ``error: ...`` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import textwrap
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from safetensors.numpy import save_file
from tqdm import tqdm

from jax_sae import plots, runs
from jax_sae.checkpoint import CheckpointError, Checkpoints
from jax_sae.cli import OneLineParser
from jax_sae.data import ActivationCache, CacheError, hook_name
from jax_sae.defaults import adapt_hparams
from jax_sae.diagnostics import make_grad_shares
from jax_sae.disk import (
    DiskFullError,
    disk_full_error,
    is_disk_full,
    quiet_disk_full_in_threads,
)
from jax_sae.divergence import (
    LOSS_BLOWUP_FACTOR,
    MIN_EXPLAINED_VARIANCE,
    DivergenceRule,
    zero_reconstruction_loss,
)
from jax_sae.evaluate import EVAL_BATCH, evaluate
from jax_sae.loader import (
    DEFAULT_BUFFER_CHUNKS,
    DEFAULT_CHUNK_TOKENS,
    Loader,
    LoaderError,
    norm_scale,
)
from jax_sae.optim import make_optimizer
from jax_sae.train_step import make_train_step
from jax_sae.variants import (
    VARIANTS,
    VariantError,
    describe_hparams,
    make_variant,
    variant_spec,
)

DEFAULT_EVAL_TOKENS = 65536
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
SPARSITY_KEYS = ("lambda", "lambda_1", "sparsity_penalty", "k", "k_b")
"""Hyper-parameter reported as the template's ``sparsity_penalty`` (first one the variant has)."""


class UsageError(ValueError):
    """Bad command line or run folder; the message names the fix."""


class TrainingError(RuntimeError):
    """Training cannot continue (non-finite loss); the last good checkpoint is kept."""


ONE_LINE_ERRORS = (
    CacheError,
    LoaderError,
    VariantError,
    UsageError,
    CheckpointError,
    TrainingError,
    runs.RunFolderError,
    DiskFullError,
)
"""Bad input or a stopped run: reported as one ``error:`` line, exit status 2."""


def variants_help() -> str:
    """Every variant with its hyper-parameters and defaults, for the end of ``--help``."""
    lines = [
        "variants and hyper-parameters (--set KEY=VALUE; defaults for d_in 2304, sizes adapt to",
        "other d_in and warm-ups to the run length; formulas and reasons in docs/variants.md):",
    ]
    for name, spec in VARIANTS.items():
        lines.append(f"  {name}: {spec.description}; d_sae {spec.suggested_d_sae(2304)}")
        text = ", ".join(describe_hparams(name))
        lines.append(
            textwrap.fill(text, width=98, initial_indent="      ", subsequent_indent="      ")
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineParser(
        description=__doc__, epilog=variants_help(), formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--cache", required=True, help="activation cache folder (make extract)")
    p.add_argument("--layer", type=int, required=True, help="layer of the cache to train on")
    p.add_argument("--variant", required=True, help=f"one of: {', '.join(VARIANTS)}")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a hyper-parameter (value parsed as JSON, else a string); d_sae too",
    )
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="training steps")
    length.add_argument("--tokens", type=int, help="training tokens (default: one epoch)")
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--out", help="run folder (default runs/<variant>_L<layer>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compute-dtype", choices=list(COMPUTE_DTYPES), default="float32")
    p.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="scale inputs to E||x||^2 = d_in (default; --no-normalize trains on raw activations, "
        "as the reference template did)",
    )
    p.add_argument("--checkpoint-every", type=int, default=1000)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument(
        "--eval-tokens",
        type=int,
        help=f"held-out tail of the cache (default: {DEFAULT_EVAL_TOKENS} or a tenth of the cache)",
    )
    p.add_argument("--dead-tokens", type=int, help="same as --set dead_tokens=N")
    p.add_argument(
        "--allow-incomplete",
        action="store_true",
        help="train on a cache whose extraction has not finished (only the shards listed now)",
    )
    p.add_argument(
        "--diverge-loss-factor",
        type=float,
        default=LOSS_BLOWUP_FACTOR,
        help="stop when the reconstruction loss exceeds this many times that of predicting zero "
        "(inf: never; see jax_sae/divergence.py)",
    )
    p.add_argument(
        "--diverge-min-ev",
        type=float,
        default=MIN_EXPLAINED_VARIANCE,
        help="mark the run diverged when the held-out explained variance ends below this "
        "(-inf: never)",
    )
    p.add_argument(
        "--dense",
        action="store_true",
        help="TopK family: dense reference path instead of the sparse one (--set dense=true)",
    )
    return p.parse_args(argv)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``key=value`` pairs; values are JSON when they parse (numbers, booleans), else strings."""
    overrides = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--set {item!r} is not KEY=VALUE (e.g. --set lambda=0.04)")
        try:
            overrides[key] = json.loads(text)
        except json.JSONDecodeError:
            overrides[key] = text
    return overrides


def cache_field(cache: ActivationCache, *names: str) -> Any:
    """First of ``names`` in the manifest's top level, metadata or settings (None if absent)."""
    manifest = cache.manifest
    for section in (manifest, manifest.get("metadata") or {}, manifest.get("settings") or {}):
        for name in names:
            if section.get(name) is not None:
                return section[name]
    return None


def build_config(args: argparse.Namespace) -> tuple[dict, Any, Loader]:
    """Resolve every setting of the run; raises one-line errors for bad input."""
    for flag in ("batch_size", "checkpoint_every", "log_every", "steps", "tokens", "dead_tokens"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be > 0, got {value}")
    spec = variant_spec(args.variant)
    cache = ActivationCache(args.cache)
    if not cache.complete and not args.allow_incomplete:
        raise UsageError(
            f"cache {args.cache} is not complete ({cache.n_tokens} tokens in "
            f"{len(cache.shard_sizes)} shards so far: extraction is running or was interrupted); "
            "finish it (python -m extract ... --resume) or pass --allow-incomplete to train on "
            "the shards listed now"
        )
    overrides = parse_overrides(args.set)
    if args.dead_tokens is not None:
        overrides["dead_tokens"] = args.dead_tokens
    if args.dense:
        overrides["dense"] = True
    d_in = cache.d_model
    d_sae = overrides.pop("d_sae", None)
    scale = norm_scale(cache, args.layer) if args.normalize else 1.0
    eval_tokens = args.eval_tokens
    if eval_tokens is None:
        eval_tokens = min(DEFAULT_EVAL_TOKENS, cache.n_tokens // 10)
    loader = Loader(
        cache,
        args.layer,
        batch_size=args.batch_size,
        seed=args.seed,
        eval_tokens=eval_tokens,
        batch_keys=spec.batch_keys,
        scale=scale,
    )
    tokens = args.tokens or (args.steps or 0) * args.batch_size or loader.n_train
    steps = args.steps or math.ceil(tokens / args.batch_size)
    adapted = adapt_hparams(
        args.variant,
        d_in,
        steps=first_run_length(run_dir(args), args.resume) or steps,
        batch_size=args.batch_size,
        overrides=overrides,
        d_sae=d_sae,
    )
    variant = make_variant(args.variant, d_in, adapted.d_sae, **adapted.overrides)
    try:  # checks lr, warm-up and clipping; fail before anything is written
        optimizer_for(variant.hparams, steps)
    except ValueError as error:
        raise UsageError(f"{error}; change it with --set") from None
    config = {
        "variant": variant.name,
        "hparams": dict(variant.hparams),
        "adapted_defaults": adapted.notes,
        "warnings": adapted.warnings,
        "d_in": d_in,
        "d_sae": variant.d_sae,
        "layer": args.layer,
        "cache": runs.portable_path(cache.path),
        "cache_manifest_sha256": runs.manifest_sha256(cache),
        "cache_complete": cache.complete,
        "model_name": cache_field(cache, "model_name", "model"),
        "hook_name": hook_name(args.layer),
        "ctx_len": cache_field(cache, "ctx_len", "context_size"),
        "dataset": cache_field(cache, "dataset", "dataset_name"),
        "prepend_bos": cache_field(cache, "prepend_bos"),
        "batch_size": args.batch_size,
        "steps": steps,
        "tokens": steps * args.batch_size,
        "epochs": steps * args.batch_size / loader.n_train,
        "train_tokens_in_cache": loader.n_train,
        "seed": args.seed,
        "compute_dtype": args.compute_dtype,
        "normalize": args.normalize,
        "norm_scale": scale,
        "eval_tokens": eval_tokens,
        "heldout_tokens": cache.n_tokens - loader.train_end,
        "loader": {"chunk_tokens": DEFAULT_CHUNK_TOKENS, "buffer_chunks": DEFAULT_BUFFER_CHUNKS},
        "checkpoint_every": args.checkpoint_every,
        "log_every": args.log_every,
        "divergence": {
            "loss_factor": args.diverge_loss_factor,
            "min_explained_variance": args.diverge_min_ev,
        },
        "versions": runs.library_versions(),
    }
    config["config_hash"] = runs.config_hash(config)
    return config, variant, loader


def optimizer_for(hp: Mapping[str, Any], steps: int) -> optax.GradientTransformation:
    """The run's optimizer from its hyper-parameters (ValueError for invalid ones)."""
    return make_optimizer(
        lr=hp["lr"],
        warmup_steps=hp["warmup_steps"],
        total_steps=steps,
        decay=hp["lr_decay"],
        grad_clip_norm=hp["grad_clip_norm"],
    )


def run_dir(args: argparse.Namespace) -> Path:
    return Path(args.out or f"runs/{args.variant}_L{args.layer}")


def first_run_length(out: Path, resume: bool) -> int | None:
    """Steps the run in ``out`` was first started for: the defaults that adapt to the run length
    keep their values when ``--resume --steps N`` extends it (None for a new run)."""
    config_file = out / runs.CONFIG
    if not (resume and config_file.exists()):
        return None
    old = runs.read_json(config_file)
    return (old.get("extends") or [old])[0].get("steps")


def prepare_run_dir(out: Path, config: dict, resume: bool) -> dict:
    """Create the run folder, or check that ``--resume`` continues (or extends) the same
    experiment; returns the config to record, marked running."""
    config_file = out / runs.CONFIG
    if not resume and runs.has_progress(out):
        raise UsageError(
            f"{out} already holds a run; pass --resume to continue it or choose another --out"
        )
    if resume and config_file.exists():
        config = continued_config(out, runs.read_json(config_file), config)
    out.mkdir(parents=True, exist_ok=True)
    runs.write_json(config_file, config)
    runs.write_status(out, runs.RUNNING)
    return config


def continued_config(out: Path, old: dict, new: dict) -> dict:
    """The config of a resumed run: the old one's history, plus an extension when ``--steps``
    grew. Extending is exact only when the learning-rate schedule ignores the run length."""
    extends = list(old.get("extends", []))
    if old.get("config_hash") != new["config_hash"]:
        keys = runs.differing_keys(old, new)
        if keys != ["steps"]:
            changed = "cache_manifest_sha256" in keys
            hint = " (the cache changed since the run started)" if changed else ""
            raise UsageError(
                f"cannot resume {out}: its config differs in {', '.join(keys) or 'config hash'}"
                f"{hint}; rerun with the original flags or choose another --out"
            )
        if new["steps"] < old["steps"]:
            raise UsageError(
                f"cannot resume {out} with --steps {new['steps']}: it was started for "
                f"{old['steps']} steps; pass --steps {old['steps']} or more"
            )
        if new["hparams"]["lr_decay"] != "constant":
            raise UsageError(
                f"cannot extend {out}: lr_decay={new['hparams']['lr_decay']} depends on the run "
                "length, so more steps would change the finished ones; train a new --out"
            )
        extends.append({"steps": old["steps"], "config_hash": old["config_hash"]})
        print(f"extending {out} from {old['steps']} to {new['steps']} steps", file=sys.stderr)
    return new | {"extends": extends} if extends else new


@jax.jit
def _accumulate(sums: dict, metrics: dict, step: jax.Array, first_bad: jax.Array):
    """Add one step's metrics to the interval sums and remember the first step whose loss is not
    finite, on the device: no host sync per step."""
    bad = (first_bad < 0) & ~jnp.isfinite(metrics["loss"])
    return jax.tree.map(jnp.add, sums, metrics), jnp.where(bad, step, first_bad)


class MetricsWindow:
    """Metrics of the steps since the last log line, and the first non-finite-loss step."""

    def __init__(self, batch_size: int, start: int) -> None:
        self.batch_size = batch_size
        self.first_bad = jnp.int32(-1)
        self.sums: dict | None = None
        self.count = 0
        self.since = (start, time.perf_counter())

    def add(self, metrics: dict, step: int) -> None:
        if self.sums is None:  # host zeros: no extra compile
            self.sums = {key: np.zeros((), np.float32) for key in metrics}
        self.sums, self.first_bad = _accumulate(self.sums, metrics, jnp.int32(step), self.first_bad)
        self.count += 1

    def bad_step(self) -> int | None:
        """1-based step of the first non-finite loss so far (waits for the device)."""
        bad = int(self.first_bad)
        return bad + 1 if bad >= 0 else None

    def restart_clock(self, done: int) -> None:
        """Start timing the next interval now (diagnostics between intervals are not steps)."""
        self.since = (done, time.perf_counter())

    def flush(self, done: int) -> tuple[dict, float]:
        """The interval's mean metrics as a metrics.jsonl record, and its tokens/s."""
        means = {k: float(v) / self.count for k, v in jax.device_get(self.sums).items()}
        (step0, time0), now = self.since, time.perf_counter()
        tokens_per_s = (done - step0) * self.batch_size / max(now - time0, 1e-9)
        self.sums, self.count, self.since = None, 0, (done, now)
        return {"step": done, "tokens": done * self.batch_size, **means}, tokens_per_s


def host_copy(tree: Any) -> Any:
    """Owned numpy copies: the step donates its inputs, so a background checkpoint write must
    not read device buffers that the next step reuses."""
    return jax.tree.map(np.array, tree)


def initial_state(config: dict, variant: Any, opt: Any, loader: Loader) -> dict:
    """Fresh training state; also the structure a checkpoint is restored into."""
    init_key, rng = jax.random.split(jax.random.PRNGKey(config["seed"]))
    params = variant.init_params(init_key, data_sample=loader.sample(config["batch_size"]))
    return {
        "params": params,
        "opt_state": opt.init(params),
        "reg_state": variant.init_state(),
        "rng": rng,
    }


def diverged(out: Path, message: str) -> TrainingError:
    """Mark the run diverged (the exporter then refuses it) and return the error to raise."""
    runs.write_status(out, runs.DIVERGED, reason=message)
    return TrainingError(message)


def train(
    config: dict, variant: Any, loader: Loader, out: Path, resume: bool, rule: DivergenceRule
) -> tuple:
    """The training loop; returns the final (params, reg_state, last logged record).

    Stops with a TrainingError, keeping the last good checkpoint, at a non-finite loss or when
    ``rule`` sees the loss blow up."""
    steps, batch_size = config["steps"], config["batch_size"]
    opt = optimizer_for(variant.hparams, steps)
    step_fn = make_train_step(variant, opt, COMPUTE_DTYPES[config["compute_dtype"]])
    grad_shares = make_grad_shares(variant, COMPUTE_DTYPES[config["compute_dtype"]])
    state = initial_state(config, variant, opt, loader)
    metrics_log = runs.MetricsLog(out / runs.METRICS)
    start, record = 0, None
    with Checkpoints(out / "checkpoints") as checkpoints:
        latest = checkpoints.latest_step() if resume else None
        if latest is not None:
            state, _ = checkpoints.restore(latest, state, runs.accepted_hashes(config))
            start = latest
            print(f"resuming {out} at step {start} of {steps}", file=sys.stderr)
        metrics_log.truncate_after(start)
        stats = loader.cache.layer_stats(config["layer"])
        zero_loss = zero_reconstruction_loss(
            stats["mean_sq_norm"] * config["norm_scale"] ** 2, variant.hparams["recon"]
        )
        if config["epochs"] > 1:
            print(
                f"{config['tokens']} training tokens from {loader.n_train} in the cache: "
                f"{config['epochs']:.2f} epochs",
                file=sys.stderr,
            )
        window = MetricsWindow(batch_size, start)
        remedy = "lower the learning rate (--set lr=...)" + (
            "" if config["normalize"] else " or train with --normalize"
        )

        def last_good() -> str:
            latest = checkpoints.latest_step()
            if latest is None:
                return "no checkpoint was saved yet"
            return f"the last good checkpoint is step {latest} in {checkpoints.directory}"

        def stop_if_not_finite() -> None:
            bad = window.bad_step()
            if bad is not None:
                raise diverged(
                    out,
                    f"loss is not finite at step {bad}; stopped without saving, {last_good()}. "
                    "The inputs read were finite and matched their checksums, so the "
                    f"optimisation diverged: {remedy}",
                )

        def stop_if_diverged(record: dict) -> None:
            reason = rule.loss_reason(record, zero_loss)
            if reason is not None:
                raise diverged(out, f"the run diverged: {reason}; stopped, {last_good()}; {remedy}")

        def save(done: int) -> None:
            stop_if_not_finite()
            record = {"step": done, "config_hash": config["config_hash"], "loader_step": done}
            checkpoints.save(done, host_copy(state), record)

        bar = tqdm(
            total=steps, initial=start, unit="step", dynamic_ncols=True, desc=f"train {out.name}"
        )
        with bar, loader.batches(start, steps) as batches:
            done, in_flight = start, None
            try:
                for step in range(start, steps):
                    batch = next(batches)
                    params, opt_state, reg_state, metrics = step_fn(
                        state["params"],
                        state["opt_state"],
                        state["reg_state"],
                        batch,
                        jnp.int32(step),
                    )
                    state |= {"params": params, "opt_state": opt_state, "reg_state": reg_state}
                    done = step + 1
                    window.add(metrics, step)
                    if in_flight is not None:
                        in_flight.block_until_ready()  # at most two steps queued on the device
                    in_flight = metrics["loss"]
                    bar.update(1)
                    if done % config["log_every"] == 0 or done == steps:
                        stop_if_not_finite()
                        record, tokens_per_s = window.flush(done)
                        shares = grad_shares(
                            state["params"], state["reg_state"], batch, jnp.int32(step)
                        )
                        record |= {key: float(value) for key, value in shares.items()}
                        window.restart_clock(done)
                        metrics_log.append(record)
                        stop_if_diverged(record)
                        bar.set_postfix(
                            loss=f"{record['loss']:.4g}",
                            L0=f"{record['l0']:.1f}",
                            dead=f"{record['dead_frac']:.3f}",
                            tok_s=f"{tokens_per_s:.3g}",
                            **{key.split("/")[1]: f"{value:.1%}" for key, value in shares.items()},
                        )
                    if done % config["checkpoint_every"] == 0 or done == steps:
                        save(done)
            except KeyboardInterrupt:
                # keep the finished steps; not if the state is non-finite or a step was cut
                # mid-call (its inputs are donated, i.e. gone)
                with contextlib.suppress(Exception):
                    save(done)
                raise
        if record is None:  # resumed a finished run: report its last logged interval
            record = metrics_log.read()[-1]
    return state["params"], state["reg_state"], record


def save_weights(out: Path, variant: Any, params: Any, reg_state: Any) -> dict:
    """``sae_params.safetensors`` (atomically) and the JSON part of the export info.

    Array-valued export info (BatchTopK's inference threshold) is stored next to the weights
    and referenced from config.json, so the exporter needs only these two files.
    """
    arrays = variant.params_to_arrays(params)
    json_info = {}
    for key, value in variant.export_info(params, reg_state).items():
        if isinstance(value, np.ndarray):
            arrays.setdefault(key, value.astype(np.float32))
            json_info[key] = f"{runs.PARAMS}:{key}"
        else:
            json_info[key] = value
    tmp = out / f"{runs.PARAMS}.tmp"
    save_file(arrays, str(tmp))
    tmp.replace(out / runs.PARAMS)
    return json_info


def write_final_info(out: Path, config: dict, variant: Any, record: dict, fast_eval) -> dict:
    """The template's final_info.json, keeping entries other tools merged in (SAEBench)."""
    hp = variant.hparams
    info = runs.final_info(
        config,
        training_steps=config["steps"],
        final_loss=record["loss"],
        learning_rate=hp["lr"],
        sparsity_penalty=next((hp[k] for k in SPARSITY_KEYS if k in hp), None),
        extra={"export_info": config["export_info"], runs.FAST_EVAL_KEY: fast_eval},
    )
    info_file = out / runs.FINAL_INFO
    merged = runs.read_json(info_file) if info_file.exists() else {}
    for layer_key, entry in info.items():
        merged[layer_key] = merged.get(layer_key, {}) | entry
    runs.write_json(info_file, merged)
    return merged


def finish(
    config: dict, variant: Any, loader: Loader, out: Path, params, reg_state, record
) -> dict:
    """Weights, export info, fast evaluation on the held-out tokens, final_info.json, plots."""
    config = config | {"export_info": save_weights(out, variant, params, reg_state)}
    runs.write_json(out / runs.CONFIG, config)
    results, fast_eval = None, None
    if config["heldout_tokens"]:
        batches = loader.heldout(EVAL_BATCH)
        scale = config["norm_scale"]
        results = evaluate(variant, params, batches, state=reg_state, scale=scale)
        fast_eval = {k: v for k, v in results.items() if k != "feature_density"}
        fast_eval |= {"batch_size": EVAL_BATCH, "definitions": "jax_sae/evaluate.py docstring"}
    info = write_final_info(out, config, variant, record, fast_eval)
    view = plots.RunView(
        variant=variant,
        params=jax.device_get(params),
        state=jax.device_get(reg_state),
        records=runs.MetricsLog(out / runs.METRICS).read(),
        eval=results,
        heldout=lambda: loader.heldout(EVAL_BATCH),
        norm_scale=config["norm_scale"],
        title=f"{variant.name}, layer {config['layer']}, d_sae {variant.d_sae}",
    )
    plots.write_plots(view, out / "plots")
    return info


def run(
    args: argparse.Namespace, out: Path, config: dict, variant: Any, loader: Loader
) -> tuple[dict, dict]:
    """Train (or continue) the run in ``out``, which this process holds locked; returns the
    final info and the last logged record. A full disk becomes a DiskFullError naming the path
    and the space needed."""
    rule = DivergenceRule(args.diverge_loss_factor, args.diverge_min_ev)
    quiet_disk_full_in_threads()
    try:
        config = prepare_run_dir(out, config, args.resume)
        params, reg_state, record = train(config, variant, loader, out, args.resume, rule)
        info = finish(config, variant, loader, out, params, reg_state, record)
    except DiskFullError:  # checked before writing: it names exactly what did not fit
        raise
    except Exception as error:
        if not is_disk_full(error):
            raise
        resume = "rerun with --resume"
        raise disk_full_error(out, runs.space_to_finish(config), error, resume) from error
    fast_eval = info[f"training results for layer {config['layer']}"][runs.FAST_EVAL_KEY]
    first = runs.MetricsLog(out / runs.METRICS).read()[0]
    reason = rule.eval_reason(fast_eval, first, record)
    if reason is None and (warning := rule.eval_warning(fast_eval)):
        print(f"warning: {warning}", file=sys.stderr)
    if reason is not None:
        raise diverged(
            out,
            f"the run diverged: {reason}; its weights are kept in {out} but marked diverged, so "
            "the exporter refuses them without --force; lower the learning rate (--set lr=...)",
        )
    runs.write_status(out, runs.FINISHED, step=config["steps"])
    return info, record


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error already printed as one line
        return int(exit_.code or 0)
    try:
        config, variant, loader = build_config(args)
        out = run_dir(args)
        for note in config["adapted_defaults"]:
            print(f"default adapted: {note}", file=sys.stderr)
        for warning in config["warnings"]:
            print(f"warning: {warning}", file=sys.stderr)
        lock = runs.RunLock(out)
        stale = lock.acquire()
        if stale is not None:
            print(f"took over the lock of pid {stale}, which is no longer running", file=sys.stderr)
        try:
            info, record = run(args, out, config, variant, loader)
        finally:
            lock.release()
    except ONE_LINE_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint was saved, continue with --resume", file=sys.stderr)
        return 130
    fast = info[f"training results for layer {config['layer']}"][runs.FAST_EVAL_KEY] or {}
    summary = {k: fast[k] for k in ("explained_variance_pooled", "l0", "dead_frac") if k in fast}
    print(f"done: {out} final loss {record['loss']:.5g} {summary}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
