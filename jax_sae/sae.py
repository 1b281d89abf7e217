"""``jax_sae.SAE``: a trained SAE in three lines, on raw activations.

    from jax_sae import SAE
    sae = SAE.load("runs/topk_L12")  # or SAE.from_pretrained("user/repo")
    codes, x_hat = sae.encode(x), sae(x)  # x: [..., d_in] activations at sae.hook_name

Why a module of its own, above the layers: the object joins what the layers keep apart. It
reads a run folder (``report.trained``), a checkpoint step (``training.checkpoint``, orbax) and
writes SAELens exports (``export.saelens``, which no layer may import: it stays JAX-free). Only a
module above all of them may import all of them, and no layer imports it
(``tests/test_layout.py``). ``jax_sae/__init__.py`` imports it on first use of ``jax_sae.SAE``,
so ``jax_sae.data`` and ``jax_sae.export`` stay importable without JAX.

The input scale is inside: a run trained on ``norm_scale * x`` (config.json), so ``encode``
multiplies by it and ``decode`` divides by it, and ``sae(x)`` is in the units of ``x``. The codes
are those of training (the SAELens export folds the scale into its weights instead, so its codes
are these divided by ``norm_scale``, and, where decoder rows are not unit-norm, multiplied by
each row's norm). BatchTopK and Matryoshka encode with the threshold learned in training (the
saved state), one token at a time, as their export does.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jax_sae.export.saelens import EXPORT_DIR, ExportError, export_run
from jax_sae.model.architectures import Params, State
from jax_sae.model.variants import Variant
from jax_sae.report import runs
from jax_sae.report.trained import (
    NotATrainedRunError,
    TrainedSAE,
    read_config,
    read_trained,
    variant_of,
)
from jax_sae.training.checkpoint import CheckpointError, read_step
from jax_sae.training.trainer import save_weights
from jax_sae.util.files import DamagedFileError

HUB_FILES = (runs.CONFIG, runs.PARAMS, runs.STATUS)
"""What ``push_to_hub`` uploads and ``from_pretrained`` downloads: all that ``load`` reads."""
CHECKPOINTS = "checkpoints"
CHECKPOINT_STEP = "checkpoint_step"
"""config.json entry of a folder saved from a checkpoint step: the step its weights are from."""
READ_ERRORS = (NotATrainedRunError, CheckpointError, DamagedFileError, ExportError)


class SAEError(ValueError):
    """A folder, step, repository or input the SAE cannot use; the message names the fix."""


def hub_problem(error: BaseException) -> str:
    """What went wrong with the hub, in a few words (its errors run to several lines of request
    details, and the first line alone, "404 Client Error.", does not say what was missing)."""
    from huggingface_hub import errors

    if isinstance(error, errors.RepositoryNotFoundError):
        return "no such repository, or a private one this token cannot read"
    if isinstance(error, errors.RevisionNotFoundError):
        return "no such revision"
    if isinstance(error, errors.LocalEntryNotFoundError | errors.OfflineModeIsEnabled):
        return "the hub is unreachable (or HF_HUB_OFFLINE is set) and nothing is in the cache"
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class SAE:
    """A trained SAE of any variant: ``encode``, ``decode`` and ``sae(x)`` on raw activations.

    Made by ``SAE.load`` (a run folder, a sweep member, a checkpoint step) or
    ``SAE.from_pretrained`` (a local folder or a Hugging Face hub repository)."""

    def __init__(self, trained: TrainedSAE, source: Path | None, step: int | None) -> None:
        self.config: dict[str, Any] = trained.config
        self.variant: Variant = trained.variant
        self.params: Params = trained.params
        self.state: State = trained.state
        self.status = trained.status
        self.source = source
        """The run folder read (its final weights), or the run of the checkpoint step."""
        self.step = step
        """The checkpoint step the weights are from; None for the run's final weights."""
        self.hub_repo: str | None = None
        """The hub repository ``from_pretrained`` downloaded it from (its files: ``source``)."""
        self.norm_scale = float(self.config.get("norm_scale") or 1.0)
        scale, variant = self.norm_scale, self.variant
        # the weights are arguments: a closure would bake them into the program as constants
        self._encode: Callable[..., jax.Array] = jax.jit(
            lambda params, state, x: variant.encode(params, x * scale, state)
        )
        self._decode: Callable[..., jax.Array] = jax.jit(
            lambda params, h: variant.decode(params, h) / scale
        )
        shape = jax.ShapeDtypeStruct((1, self.d_in), jnp.float32)
        self.d_code = int(jax.eval_shape(self._encode, self.params, self.state, shape).shape[-1])
        """Entries of a code: d_sae, or for ``two_level`` d_sae base plus its concept latents."""

    # --- loading ---------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path, step: int | None = None) -> SAE:
        """The SAE of a run folder or sweep member (its final weights), or of one checkpoint
        step: ``path`` ``runs/<name>/checkpoints/<step>``, or the run folder with ``step``.

        SAEError (one line, naming the fix) for anything else."""
        path = Path(path)
        if path.name.isdigit() and path.parent.name == CHECKPOINTS:
            if step is not None and step != int(path.name):
                raise SAEError(f"{path} is step {path.name}, not step {step}; pass one of them")
            path, step = path.parent.parent, int(path.name)
        try:
            if step is None:
                sae = cls(read_trained(path), path, None)
            else:
                sae = cls(read_checkpoint(path, step), path, step)
        except READ_ERRORS as error:
            raise SAEError(str(error)) from error
        if sae.status not in (None, runs.FINISHED) and step is None:
            warnings.warn(
                f"{path} is marked {sae.status} in {runs.STATUS}; its weights are loaded as saved",
                stacklevel=2,
            )
        return sae

    @classmethod
    def from_pretrained(
        cls,
        repo_or_dir: str | Path,
        *,
        subfolder: str | None = None,
        revision: str | None = None,
        token: str | None = None,
        cache_dir: str | Path | None = None,
    ) -> SAE:
        """``load`` of a local folder (offline), else of a hub repository written by
        ``push_to_hub``: only the files ``load`` reads are downloaded (``HUB_FILES``, under
        ``subfolder`` when the repository holds several SAEs)."""
        local = Path(repo_or_dir)
        if local.exists():
            return cls.load(local / subfolder if subfolder else local)
        from huggingface_hub import snapshot_download  # only the hub methods need the client

        prefix = f"{subfolder.strip('/')}/" if subfolder else ""
        try:
            snapshot = snapshot_download(
                repo_id=str(repo_or_dir),
                revision=revision,
                token=token,
                cache_dir=cache_dir,
                allow_patterns=[prefix + name for name in HUB_FILES],
            )
        except (OSError, ValueError) as error:  # hub, network and repo-id errors
            raise SAEError(
                f"{repo_or_dir} is neither a local folder nor a hub repository this machine "
                f"can download ({hub_problem(error)}); check the path or repository id, and for a "
                "private repository HF_TOKEN"
            ) from error
        folder = Path(snapshot) / prefix
        if not (folder / runs.CONFIG).is_file():
            where = f"{repo_or_dir}" + (f" (subfolder {subfolder})" if subfolder else "")
            raise SAEError(
                f"hub repository {where} holds no {runs.CONFIG}: it is not an SAE pushed with "
                "jax_sae.SAE.push_to_hub (or pass the subfolder that holds one)"
            )
        sae = cls.load(folder)
        sae.hub_repo = str(repo_or_dir)
        return sae

    # --- inference -------------------------------------------------------------------------

    def encode(self, x: Any) -> jax.Array:
        """Codes [..., d_code] of raw activations x [..., d_in] (numpy, JAX, any float type):
        the variant's inference encoder applied to ``x * norm_scale``."""
        batch, lead = self._rows(x, self.d_in, "x")
        return self._encode(self.params, self.state, batch).reshape(*lead, self.d_code)

    def decode(self, h: Any) -> jax.Array:
        """The reconstruction [..., d_in] of codes h [..., d_code], in the units of the raw x."""
        batch, lead = self._rows(h, self.d_code, "h")
        return self._decode(self.params, batch).reshape(*lead, self.d_in)

    def __call__(self, x: Any) -> jax.Array:
        """The reconstruction of raw activations x, in their units: ``decode(encode(x))``."""
        return self.decode(self.encode(x))

    def _rows(self, a: Any, width: int, name: str) -> tuple[jax.Array, tuple[int, ...]]:
        """``a`` as float32 rows [n, width], and its leading shape."""
        array = jnp.asarray(a, jnp.float32)
        if array.ndim == 0 or array.shape[-1] != width:
            what = (
                f"{self.hook_name} activations of {self.config.get('model_name')}"
                if name == "x"
                else "codes of this SAE"
            )
            raise SAEError(
                f"{name} has shape {tuple(array.shape)}; expected [..., {width}] ({what})"
            )
        return array.reshape(-1, width), tuple(array.shape[:-1])

    # --- what it is --------------------------------------------------------------------------

    @property
    def d_in(self) -> int:
        return self.variant.d_in

    @property
    def d_sae(self) -> int:
        return self.variant.d_sae

    @property
    def hook_name(self) -> str:
        """Where its inputs come from: TransformerLens's name, e.g. blocks.12.hook_resid_post."""
        return str(self.config.get("hook_name") or f"blocks.{self.config.get('layer')}")

    def __repr__(self) -> str:
        where = f"{self.source}" + (f" step {self.step}" if self.step is not None else "")
        return (
            f"SAE({self.variant.name}, d_in={self.d_in}, d_sae={self.d_sae}, "
            f"hook={self.hook_name}, norm_scale={self.norm_scale:.4g}, from {where})"
        )

    # --- writing -----------------------------------------------------------------------------

    def save(self, folder: str | Path) -> Path:
        """Write a folder that ``load`` reads back: config.json and sae_params.safetensors (and
        status.json): the run's own files for final weights, written afresh for a checkpoint
        step (config.json then records ``checkpoint_step``). Refuses a folder that exists and is
        not empty: it may be a run."""
        folder = Path(folder)
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise SAEError(f"{folder} exists and is not an empty folder; choose a new folder")
        folder.mkdir(parents=True, exist_ok=True)
        if self.step is None and self.source is not None:
            for name in HUB_FILES:
                if (self.source / name).is_file():
                    shutil.copyfile(self.source / name, folder / name)
            return folder
        info = save_weights(folder, self.variant, self.params, self.state)
        config = self.config | {
            "export_info": info,
            "export_form": self.variant.export_form(),
            CHECKPOINT_STEP: self.step,
        }
        runs.write_json(folder / runs.CONFIG, config)
        return folder

    def to_saelens(
        self, out_dir: str | Path | None = None, *, replace: bool = False, force: bool = False
    ) -> Path:
        """The SAELens export (``jax_sae.export.saelens.export_run``: cfg.json and
        sae_weights.safetensors, the input scale folded in) in ``out_dir``, by default the run's
        ``saelens/`` (for a checkpoint step: ``saelens_step<N>/``). ``replace`` replaces an
        earlier export of this run; ``force`` also exports a diverged or unfinished run."""
        if out_dir is None and self.hub_repo is not None:
            raise SAEError(
                f"an SAE from hub repository {self.hub_repo} has no run folder to export into "
                "(its files are in the hub's cache); pass out_dir"
            )
        try:
            if self.step is None and self.source is not None:
                return export_run(self.source, out_dir, force=force, replace=replace)
            default = f"{EXPORT_DIR}_step{self.step}"
            out = Path(out_dir) if out_dir is not None else Path(self.source or ".") / default
            with tempfile.TemporaryDirectory(prefix=".sae_step.") as tmp:
                staged = self.save(Path(tmp) / f"step_{self.step}")
                return export_run(staged, out, force=force, replace=replace)
        except ExportError as error:
            raise SAEError(str(error)) from error

    def push_to_hub(
        self,
        repo_id: str,
        *,
        path_in_repo: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
    ) -> str:
        """Upload what ``from_pretrained`` needs (``save``'s files) to hub repository
        ``repo_id`` (created if missing), under ``path_in_repo`` if given; returns the commit
        URL. The token is ``token``, else HF_TOKEN or the saved login."""
        from huggingface_hub import HfApi  # only the hub methods need the client

        api = HfApi(token=token)
        message = commit_message or f"Upload {self.variant.name} SAE ({self.hook_name})"
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix=".sae_push.") as tmp:
                folder = self.save(Path(tmp) / "sae")
                commit = api.upload_folder(
                    repo_id=repo_id,
                    folder_path=folder,
                    path_in_repo=path_in_repo,
                    revision=revision,
                    commit_message=message,
                )
        except (OSError, ValueError) as error:  # hub, network and repo-id errors
            raise SAEError(
                f"cannot push to hub repository {repo_id} ({hub_problem(error)}); check the id, "
                "the network, and that the token (token=, HF_TOKEN or `hf auth login`) may write"
            ) from error
        return str(getattr(commit, "commit_url", commit))  # str(commit) is the folder's URL


def read_checkpoint(run_dir: Path, step: int) -> TrainedSAE:
    """The SAE at checkpoint ``step`` of a run: its weights and regulariser state as saved."""
    config = read_config(run_dir)
    variant = variant_of(config, run_dir / runs.CONFIG)
    if not (run_dir / CHECKPOINTS).is_dir():
        raise SAEError(f"{run_dir} has no {CHECKPOINTS}/ folder; load its final weights (no step)")
    hashes = runs.accepted_hashes(config) if config.get("config_hash") else set()
    state = read_step(run_dir / CHECKPOINTS, step, variant, int(config["steps"]), hashes)
    status = runs.read_status(run_dir)
    return TrainedSAE(
        config,
        variant,
        state["params"],
        state["reg_state"],
        status.get("state") if status else None,
    )
