"""``Trainer(config).fit()``: one run, or a sweep of runs, from a TrainConfig to finished run
folders (see ``jax_sae.report.runs`` for the folder layout).

A run folder holds config.json (resolved settings, versions, cache hash), train_config.yaml
(the resolved TrainConfig), metrics.jsonl, checkpoints/, and at the end sae_params.safetensors,
final_info.json (with the fast evaluation on held-out cached tokens) and plots/. A killed run
or sweep continues bit for bit with ``resume=True``. Under ``jax.distributed`` (one process per
host, ``jax_sae.parallel.distributed``) the mesh spans every process, each reads its own rows of
every batch, all write the checkpoints together, and process 0 alone writes the other files. Bad
settings, a damaged cache, a busy folder, a full disk or a diverged run raise the one-line
errors of ``ONE_LINE_ERRORS``.
"""

from __future__ import annotations

import contextlib
import shlex
import sys
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors.numpy import save as safetensors_bytes

from jax_sae.data.cache import CacheError
from jax_sae.data.source import BatchSource, LoaderError
from jax_sae.data.stream import Producer, start_producer
from jax_sae.data.synthetic import is_world
from jax_sae.model.variants import VariantError
from jax_sae.parallel.distributed import (
    DistributedError,
    host_value,
    is_primary,
    local_rows,
    primary_only,
    same_everywhere,
)
from jax_sae.parallel.layout import batch_sharding, make_mesh, parse_mesh, state_shardings
from jax_sae.report import compare, plots, runs
from jax_sae.report.evaluate import EVAL_BATCH, evaluate
from jax_sae.report.record import RunRecord
from jax_sae.training import sweep as sweeps
from jax_sae.training.checkpoint import CheckpointError, Checkpoints
from jax_sae.training.config import RESOLVED_CONFIG, ConfigError, TrainConfig, write_config_file
from jax_sae.training.divergence import DivergenceRule, zero_reconstruction_loss
from jax_sae.training.engine import (
    TrainState,
    initial_state,
    make_engine,
    stack_members,
    swept_hparam_arrays,
    traceable,
)
from jax_sae.training.loop import GroupRun, Member, TrainingError, mark_diverged
from jax_sae.training.memory import check_fits, out_of_memory_message
from jax_sae.training.resolve import (
    SPARSITY_KEYS,
    ResolvedRun,
    make_loader,
    open_cache,
    resolve_run,
    run_dir_config,
    start_run_dir,
    world_source,
)
from jax_sae.training.tracking import ExperimentLog
from jax_sae.util.disk import (
    DiskFullError,
    disk_full_error,
    is_disk_full,
    is_out_of_memory,
    quiet_disk_full_in_threads,
)
from jax_sae.util.files import DamagedFileError, write_bytes_atomic

ONE_LINE_ERRORS = (
    CacheError,
    LoaderError,
    VariantError,
    ConfigError,
    CheckpointError,
    TrainingError,
    runs.RunFolderError,
    DiskFullError,
    DistributedError,
    DamagedFileError,
)
"""Bad input or a stopped run: reported as one ``error:`` line, exit status 2."""


SHARDS_SEEN = "shards_seen.json"
"""A streamed run's record of the shards it read, with their checksums."""


@dataclass(frozen=True)
class FinishedRun:
    """A finished run folder and its headline numbers."""

    out: Path
    status: str  # runs.FINISHED or runs.DIVERGED
    final_loss: float | None
    fast_eval: (
        dict | None
    )  # held-out evaluation (jax_sae.report.evaluate), None without held-out data


