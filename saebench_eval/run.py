"""Evaluate an exported run with SAEBench and merge the results into its `final_info.json`.

    python -m saebench_eval.run RUN_DIR [--evals core absorption ...] [--offline-model DIR]

Runs inside `.venv-eval` after `export_to_torch.py RUN_DIR` wrote `RUN_DIR/saelens/`. Each eval's
full SAEBench JSON goes to `RUN_DIR/eval_results/<eval>/`; `final_info.json` gets it (without the
per-latent details) under the standard `final_info.json` key, e.g. "core evaluation results".

Online (default), the evals download gemma-2-2b(-it) and their datasets from the Hugging Face hub;
the hub is probed once first so an unreachable hub is one clear error, not SAEBench's retries and
empty results. Offline (`--offline-model models/tiny-gemma2`), core runs on the local model and a
local `.jsonl` corpus, and meta_structure needs no model at all.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from jax_sae.util.files import write_text_atomic

# Module level stays standard-library only: the checks below run (and are tested) without the
# heavy SAEBench imports, so a refusal comes at once.
OFFLINE_EVALS = ("core", "meta_structure")  # core on a local model; meta_structure needs no LLM
HUB_EVALS = ("absorption", "scr", "tpp", "sparse_probing", "unlearning", "autointerp")
DEFAULT_EVALS = ("core", "absorption", "scr", "tpp", "sparse_probing", "unlearning")
# the language model's settings per model (SAEBench's for Gemma); others run in float32
LLM_DEFAULTS = {"gemma-2-2b": {"dtype": "bfloat16", "batch_size": 32}}
HUB_PROBE_TIMEOUT_S = 5.0


class EvalSetupError(RuntimeError):
    """The evaluation cannot start as asked; the message names the problem and the fix."""


def hub_unreachable_reason(timeout_s: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """None when the hub answers, else why not. One short request: no retries, no hanging."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return "HF_HUB_OFFLINE is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        with urllib.request.urlopen(f"{endpoint}/api/models/gpt2", timeout=timeout_s):
            return None
    except urllib.error.HTTPError:
        return None  # the server answered (401/404 still prove reachability)
    except (urllib.error.URLError, TimeoutError, OSError) as error:
        reason = getattr(error, "reason", error)
        return f"{endpoint} is unreachable ({reason})"


def check_requested_evals(evals: list[str], offline: bool, api_key: str | None) -> None:
    """Refuse, before anything slow starts, evals that cannot run here."""
    known = OFFLINE_EVALS + HUB_EVALS
    unknown = [e for e in evals if e not in known]
    if unknown:
        raise EvalSetupError(f"unknown eval(s) {', '.join(unknown)}; known: {', '.join(known)}")
    if "autointerp" in evals and not api_key:
        raise EvalSetupError("autointerp needs an LLM judge: set OPENAI_API_KEY or drop autointerp")
    need_hub = [e for e in evals if e in HUB_EVALS]
    if offline and need_hub:
        raise EvalSetupError(
            f"{', '.join(need_hub)} need gemma-2-2b and datasets from the Hugging Face hub "
            f"(absorption also stops early on a tiny model); offline, run only: "
            f"{', '.join(OFFLINE_EVALS)}"
        )
    need_hub = [e for e in evals if e != "meta_structure"]
    if not offline and need_hub:
        reason = hub_unreachable_reason()
        if reason is not None:
            raise EvalSetupError(
                f"{reason}; {', '.join(need_hub)} download their model and datasets from it. "
                "Offline: pass --offline-model DIR with EVALS='core meta_structure'"
            )


def merge_into_final_info(run_dir: Path, key: str, result_path: Path) -> None:
    """Put one SAEBench result under `key`; per-latent details stay in the SAEBench file."""
    result = json.loads(result_path.read_text())
    result.pop("eval_result_details", None)
    result["result_file"] = os.path.relpath(result_path, run_dir)
    info_path = run_dir / "final_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    info[key] = result
    write_text_atomic(info_path, json.dumps(info, indent=2) + "\n")


def offline_corpus(args: argparse.Namespace, run_dir: Path) -> Path:
    """The local corpus: --dataset, else the run's own dataset when that is a local file."""
    if args.dataset is not None:
        return args.dataset
    recorded = json.loads((run_dir / "config.json").read_text()).get("dataset")
    if recorded and Path(recorded).is_file():
        return Path(recorded)
    raise EvalSetupError(
        f"the run's dataset ({recorded}) is not a local file; pass --dataset FILE.jsonl "
        "(a .jsonl with a 'text' field)"
    )


