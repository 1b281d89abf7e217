"""Run SAEBench evaluations on one SAE with the reference configurations.

Every eval writes SAEBench's own result JSON under `out_dir/<eval>/` and returns its path. Core is
driven through SAEBench's `run_evals` with a model and dataset we hand it (a hub model and
openwebtext, or the local tiny model and corpus), instead of `multiple_evals`, which can only load
hub models and logs-and-skips every failure, leaving an empty result.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset
from sae_bench.evals.core import main as core
from sae_bench.evals.core.eval_config import CoreEvalConfig
from sae_bench.sae_bench_utils import get_eval_uuid, get_sae_bench_version, get_sae_lens_version
from sae_bench.sae_bench_utils.general_utils import get_results_filepath, str_to_dtype
from sae_lens.training.activations_store import ActivationsStore
from transformer_lens import HookedTransformer

SPARSE_PROBING_K_VALUES = [1, 2, 5, 10, 20, 50]
RANDOM_SEED = 42
CUSTOM_SAE_ID = "custom_sae"  # the id SAEBench gives an SAE passed as an object


def result_key(eval_name: str) -> str:
    """The `final_info.json` key, e.g. "sparse probing evaluation results"."""
    return f"{eval_name.replace('_', ' ')} evaluation results"


@dataclass(frozen=True)
class CoreSettings:
    """SAEBench core's reference configuration (`core.multiple_evals` at its defaults)."""

    dataset: str = "Skylion007/openwebtext"
    context_size: int = 128
    n_reconstruction_batches: int = 200
    n_sparsity_variance_batches: int = 2000
    batch_size_prompts: int = 16
    exclude_special_tokens: bool = True


@dataclass(frozen=True)
class LLMSettings:
    model_name: str  # TransformerLens name, e.g. "gemma-2-2b"
    device: str
    dtype: str  # "float32" | "bfloat16"
    batch_size: int


def special_token_ids(tokenizer: Any) -> set[int]:
    ids = (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id)
    return {i for i in ids if i is not None}