class Trainer:
    """Trains what a TrainConfig describes: one run, or every member of its ``sweep``."""

    def __init__(self, config: TrainConfig) -> None:
        if config.mesh is None and jax.process_count() > 1:  # data parallel over the processes
            config = config.replace(mesh=f"data={jax.device_count()}")
        self.config = config.checked()
        self.mesh = None
        if config.mesh is not None:
            try:
                self.mesh = make_mesh(parse_mesh(config.mesh))
            except ValueError as error:
                raise ConfigError(str(error)) from None

    def _loader(self, producer: Producer | None) -> BatchSource:
        """The run's batches; with several processes, this process's rows of each."""
        cfg = self.config
        sharding, rows = None, None
        if jax.process_count() > 1:
            assert self.mesh is not None  # __init__ makes one whenever there are several processes
            try:
                sharding = batch_sharding(self.mesh, cfg.batch_size)
            except ValueError as error:
                raise ConfigError(f"--mesh {cfg.mesh}: {error}") from None
            rows = local_rows(sharding, cfg.batch_size)
        if cfg.cache is not None and is_world(cfg.cache):
            return world_source(cfg, sharding, rows)
        return make_loader(cfg, open_cache(cfg, producer), sharding, rows)

    def fit(self) -> list[FinishedRun]:
        """Train (or resume) and finish every run; one FinishedRun per run folder. With
        ``stream`` the extractor runs beside the training, and is stopped when it ends."""
        self.config = settled_resume(self.config)
        assert self.config.cache is not None  # TrainConfig.checked requires it
        runs.check_out_folder(self.config.default_out(), Path(self.config.cache))
        producer = start_producer(self._extract_args()) if self.config.stream else None
        try:
            if producer is not None:
                producer.wait_until_open()
            return self._fit(self._loader(producer))
        finally:
            if producer is not None:
                producer.stop()

    def _extract_args(self) -> list[str]:
        cfg = self.config
        budget = [] if cfg.disk_budget is None else ["--disk-budget", cfg.disk_budget]
        assert cfg.stream is not None and cfg.cache is not None  # only called to stream a cache
        return [*shlex.split(cfg.stream), "--out", cfg.cache, *budget]

    def _fit(self, loader: BatchSource) -> list[FinishedRun]:
        cfg = self.config
        if cfg.sweep:
            members = sweeps.expand(cfg, cfg.default_out())
            resolved = [resolve_run(m.settings, loader, m.settings.default_out()) for m in members]
            resolved = [
                replace(run, config=run.config.replace(sweep=sweep_entry(cfg, member)))
                for member, run in zip(members, resolved, strict=True)
            ]
            groups = sweeps.group_indices(resolved)
            if loader.single_pass and len(groups) > 1:
                raise ConfigError(
                    "a stream is read once, so a streamed sweep must train in one vmapped group; "
                    "sweep only floats and seeds here, or sweep sizes over a finished cache"
                )
        else:
            resolved = [resolve_run(cfg, loader, cfg.default_out())]
            members, groups = [], [[0]]
        # processes that disagree would wait for each other forever in their first collective
        same_everywhere(
            "configuration", {"settings": vars(cfg), "runs": [r.config.to_json() for r in resolved]}
        )
        if is_primary():
            print(device_line(self.mesh), file=sys.stderr)
        announce(resolved)
        self._preflight([[resolved[i] for i in group] for group in groups], loader)
        folders = [cfg.default_out()] if cfg.sweep else []
        with contextlib.ExitStack() as stack:
            for folder in [*folders, *(run.out for run in resolved)]:
                primary_only(partial(enter_locked, stack, folder))
            quiet_disk_full_in_threads()
            try:
                if cfg.sweep:
                    primary_only(lambda: self._write_sweep(members, groups))
                finished = []
                for number, group in enumerate(groups, 1):
                    runs_in_group = [resolved[i] for i in group]
                    label = self._label(runs_in_group, number, len(groups))
                    finished += self._train_group(runs_in_group, loader, label)
                if cfg.sweep:
                    outs = [run.out for run in resolved]
                    primary_only(lambda: compare.write_sweep_report(cfg.default_out(), outs))
            except ONE_LINE_ERRORS:
                raise
            except Exception as error:
                if is_out_of_memory(error):
                    raise TrainingError(out_of_memory_message()) from error
                if not is_disk_full(error):
                    raise
                need = sum(runs.space_to_finish(run.config.to_json()) for run in resolved)
                raise disk_full_error(
                    cfg.default_out(), need, error, "rerun with --resume"
                ) from error
        return finished

    def _preflight(self, groups: list[list[ResolvedRun]], loader: BatchSource) -> None:
        """Refuse, before any group trains, inputs with nothing to learn and a group the mesh
        cannot split or the device cannot hold: a later group failing would leave the sweep half
        trained."""
        layer = self.config.layer
        if not loader.mean_sq_norm() > 0:
            raise ConfigError(
                f"layer {layer} of {self.config.cache} holds only zero activations: there is "
                "nothing to reconstruct; check the layer (or the extraction that wrote it)"
            )
        mesh_shape = dict(self.mesh.shape) if self.mesh is not None else None
        for group in groups:
            if self.mesh is not None:
                try:
                    state_shardings(self.mesh, {}, group[0].variant.d_sae)
                except ValueError as error:
                    raise ConfigError(f"--mesh {self.config.mesh}: {error}") from None
            variants = [run.variant for run in group]
            check_fits(variants, group[0].config.steps, self.config.batch_size, mesh_shape)

    def _label(self, group: list[ResolvedRun], number: int, total: int) -> str:
        if not self.config.sweep:
            return f"train {group[0].out.name}"
        where = f" group {number}/{total}" if total > 1 else ""
        return f"sweep {self.config.default_out().name}{where} ({len(group)} members)"

    def _write_sweep(self, members: list[sweeps.SweepMember], groups: list[list[int]]) -> None:
        folder = self.config.default_out()
        record = sweeps.sweep_record(self.config, members, groups)
        existing = folder / sweeps.SWEEP_FILE
        if existing.exists() and runs.read_json(existing)["members"] != record["members"]:
            raise ConfigError(
                f"{folder} holds a sweep over other values; choose another --out for this one"
            )
        folder.mkdir(parents=True, exist_ok=True)
        runs.write_json(existing, record)
        write_config_file(
            folder / RESOLVED_CONFIG, self.config.replace(resume=False, resume_if_exists=False)
        )

    def _train_group(
        self, group: list[ResolvedRun], loader: BatchSource, label: str
    ) -> list[FinishedRun]:
        """Train one group together (vmapped when part of a sweep) and finish each member."""
        resume = self.config.resume
        if self.config.sweep and resume:
            group = [run for run in group if not diverged_before(run)]
            if not group:
                return []
        rule = DivergenceRule(self.config.diverge_loss_factor, self.config.diverge_min_ev)
        # read (and check) the data before opening checkpoints: an early refusal then leaves no
        # checkpoint manager behind with orbax's background threads
        sample = loader.sample(self.config.batch_size)
        with contextlib.ExitStack() as stack:
            members = []
            for run in group:
                config = run_dir_config(run.out, run.config, resume)
                primary_only(partial(start_run_dir, run, config))
                members.append(self._member(run, config, loader, stack))
            vmapped = bool(self.config.sweep)
            state, start = restore_or_init(members, sample, vmapped)
            try:  # a mesh that does not divide the batch or d_sae
                engine = make_engine(
                    [m.variant for m in members],
                    group[0].config.steps,
                    group[0].config.compute_dtype,
                    vmapped,
                    mesh=self.mesh,
                    example=state,
                    batch_size=self.config.batch_size,
                )
            except ValueError as error:
                raise ConfigError(f"--mesh {self.config.mesh}: {error}") from None
            state = engine.place(state)
            if len(members) > 1 and (reason := traceable(engine, state, first_batch(loader))):
                names = ", ".join(swept_hparam_arrays([m.variant for m in members]))
                if loader.single_pass:
                    raise ConfigError(
                        f"{names} cannot vary inside one vmapped step ({reason}), and a stream "
                        "is read once: sweep it over a finished cache"
                    )
                print(
                    f"note: {names} cannot vary inside one vmapped step ({reason}); "
                    "these members train one after the other",
                    file=sys.stderr,
                )
                stack.close()
                return [r for run in group for r in self._train_group([run], loader, label)]
            for member in members:
                if member.log is not None:
                    member.log.truncate_after(start)
            release = loader.release_before if loader.releases_data else None
            state = GroupRun(members, engine, loader, rule, label, release).run(state, start)
            return [
                finish_member(member, engine.member(state, index), loader, rule)
                for index, member in enumerate(members)
                if member.failure is None
            ] + [FinishedRun(m.out, runs.DIVERGED, None, None) for m in members if m.failure]

    def _member(self, run: ResolvedRun, config: RunRecord, loader: BatchSource, stack) -> Member:
        zero_loss = zero_reconstruction_loss(
            loader.mean_sq_norm() * config.norm_scale**2, run.variant.hparams["recon"]
        )
        name = f"{run.out.parent.name}/{run.out.name}" if self.config.sweep else run.out.name
        log = primary_only(lambda: self._log(run.out, config, name, stack))
        checkpoints = stack.enter_context(Checkpoints(run.out / "checkpoints"))
        return Member(name, run.out, config, run.variant, log, checkpoints, zero_loss)

    def _log(
        self, out: Path, config: RunRecord, name: str, stack: contextlib.ExitStack
    ) -> ExperimentLog:
        try:
            log = ExperimentLog(
                out,
                config.to_json(),
                name=name,
                tensorboard=self.config.tensorboard,
                wandb_project=self.config.wandb,
            )
        except ValueError as error:  # a tracker that is not installed
            raise ConfigError(str(error)) from None
        return stack.enter_context(log)


