"""Export a trained run (`runs/<name>/`) to SAELens format for SAEBench.

    python export_to_torch.py RUN_DIR [--out DIR] [--replace] [--force]

Refuses a run whose `status.json` says it diverged or has not finished (still training,
interrupted, being extended) unless `--force` is given. `--replace` replaces an earlier export
of the same run (what `make export-eval` passes); `--force` also does. Neither ever replaces a
folder this exporter did not write: not the run folder or a folder holding it, not another run's
export, not a folder holding any file an export does not write (the refusal deletes nothing).

Reads `RUN_DIR/config.json` and `RUN_DIR/sae_params.safetensors` (float32, SAELens names, the
un-folded trained weights) and writes `RUN_DIR/saelens/` (`cfg.json` + `sae_weights.safetensors`),
loadable with `sae_lens.SAE.load_from_disk`, or, for an architecture SAELens lacks (`two_level`:
its parent gating), with its torch twin (`jax_sae.export.torch_twins.load_twin`, SAEBench's
custom-SAE path). What each architecture needs is the `export_form` its model class records in
`config.json` (`ReLUSAE.export_form`), so the exporter has no per-architecture code.

Two transformations make the exported SAE act on raw (un-normalised) activations with unit-norm
decoder rows, the form SAEBench's metrics assume:

* Input normalisation. Training saw x' = s x (`norm_scale` s), pre = (s x - b_dec) W_enc + b_enc.
  Every encoder here is positively homogeneous in pre (ReLU, TopK, JumpReLU with the threshold
  scaled alike), so dividing pre by s divides the code by s without changing which latents fire:
  b_enc' = b_enc / s, threshold' = threshold / s, b_dec' = b_dec / s, W_enc and W_dec unchanged.
  Then x_hat = (h / s) W_dec + b_dec / s = x'_hat / s exactly, and the decoder keeps unit rows.
* Decoder row norms n_i. Rows are renormalised to 1 and n_i moves into the latent (W_enc[:, i],
  b_enc[i], threshold[i] times n_i). That is exact for ReLU and JumpReLU; for TopK-based encoders
  it would change which latents win, so those must already be unit-norm to float precision.

Needs only numpy and safetensors, never JAX, so the evaluation environment can import it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from jax_sae.export.torch_twins import EXPORT_CONFIG, EXPORT_WEIGHTS
from jax_sae.util.cli import OneLineParser
from jax_sae.util.disk import disk_full_error, is_disk_full
from jax_sae.util.files import DamagedFileError, read_json_object

RUN_CONFIG = "config.json"
RUN_WEIGHTS = "sae_params.safetensors"
RUN_STATUS = "status.json"  # written by train.py (jax_sae.report.runs.STATUS)
EXPORT_DIR = "saelens"
# The SAELens release whose config format we write (requirements-eval.txt pins it). SAELens reads
# a config without a version >= 6 as a pre-6 config and renames its keys.
SAELENS_FORMAT_VERSION = "6.54.12"

# Runs written before config.json recorded its `export_form`: the architecture of each variant.
LEGACY_ARCHITECTURE_OF_VARIANT = {
    "standard": "standard",
    "freq": "standard",
    "pair_ortho": "standard",
    "temporal": "standard",
    "topk": "topk",
    "hier_ortho": "topk",
    "jumprelu": "jumprelu",
    "batchtopk": "jumprelu",
    "two_level": "two_level",
}
FORM_KEYS = ("architecture", "dictionaries", "per_latent", "ranks_latents", "saelens_config")
EXPORTED_FROM = "exported_from"  # cfg.json metadata: the run an export came from
UNIT_NORM_ATOL = 1e-4  # float32 renormalisation leaves ~1e-7; more means rows were not normalised


RERUN = "resume the run (train.py ... --resume) to write it again, or train into a new --out"


class ExportError(ValueError):
    """A run folder that cannot be exported; the message names the problem and the fix."""


# ------------------------------------------------------------------------------------------------
# reading the run
# ------------------------------------------------------------------------------------------------


def status_problem(run_dir: Path) -> str | None:
    """Why the run's weights should not be exported (diverged, unfinished), or None.

    A run folder from before status files existed has none; its weights file decides alone.
    """
    file = run_dir / RUN_STATUS
    if not file.is_file():
        return None
    status = read_json_object(file, RERUN)
    state = status.get("state")
    if state == "finished":
        return None
    if state == "diverged":
        return f"{run_dir} diverged ({status.get('reason', 'no reason recorded')})"
    return (
        f"{run_dir} has not finished training (status '{state}': running, interrupted or being "
        "extended); resume it until it finishes"
    )


def read_run(run_dir: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Load `config.json` and the float32 weights of a finished run."""
    config_path, weights_path = run_dir / RUN_CONFIG, run_dir / RUN_WEIGHTS
    if not config_path.is_file():
        raise ExportError(f"{run_dir} has no {RUN_CONFIG}; pass a run folder written by train.py")
    if not weights_path.is_file():
        raise ExportError(
            f"{run_dir} has no {RUN_WEIGHTS}: training has not finished; resume it "
            f"(train.py ... --out {run_dir} --resume) until it writes its final weights"
        )
    config = read_json_object(config_path, RERUN)
    try:
        stored = load_file(weights_path)
    except Exception as error:  # safetensors raises its own error type for damaged files
        raise ExportError(
            f"cannot read {weights_path} ({error}); the final save was interrupted - "
            "resume the run to write it again"
        ) from error
    arrays = {name: np.asarray(a, dtype=np.float32) for name, a in stored.items()}
    return config, arrays