def run_core(
    sae: Any,
    sae_name: str,
    model: HookedTransformer,
    dataset: Dataset | str,
    settings: CoreSettings,
    llm_dtype: str,
    out_dir: Path,
) -> Path:
    """SAEBench core metrics (reconstruction, CE/KL, sparsity, feature density) for one SAE."""
    sae = sae.to(device=str(model.cfg.device), dtype=str_to_dtype(llm_dtype))
    store = ActivationsStore.from_sae(
        model,
        sae,
        dataset=dataset,
        context_size=settings.context_size,
        dataset_trust_remote_code=True,
        device=str(model.cfg.device),
    )
    store.shuffle_input_dataset(seed=RANDOM_SEED)
    config = CoreEvalConfig(
        model_name=sae.cfg.model_name,
        llm_dtype=llm_dtype,
        batch_size_prompts=settings.batch_size_prompts,
        n_eval_reconstruction_batches=settings.n_reconstruction_batches,
        n_eval_sparsity_variance_batches=settings.n_sparsity_variance_batches,
        dataset=settings.dataset,
        context_size=settings.context_size,
        compute_kl=True,
        compute_ce_loss=True,
        compute_l2_norms=True,
        compute_sparsity_metrics=True,
        compute_variance_metrics=True,
        compute_featurewise_density_statistics=True,
        compute_featurewise_weight_based_metrics=True,
        exclude_special_tokens_from_reconstruction=settings.exclude_special_tokens,
    )
    metrics, feature_metrics = core.run_evals(
        sae=sae,
        activation_store=store,
        model=model,
        eval_config=config,
        ignore_tokens=special_token_ids(model.tokenizer),
        verbose=True,
    )
    metrics["misc_metrics"] = core.calculate_misc_metrics(feature_metrics)
    result = {
        "eval_cfg": config,
        "metrics": metrics,
        "feature_metrics": feature_metrics,
        "sae_set": sae_name,
        "sae_id": CUSTOM_SAE_ID,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = Path(get_results_filepath(str(out_dir), sae_name, CUSTOM_SAE_ID))
    core.save_single_eval_result(
        core.replace_nans_with_negative_one(result),
        get_eval_uuid(),
        get_sae_lens_version(),
        get_sae_bench_version(),
        str(path),
        sae,
    )
    return path


def run_meta_structure(
    sae: Any, sae_name: str, device: str, out_dir: Path, train_steps: int | None = None
) -> Path:
    """SAEBench meta-structure: how well a small BatchTopK SAE compresses the decoder rows.
    `train_steps` None keeps the reference 1500; bf16 autocast only on GPU (slow on CPU)."""
    from sae_bench.evals.meta_structure.eval_config import MetaStructureEvalConfig
    from sae_bench.evals.meta_structure.main import run_eval

    config = MetaStructureEvalConfig(random_seed=RANDOM_SEED, autocast=device.startswith("cuda"))
    if train_steps is not None:
        config.train_steps = train_steps
    run_eval(config, [(sae_name, sae)], device, str(out_dir), force_rerun=True)
    return Path(get_results_filepath(str(out_dir), sae_name, CUSTOM_SAE_ID))


@dataclass(frozen=True)
class HubEval:
    """How to call one SAEBench eval that loads its own model and datasets from the hub."""

    package: str  # sae_bench.evals.<package>
    config_class: str
    config_overrides: dict[str, Any]
    run_kwargs: dict[str, Any]


_CLEANUP = {"clean_up_activations": True}  # cached LLM activations can reach tens of GB
HUB_EVALS = {
    "absorption": HubEval("absorption", "AbsorptionEvalConfig", {}, {}),
    "scr": HubEval("scr_and_tpp", "ScrAndTppEvalConfig", {"perform_scr": True}, _CLEANUP),
    "tpp": HubEval("scr_and_tpp", "ScrAndTppEvalConfig", {"perform_scr": False}, _CLEANUP),
    "sparse_probing": HubEval(
        "sparse_probing",
        "SparseProbingEvalConfig",
        {"k_values": SPARSE_PROBING_K_VALUES},
        _CLEANUP,
    ),
    "unlearning": HubEval("unlearning", "UnlearningEvalConfig", {}, {}),
    "autointerp": HubEval("autointerp", "AutoInterpEvalConfig", {}, {}),
}


def hub_eval_call(
    eval_name: str, sae: Any, sae_name: str, llm: LLMSettings, out_dir: Path, api_key: str | None
) -> tuple[Callable[..., Any], dict[str, Any]]:
    """SAEBench's `run_eval` for `eval_name` and its arguments, reference configuration included."""
    spec = HUB_EVALS[eval_name]
    config_class = getattr(
        importlib.import_module(f"sae_bench.evals.{spec.package}.eval_config"), spec.config_class
    )
    # SAEBench evaluates unlearning on the instruction-tuned model (gemma-2-2b-it)
    model_name = f"{llm.model_name}-it" if eval_name == "unlearning" else llm.model_name
    config = config_class(
        model_name=model_name,
        random_seed=RANDOM_SEED,
        llm_batch_size=llm.batch_size,
        llm_dtype=llm.dtype,
        **spec.config_overrides,
    )
    kwargs = {
        "config": config,
        "selected_saes": [(sae_name, sae)],
        "device": llm.device,
        "output_path": str(out_dir),
        "force_rerun": True,
        **spec.run_kwargs,
    }
    if eval_name != "absorption":  # absorption always writes to ./artifacts (see run_hub_eval)
        kwargs["artifacts_path"] = str(out_dir / "artifacts")
    if eval_name == "autointerp":
        kwargs["api_key"] = api_key
    return importlib.import_module(f"sae_bench.evals.{spec.package}.main").run_eval, kwargs


def run_hub_eval(
    eval_name: str, sae: Any, sae_name: str, llm: LLMSettings, out_dir: Path, api_key: str | None
) -> Path:
    """An eval that downloads its model and datasets from the hub (absorption, scr, tpp, ...)."""
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    sae = sae.to(device=llm.device, dtype=str_to_dtype(llm.dtype))
    run_eval, kwargs = hub_eval_call(eval_name, sae, sae_name, llm, out_dir, api_key)
    with contextlib.chdir(out_dir):  # keeps SAEBench's cwd-relative files out of the repository
        run_eval(**kwargs)
    return newest_result(out_dir, eval_name)


def newest_result(out_dir: Path, eval_name: str) -> Path:
    """The result JSON an eval just wrote (scr/tpp nest theirs one folder deeper)."""
    found = sorted(out_dir.rglob("*_eval_results.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise RuntimeError(
            f"SAEBench {eval_name} finished without writing a result in {out_dir}; "
            "see its log above for the failure it skipped"
        )
    return found[-1]