def sweep_entry(cfg: TrainConfig, member: sweeps.SweepMember) -> dict[str, Any]:
    """config.json's ``sweep`` entry of a member: the sweep, the member and its values."""
    return {"name": cfg.default_out().name, "member": member.name, "swept": member.swept}


def device_line(mesh: Any) -> str:
    """Where the run trains, once at the start: "training on 1 x NVIDIA H200 (gpu)", "training
    on cpu (1 of 8 devices)"; without --mesh a run uses one device."""
    devices = jax.devices()
    used = 1 if mesh is None else int(np.prod(list(mesh.shape.values())))
    total = len(devices)
    count = f"{used} of {total}" if used < total else f"{total}"
    processes = jax.process_count()
    hosts = f", {processes} processes" if processes > 1 else ""
    platform = devices[0].platform
    if platform == "cpu":
        return f"training on cpu ({count} device{'s' if total > 1 else ''}){hosts}"
    return f"training on {count} x {devices[0].device_kind} ({platform}){hosts}"


def announce(resolved: list[ResolvedRun]) -> None:
    """Print each adapted default and warning once (members of a sweep share most)."""
    seen: set[str] = set()
    for run in resolved:
        notes = (("default adapted", run.config.adapted_defaults), ("warning", run.config.warnings))
        for prefix, lines in notes:
            for line in lines:
                if line not in seen:
                    seen.add(line)
                    print(f"{prefix}: {line}", file=sys.stderr)
    config = resolved[0].config
    if config.epochs > 1:
        print(
            f"{config.tokens} training tokens from {config.train_tokens_in_cache} in the "
            f"cache: {config.epochs:.2f} epochs",
            file=sys.stderr,
        )


