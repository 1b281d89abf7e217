"""A trained SAE read back from its run folder: ``config.json`` -> the variant, and
``sae_params.safetensors`` -> its weights and the regulariser state that inference reads.

The trainer writes the weights under SAELens names together with the arrays its ``export_info``
keeps beside them (BatchTopK's and Matryoshka's inference threshold), and config.json the variant,
the sizes and every resolved hyper-parameter. ``read_trained`` inverts that, so anything that
needs the SAE a run trained (``jax_sae.SAE``, scores against a synthetic world's ground truth)
rebuilds it in one call and encodes exactly as the end of training did. A checkpoint step is
read by ``jax_sae.training.checkpoint.read_step`` (orbax belongs to the training layer).

Hyper-parameters that an older config.json lacks take today's defaults: none that was added
since changes inference (they steer initialisation and training only).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors.numpy import load_file

from jax_sae.model.architectures import Params, State
from jax_sae.model.variants import Variant, VariantError, make_variant
from jax_sae.report import runs

SAELENS_CONFIG = "cfg.json"  # what a SAELens export folder holds instead of config.json


class NotATrainedRunError(ValueError):
    """A folder that holds no SAE this code can read back; the message names the fix."""


@dataclass(frozen=True)
class TrainedSAE:
    """What a run folder holds of its SAE: config.json as read, the variant, its weights and the
    state inference reads, and the run's status (None for a folder from before status files)."""

    config: dict[str, Any]
    variant: Variant
    params: Params
    state: State
    status: str | None


def read_config(folder: Path) -> dict[str, Any]:
    """config.json of a run folder; NotATrainedRunError saying what the folder is instead."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotATrainedRunError(
            f"{folder} is not a folder; pass a run folder written by train.py"
        )
    if not (folder / runs.CONFIG).is_file():
        raise NotATrainedRunError(f"{folder} is not a run folder ({what_instead(folder)})")
    return runs.read_json(folder / runs.CONFIG)


def what_instead(folder: Path) -> str:
    """What a folder without config.json holds, and which folder to pass instead."""
    if (folder / "sweep.json").is_file():
        members = sorted(p.name for p in folder.iterdir() if (p / runs.CONFIG).is_file())
        example = f", e.g. {folder / members[0]}" if members else ""
        return f"it is a sweep of {len(members)} runs; pass one member's folder{example}"
    if (folder / SAELENS_CONFIG).is_file():
        return "it is a SAELens export; pass the run folder it was exported from"
    return (
        f"no {runs.CONFIG}; pass a folder written by train.py (runs/<name>), a sweep member, or "
        "a checkpoint step (runs/<name>/checkpoints/<step>)"
    )


def variant_of(config: Mapping[str, Any], where: Path | str = runs.CONFIG) -> Variant:
    """The variant a config.json describes, with the hyper-parameters it was trained with."""
    missing = [key for key in ("variant", "d_in", "d_sae") if config.get(key) is None]
    if missing:
        raise NotATrainedRunError(
            f"{where} lacks {', '.join(missing)}; it was not written by train.py, or is damaged"
        )
    try:
        return make_variant(
            config["variant"], config["d_in"], config["d_sae"], **(config.get("hparams") or {})
        )
    except VariantError as error:
        raise NotATrainedRunError(
            f"{where} describes an SAE this version cannot build ({error}); read it with the "
            "version that trained it (config.json 'versions')"
        ) from None


def param_names(variant: Variant) -> set[str]:
    """The names under which the variant's weights are stored (SAELens names), computed from
    shapes alone: nothing of the dictionary's size is allocated."""
    shapes = jax.eval_shape(variant.init_params, jax.random.key(0))
    placeholder = {key: np.broadcast_to(np.float32(1), s.shape) for key, s in shapes.items()}
    return set(variant.params_to_arrays(placeholder))


def weights_of(
    variant: Variant, arrays: Mapping[str, np.ndarray], where: Path | str = runs.PARAMS
) -> tuple[Params, State]:
    """(params, inference state) from the arrays of ``sae_params.safetensors``: the weights, and
    the arrays ``export_info`` stored beside them turned back into the state they came from."""
    names = param_names(variant)
    try:
        params = variant.params_from_arrays({k: v for k, v in arrays.items() if k in names})
        stored = {k: np.asarray(v) for k, v in arrays.items() if k not in names}
        state = variant.spec.architecture.inference_state(variant.init_state(), stored)
    except ValueError as error:  # VariantError, or a stored array that cannot be read back
        raise NotATrainedRunError(
            f"{where} does not hold a {variant.name} SAE of config.json's sizes ({error})"
        ) from None
    return params, state


def read_trained(folder: str | Path) -> TrainedSAE:
    """The SAE of a finished run (or a sweep member): config.json plus its final weights.

    NotATrainedRunError (one line, naming the fix) for a folder that is not a run, a run that has
    not written its final weights yet, or weights that do not match config.json."""
    folder = Path(folder)
    config = read_config(folder)
    weights = folder / runs.PARAMS
    if not weights.is_file():
        raise NotATrainedRunError(
            f"{folder} has no {runs.PARAMS}: training has not finished; load one of its "
            f"checkpoints ({folder / 'checkpoints'}/<step>) or resume the run until it finishes"
        )
    try:
        arrays = load_file(weights)
    except Exception as error:  # safetensors raises its own error type for a damaged file
        raise NotATrainedRunError(
            f"cannot read {weights} ({error}); resume the run to write it again"
        ) from None
    variant = variant_of(config, folder / runs.CONFIG)
    params, state = weights_of(variant, arrays, weights)
    status = runs.read_status(folder)
    return TrainedSAE(config, variant, params, state, status.get("state") if status else None)
