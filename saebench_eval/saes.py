"""Load an export folder written by `export_to_torch.py` as the SAE object SAEBench evaluates."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sae_bench.custom_saes.custom_sae_config import CustomSAEConfig
from sae_bench.sae_bench_utils.general_utils import load_and_format_sae
from sae_lens import SAE

from jax_sae.export.torch_twins import EXPORT_CONFIG, EXPORT_WEIGHTS, load_twin


class ExportFolderError(ValueError):
    """An export folder that cannot be loaded; the message names the fix."""


def read_export_config(export_dir: Path) -> dict[str, Any]:
    if not (export_dir / EXPORT_CONFIG).is_file() or not (export_dir / EXPORT_WEIGHTS).is_file():
        raise ExportFolderError(
            f"{export_dir} is not an SAE export (needs {EXPORT_CONFIG} and {EXPORT_WEIGHTS}); "
            "run `python export_to_torch.py RUN_DIR` first"
        )
    return json.loads((export_dir / EXPORT_CONFIG).read_text())


def load_exported_sae(export_dir: str | Path, name: str, device: str = "cpu") -> Any:
    """The exported SAE with SAEBench's standardised `cfg` (hook layer, model name, ...).

    SAELens architectures go through `SAE.load_from_disk` (its strict loader is the check that the
    export is well-formed); one SAELens lacks becomes its torch twin with a SAEBench config.
    """
    export_dir = Path(export_dir)
    cfg = read_export_config(export_dir)
    twin = load_twin(export_dir)
    if twin is not None:
        sae = twin.to(device)
        meta = cfg["metadata"]
        sae.cfg = CustomSAEConfig(
            model_name=meta["model_name"],
            d_in=cfg["d_in"],
            d_sae=cfg["d_sae"],
            hook_layer=meta["hook_layer"],
            hook_name=meta["hook_name"],
            context_size=meta["context_size"],
            architecture=cfg["architecture"],
            apply_b_dec_to_input=True,
            prepend_bos=meta["prepend_bos"],
            dtype=cfg["dtype"],
            device=device,
            dataset_path=meta["dataset_path"],
        )
    else:
        sae = SAE.load_from_disk(export_dir, device=device)
    _, sae, _ = load_and_format_sae(name, sae, device)
    return sae