def enter_locked(stack: contextlib.ExitStack, folder: Path) -> None:
    """Hold the folder's lock (``locked``) until ``stack`` closes."""
    stack.enter_context(locked(folder))


@contextlib.contextmanager
def locked(folder: Path):
    """Hold the run folder's lock (one trainer per folder) while the block runs."""
    lock = runs.RunLock(folder)
    stale = lock.acquire()
    if stale is not None:
        print(f"took over the lock of pid {stale}, which is no longer running", file=sys.stderr)
    try:
        yield
    finally:
        lock.release()


def settled_resume(cfg: TrainConfig) -> TrainConfig:
    """``--resume`` where ``--out`` holds a run (or sweep) to continue, else a ConfigError: a
    mistyped folder must not silently start afresh. ``--resume-if-exists`` decides here."""
    out = cfg.default_out()
    record = out / (sweeps.SWEEP_FILE if cfg.sweep else runs.CONFIG)
    if cfg.resume_if_exists:
        return cfg.replace(resume=record.is_file(), resume_if_exists=False)
    if cfg.resume and not record.is_file():
        what = "sweep" if cfg.sweep else "run"
        raise ConfigError(
            f"--resume: {out} holds no {what} to continue (no {record.name}); check --out, or "
            f"drop --resume to start one there (--resume-if-exists does either)"
        )
    return cfg


def diverged_before(run: ResolvedRun) -> bool:
    """A sweep member that diverged in an earlier session stays as it is when the sweep resumes
    (it would diverge again at the same step); the others continue."""
    status = runs.read_status(run.out)
    if status is None or status.get("state") != runs.DIVERGED:
        return False
    print(f"note: {run.out} diverged before ({status.get('reason')}); not resumed", file=sys.stderr)
    return True


def first_batch(loader: BatchSource) -> dict:
    with loader.batches(0, 1) as batches:
        return next(batches)


def restore_or_init(
    members: list[Member], sample: np.ndarray, vmapped: bool
) -> tuple[TrainState, int]:
    """The group's state at the latest step every member has a checkpoint of (0: fresh); a
    fresh state's data-dependent init uses ``sample``."""
    config = members[0].config
    fresh = [initial_state(m.variant, m.config.seed, config.steps, sample) for m in members]
    latest = [m.checkpoints.latest_step() for m in members]
    saved = [step for step in latest if step is not None]
    start = min(saved) if len(saved) == len(latest) else 0  # 0: some member has no checkpoint
    if start:
        fresh = [
            m.checkpoints.restore(start, like, m.config.accepted_hashes)[0]
            for m, like in zip(members, fresh, strict=True)
        ]
        for member in members:
            print(f"resuming {member.out} at step {start} of {config.steps}", file=sys.stderr)
    return stack_members(fresh, vmapped), start


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
    write_bytes_atomic(out / runs.PARAMS, safetensors_bytes(arrays))
    return json_info