def run_evals(args: argparse.Namespace) -> list[str]:
    """Run each requested eval, merging results as they finish; returns the evals that failed."""
    import torch

    from saebench_eval import evals as sb
    from saebench_eval.saes import load_exported_sae

    run_dir: Path = args.run_dir
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sae_name = run_dir.resolve().name
    sae = load_exported_sae(run_dir / "saelens", sae_name, device)
    model_name = sae.cfg.model_name
    defaults = LLM_DEFAULTS.get(model_name, {"dtype": "float32", "batch_size": 32})
    llm = sb.LLMSettings(
        model_name=model_name,
        device=device,
        dtype=args.llm_dtype or ("float32" if args.offline_model else defaults["dtype"]),
        batch_size=args.llm_batch_size or defaults["batch_size"],
    )
    results_dir = run_dir / "eval_results"
    failed = []
    for name in args.evals:
        print(f"== SAEBench {name} on {sae_name} ({model_name}, {device})", flush=True)
        try:
            if name == "meta_structure":
                path = sb.run_meta_structure(
                    sae, sae_name, device, results_dir / name, args.meta_structure_steps
                )
            elif name == "core":
                path = _run_core(args, run_dir, sae, sae_name, llm, results_dir / name)
            else:
                api_key = os.environ.get("OPENAI_API_KEY")
                path = sb.run_hub_eval(name, sae, sae_name, llm, results_dir / name, api_key)
        except Exception as error:  # one eval's failure must not lose the others' results
            traceback.print_exc()
            print(f"error: {name} failed: {type(error).__name__}: {error}", file=sys.stderr)
            failed.append(name)
            continue
        merge_into_final_info(run_dir, sb.result_key(name), path)
        print(f"   {name} -> {path} and final_info.json['{sb.result_key(name)}']", flush=True)
    return failed


def _run_core(
    args: argparse.Namespace, run_dir: Path, sae: Any, sae_name: str, llm: Any, out_dir: Path
) -> Path:
    from transformer_lens import HookedTransformer

    from saebench_eval import evals as sb
    from saebench_eval.offline import hooked_transformer_from_folder, tokenized_corpus

    batches = {
        "batch_size_prompts": args.core_batch_size,
        "n_reconstruction_batches": args.core_reconstruction_batches,
        "n_sparsity_variance_batches": args.core_sparsity_variance_batches,
    }
    if args.offline_model is None:
        settings = sb.CoreSettings(**batches)
        model = HookedTransformer.from_pretrained_no_processing(
            llm.model_name, device=llm.device, dtype=llm.dtype
        )
        dataset: Any = settings.dataset
    else:
        model = hooked_transformer_from_folder(args.offline_model).to(llm.device)
        if model.cfg.model_name != llm.model_name or model.cfg.d_model != sae.cfg.d_in:
            raise EvalSetupError(
                f"the SAE was trained on {llm.model_name} (d_in {sae.cfg.d_in}), not on "
                f"{args.offline_model} (d_model {model.cfg.d_model})"
            )
        corpus = offline_corpus(args, run_dir)
        dataset = tokenized_corpus(corpus, model, sb.CoreSettings.context_size)
        # a local corpus is finite: evaluate each token at most once per metric group
        epoch = max(1, len(dataset) // args.core_batch_size)
        for key in ("n_reconstruction_batches", "n_sparsity_variance_batches"):
            batches[key] = min(batches[key], epoch)
        settings = sb.CoreSettings(dataset=str(corpus), **batches)
    return sb.run_core(sae, sae_name, model, dataset, settings, llm.dtype, out_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="run folder with an export in saelens/")
    parser.add_argument("--evals", nargs="+", default=list(DEFAULT_EVALS), help="SAEBench evals")
    parser.add_argument("--offline-model", type=Path, help="local model folder (no hub)")
    parser.add_argument("--dataset", type=Path, help="offline core corpus (.jsonl, 'text')")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--llm-dtype", choices=["float32", "bfloat16"], help="LLM dtype")
    parser.add_argument("--llm-batch-size", type=int, help="LLM batch size (prompts)")
    parser.add_argument("--core-batch-size", type=int, default=16, help="core prompts per batch")
    parser.add_argument("--core-reconstruction-batches", type=int, default=200)
    parser.add_argument("--core-sparsity-variance-batches", type=int, default=2000)
    parser.add_argument("--meta-structure-steps", type=int, help="default: SAEBench's 1500")
    args = parser.parse_args(argv)
    try:
        if not (args.run_dir / "saelens").is_dir():
            raise EvalSetupError(
                f"{args.run_dir} has no saelens/ export; run `python export_to_torch.py "
                f"{args.run_dir}` first (make export-eval does)"
            )
        check_requested_evals(args.evals, args.offline_model is not None,
                              os.environ.get("OPENAI_API_KEY"))  # fmt: skip
    except EvalSetupError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    failed = run_evals(args)
    if failed:
        print(f"error: SAEBench {', '.join(failed)} failed (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