def _require(config: dict[str, Any], key: str) -> Any:
    if config.get(key) is None:
        raise ExportError(f"{RUN_CONFIG} lacks '{key}'; re-run training with the current train.py")
    return config[key]


def export_form(config: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """How to write this run: the `export_form` its architecture recorded in config.json
    (`ReLUSAE.export_form`), or, for a run written before that, the same from its variant."""
    form = config.get("export_form")
    if form is None:
        return legacy_export_form(config, arrays)
    if not isinstance(form, dict) or set(form) != set(FORM_KEYS):
        raise ExportError(
            f"{RUN_CONFIG}'s export_form is damaged (keys {sorted(form or {})}, expected "
            f"{list(FORM_KEYS)}); re-run training with the current train.py"
        )
    return form


def legacy_export_form(config: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """The export form of a run whose config.json predates `export_form`."""
    architecture = (config.get("export_info") or {}).get("architecture")
    if architecture is None:
        variant = _require(config, "variant")
        if variant not in LEGACY_ARCHITECTURE_OF_VARIANT:
            known = ", ".join(LEGACY_ARCHITECTURE_OF_VARIANT)
            raise ExportError(f"unknown variant '{variant}' in {RUN_CONFIG}; known: {known}")
        architecture = LEGACY_ARCHITECTURE_OF_VARIANT[variant]
    d_sae = int(_require(config, "d_sae"))
    form: dict[str, Any] = {
        "architecture": architecture,
        "dictionaries": {"": d_sae},
        "per_latent": [],
        "ranks_latents": architecture in ("topk", "two_level"),
        "saelens_config": {},
    }
    if architecture == "topk":
        k = int(hyperparameter(config, "k"))
        form["saelens_config"] = {"k": k, "rescale_acts_by_decoder_norm": False}
    elif architecture == "jumprelu":
        form["per_latent"] = ["threshold"]
    elif architecture == "two_level":
        d_concept = int(np.shape(arrays.get("b_enc_c", ()))[0]) if "b_enc_c" in arrays else 0
        form["dictionaries"] = {"": d_sae, "_c": d_concept}
        form["saelens_config"] = {
            "k_concept": int(hyperparameter(config, "k_c")),
            "k_base": int(hyperparameter(config, "k_b")),
            "d_sae": d_sae + d_concept,
            "d_base": d_sae,
            "d_concept": d_concept,
        }
    elif architecture != "standard":
        raise ExportError(
            f"unknown architecture '{architecture}' in {RUN_CONFIG}; known: "
            "standard, topk, jumprelu, two_level (newer runs record their export_form)"
        )
    return form


def hyperparameter(config: dict[str, Any], name: str) -> Any:
    """A resolved hyper-parameter, preferring the run's `export_info` over its `hparams`."""
    for section in ("export_info", "hparams"):
        value = (config.get(section) or {}).get(name)
        if value is not None:
            return value
    raise ExportError(f"{RUN_CONFIG} records no '{name}' (in export_info or hparams)")


def expected_shapes(form: dict[str, Any], d_in: int, d_sae: int) -> dict[str, tuple[int, ...]]:
    """Every tensor an export of this form holds, with the shape SAELens loads."""
    shapes: dict[str, tuple[int, ...]] = {"b_dec": (d_in,)}
    for suffix, n in form["dictionaries"].items():
        shapes |= {f"W_enc{suffix}": (d_in, n), f"W_dec{suffix}": (n, d_in), f"b_enc{suffix}": (n,)}
    return shapes | {name: (d_sae,) for name in form["per_latent"]}


def check_shapes(
    arrays: dict[str, np.ndarray], form: dict[str, Any], d_in: int, d_sae: int
) -> None:
    """Every tensor the form needs, no others, each with the shape SAELens loads."""
    shapes = expected_shapes(form, d_in, d_sae)
    missing, extra = shapes.keys() - arrays.keys(), arrays.keys() - shapes.keys()
    if missing or extra:
        raise ExportError(
            f"{RUN_WEIGHTS} does not match architecture '{form['architecture']}': "
            f"missing {sorted(missing)}, unexpected {sorted(extra)}"
        )
    for suffix, n in form["dictionaries"].items():
        if suffix and (n == 0 or d_sae % n):
            raise ExportError(
                f"{form['architecture']} has {d_sae} base and {n} concept latents; the base count "
                "must be a multiple of the concept count (contiguous children per concept)"
            )
    for name in arrays:
        if arrays[name].shape != shapes[name]:
            raise ExportError(
                f"{name} has shape {arrays[name].shape}, expected {shapes[name]} for "
                f"d_in={d_in}, d_sae={d_sae} from {RUN_CONFIG}"
            )
        if not np.all(np.isfinite(arrays[name])):
            raise ExportError(f"{name} holds NaN or inf; the run diverged - do not export it")


# ------------------------------------------------------------------------------------------------
# folding
# ------------------------------------------------------------------------------------------------


def fold_input_scale(arrays: dict[str, np.ndarray], scale: float) -> dict[str, np.ndarray]:
    """Weights acting on raw x for an SAE trained on s * x (derivation in the module docstring)."""
    if not scale > 0:
        raise ExportError(f"norm_scale must be positive, got {scale}")
    return {
        name: a if name.startswith(("W_enc", "W_dec")) else a / np.float32(scale)
        for name, a in arrays.items()
    }


def unit_norm_decoder(arrays: dict[str, np.ndarray], form: dict[str, Any]) -> dict[str, np.ndarray]:
    """Renormalise decoder rows to 1, moving each row norm into its latent's encoder side."""
    out = dict(arrays)
    for suffix in form["dictionaries"]:
        norms = np.linalg.norm(arrays[f"W_dec{suffix}"].astype(np.float64), axis=1)
        if np.any(norms == 0):
            raise ExportError(f"W_dec{suffix} has all-zero rows; they cannot be unit-normalised")
        deviation = float(np.max(np.abs(norms - 1.0)))
        if form["ranks_latents"] and deviation > UNIT_NORM_ATOL:
            raise ExportError(
                f"W_dec{suffix} rows deviate from unit norm by up to {deviation:.2e}; for a "
                f"{form['architecture']} encoder that cannot be folded exactly - train with "
                "decoder normalisation (the default)"
            )
        out[f"W_dec{suffix}"] = (arrays[f"W_dec{suffix}"] / norms[:, None]).astype(np.float32)
        out[f"W_enc{suffix}"] = (arrays[f"W_enc{suffix}"] * norms[None, :]).astype(np.float32)
        out[f"b_enc{suffix}"] = (arrays[f"b_enc{suffix}"] * norms).astype(np.float32)
        for name in form["per_latent"] if suffix == "" else ():
            out[name] = (arrays[name] * norms).astype(np.float32)
    return out


# ------------------------------------------------------------------------------------------------
# the SAELens config
# ------------------------------------------------------------------------------------------------


def transformer_lens_name(model: str) -> str:
    """TransformerLens's name for a HF model id or local folder: `google/gemma-2-2b` ->
    `gemma-2-2b`, `models/tiny-gemma2` -> `tiny-gemma2` (the same rule TransformerLens applies)."""
    return model.rstrip("/").split("/")[-1]


def saelens_config(config: dict[str, Any], form: dict[str, Any], d_in: int, d_sae: int) -> dict:
    """The `cfg.json` SAELens 6 loads (strict about architecture fields, lenient about metadata)."""
    layer = _require(config, "layer")
    prepend_bos = config.get("prepend_bos")  # None: not recorded; Gemma runs with a BOS
    metadata = {
        "model_name": transformer_lens_name(_require(config, "model_name")),
        "hook_name": config.get("hook_name") or f"blocks.{layer}.hook_resid_post",
        "hook_layer": layer,
        "hook_head_index": None,
        "context_size": _require(config, "ctx_len"),
        "prepend_bos": True if prepend_bos is None else bool(prepend_bos),
        "dataset_path": config.get("dataset") or "",
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "sae_lens_training_version": None,
        "trained_with": "jax-sae-lab",
        "variant": _require(config, "variant"),
        "folded_norm_scale": float(config.get("norm_scale", 1.0)),
    }
    cfg: dict[str, Any] = {
        "architecture": form["architecture"],
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": metadata,
    }
    return cfg | form["saelens_config"]


# ------------------------------------------------------------------------------------------------
# export
# ------------------------------------------------------------------------------------------------


def export_run(
    run_dir: str | Path, out: str | Path | None = None, force: bool = False, replace: bool = False
) -> Path:
    """Write the SAELens export of `run_dir` to `out` (default `run_dir/saelens`); returns `out`.

    `replace` allows replacing an existing `out`, but only an earlier export of this same run
    (`replaceable_export`); `force` also allows exporting a diverged or unfinished run."""
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / EXPORT_DIR
    check_out_folder(run_dir, out, replace=force or replace)
    problem = status_problem(run_dir)
    if problem is not None and not force:
        raise ExportError(f"{problem}; pass --force to export its weights anyway")
    if problem is not None:
        print(f"warning: exporting anyway (--force): {problem}", file=sys.stderr)
    config, arrays = read_run(run_dir)
    form = export_form(config, arrays)
    d_in, d_sae = int(_require(config, "d_in")), int(_require(config, "d_sae"))
    check_shapes(arrays, form, d_in, d_sae)
    if "threshold" in arrays and np.any(arrays["threshold"] < 0):
        raise ExportError("JumpReLU threshold has negative entries; SAELens assumes theta >= 0")
    arrays = fold_input_scale(arrays, float(config.get("norm_scale", 1.0)))
    arrays = unit_norm_decoder(arrays, form)
    cfg = saelens_config(config, form, d_in, d_sae)
    cfg["metadata"][EXPORTED_FROM] = source_of(run_dir, config)
    try:
        _write_atomically(out, cfg, arrays)
    except OSError as error:
        if not is_disk_full(error):
            raise
        needed = sum(a.nbytes for a in arrays.values())
        raise ExportError(str(disk_full_error(out, needed, error, "export again"))) from error
    return out


# ------------------------------------------------------------------------------------------------
# which folders the exporter may replace
# ------------------------------------------------------------------------------------------------


def source_of(run_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
    """What identifies the run an export came from: its folder and its config hash."""
    return {"run": str(run_dir.resolve()), "config_hash": config.get("config_hash")}


def replaceable_export(run_dir: Path, out: Path) -> str | None:
    """Why the existing `out` must not be replaced, or None when it is an earlier export of
    `run_dir`: a plain folder holding only export files, whose `cfg.json` names this exporter
    and this run. The run's own `saelens/` folder from before exports recorded their source
    counts as this run's. An empty folder holds nothing to lose."""
    if out.is_symlink() or not out.is_dir():
        return f"{out} exists and is not a folder"
    contents = {p.name for p in out.iterdir()}
    if not contents:
        return None
    foreign = sorted(contents - {EXPORT_CONFIG, EXPORT_WEIGHTS})
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        return f"{out} holds files that no export writes ({shown})"
    try:
        metadata = json.loads((out / EXPORT_CONFIG).read_text()).get("metadata") or {}
    except (OSError, ValueError, AttributeError):
        return f"{out} has no readable {EXPORT_CONFIG}, so it is not an export of this project"
    if metadata.get("trained_with") != "jax-sae-lab":
        return f"{out} is not an export written by this project"
    recorded = metadata.get(EXPORTED_FROM)
    if recorded is None:
        if out.resolve() == (run_dir / EXPORT_DIR).resolve():
            return None
        return f"{out} is an export that does not record its run"
    ours = source_of(run_dir, _read_config_or_empty(run_dir))
    same_hash = (
        ours["config_hash"] is not None and recorded.get("config_hash") == ours["config_hash"]
    )
    if same_hash or recorded.get("run") == ours["run"]:
        return None
    return f"{out} is the export of another run ({recorded.get('run')})"


def _read_config_or_empty(run_dir: Path) -> dict[str, Any]:
    try:
        config = json.loads((run_dir / RUN_CONFIG).read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def check_out_folder(run_dir: Path, out: Path, replace: bool) -> None:
    """Refuse an `out` that is the run, holds the run, or exists and may not be replaced."""
    run_abs, out_abs = run_dir.resolve(), out.resolve()
    if out_abs == run_abs or out_abs in run_abs.parents:
        raise ExportError(
            f"--out {out} would replace the run folder {run_dir} (or a folder holding it); "
            f"choose a new folder, e.g. the default {run_dir / EXPORT_DIR}"
        )
    if not (out.exists() or out.is_symlink()):
        return
    if not replace:
        raise ExportError(f"{out} already exists; pass --replace to replace it")
    why_not = replaceable_export(run_dir, out)
    if why_not is not None:
        raise ExportError(
            f"{why_not}; --replace only replaces an earlier export of this run - "
            "choose another --out (nothing was deleted)"
        )


def _write_atomically(out: Path, cfg: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Write into a sibling temp folder, then swap it in: an old export survives any failure.

    Only folders this call creates are removed: the temp folder, and the holder that the old
    export (already checked by `check_out_folder`) is moved into before it is deleted."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.new.", dir=out.parent))
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, tmp / EXPORT_WEIGHTS)
        (tmp / EXPORT_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
        _apply_umask(tmp)
        if out.exists():
            holder = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, holder / out.name)
            os.replace(tmp, out)
            shutil.rmtree(holder)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _apply_umask(folder: Path) -> None:
    """Give the export the permissions of any folder the user makes (mkdtemp makes it 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for file in folder.iterdir():
        file.chmod(0o666 & ~umask)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="run folder written by train.py")
    parser.add_argument("--out", type=Path, help=f"export folder (default RUN_DIR/{EXPORT_DIR})")
    parser.add_argument(
        "--replace",
        action="store_true",
        help="replace an earlier export of this run (never any other folder)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="as --replace, and export a diverged or unfinished run too",
    )
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error already printed as one line
        return int(exit_.code or 0)
    try:
        out = export_run(args.run_dir, args.out, force=args.force, replace=args.replace)
    except (ExportError, DamagedFileError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"exported {args.run_dir} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