def write_final_info(
    out: Path, config: RunRecord, variant: Any, record: dict, fast_eval: dict | None
) -> dict:
    """The template's final_info.json, keeping entries other tools merged in (SAEBench)."""
    hp = variant.hparams
    info = runs.final_info(
        config.to_json(),
        training_steps=config.steps,
        final_loss=record["loss"],
        learning_rate=hp["lr"],
        sparsity_penalty=next((hp[k] for k in SPARSITY_KEYS if k in hp), None),
        extra={"export_info": config.export_info, runs.FAST_EVAL_KEY: fast_eval},
    )
    info_file = out / runs.FINAL_INFO
    merged = runs.read_json(info_file) if info_file.exists() else {}
    for layer_key, entry in info.items():
        merged[layer_key] = merged.get(layer_key, {}) | entry
    runs.write_json(info_file, merged)
    return merged


def finish_member(
    member: Member, state: TrainState, loader: BatchSource, rule: DivergenceRule
) -> FinishedRun:
    """The member's final files, written by the primary process (the others return the status
    it wrote, and raise when it raises)."""
    params, reg_state = host_value(state["params"]), host_value(state["reg_state"])
    finished = primary_only(lambda: write_outputs(member, params, reg_state, loader, rule))
    if finished is not None:
        return finished
    status = runs.read_status(member.out)
    assert status is not None  # the primary wrote the final status before the others got here
    return FinishedRun(member.out, status["state"], None, None)


def write_outputs(
    member: Member, params: Any, reg_state: Any, loader: BatchSource, rule: DivergenceRule
) -> FinishedRun:
    """Weights, export info, fast evaluation on the held-out tokens, final_info.json, plots,
    and the final status (diverged when the held-out explained variance says so)."""
    out, variant, log = member.out, member.variant, member.log
    assert log is not None  # written by the primary process, the one that logs
    record = member.record or log.read()[-1]  # a finished run resumed: its last interval
    config = member.config.replace(
        export_info=save_weights(out, variant, params, reg_state),
        export_form=variant.export_form(),
    )
    runs.write_json(out / runs.CONFIG, config.to_json())
    read = loader.record(config.steps)  # which shards of a stream the run read
    if read is not None:
        runs.write_json(out / SHARDS_SEEN, read)
    results, fast_eval = None, None
    if config.heldout_tokens:
        batches = loader.heldout(EVAL_BATCH)
        results = evaluate(variant, params, batches, state=reg_state, scale=config.norm_scale)
        fast_eval = {k: v for k, v in results.items() if k != "feature_density"}
        fast_eval |= {
            "batch_size": EVAL_BATCH,
            "definitions": "jax_sae/report/evaluate.py docstring",
        }
    write_final_info(out, config, variant, record, fast_eval)
    view = plots.RunView(
        variant=variant,
        params=params,
        state=reg_state,
        records=log.read(),
        eval=results,
        heldout=lambda: loader.heldout(EVAL_BATCH),
        norm_scale=config.norm_scale,
        title=f"{member.name}: {variant.name}, layer {config.layer}, d_sae {variant.d_sae}",
    )
    plots.write_plots(view, out / "plots")
    reason = rule.nonfinite_reason(fast_eval) or rule.eval_reason(fast_eval, log.read()[0], record)
    if reason is None and (warning := rule.eval_warning(fast_eval)):
        print(f"warning: {member.name}: {warning}", file=sys.stderr)
    if reason is not None:
        message = (
            f"the run diverged: {reason}; its weights are kept in {out} but marked diverged, so "
            "the exporter refuses them without --force; lower the learning rate (--set lr=...)"
        )
        mark_diverged(member, message)
        if not config.sweep:
            raise TrainingError(message)
        print(f"warning: sweep member {member.name}: {message}", file=sys.stderr)
        return FinishedRun(out, runs.DIVERGED, record["loss"], fast_eval)
    runs.write_status(out, runs.FINISHED, step=config.steps)
    return FinishedRun(out, runs.FINISHED, record["loss"], fast_eval)
