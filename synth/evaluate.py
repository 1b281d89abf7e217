"""Score a trained run against the ground truth of the synthetic world it was trained on.

    python -m synth.evaluate RUN_DIR [--world DIR] [--samples N]

Runs in `.venv-eval` after `export_to_torch.py RUN_DIR` wrote `RUN_DIR/saelens/` (the exported SAE
acts on raw activations: input normalisation is folded into its weights). The world is the run's
cache (`cache` in its config.json) unless --world names it. Two parts:

* SAELens's `eval_sae_on_synthetic_data` on fresh samples of the world's generator (MCC,
  uniqueness, per-latent classification, L0, dead latents, shrinkage, explained variance);
* `synth.metrics` on the held-out tail of the cache, whose true codes `ground_truth.safetensors`
  stores: absorption on planted hierarchies, adjacent-token Jaccard (SAE and truth), firing-rate
  spread (SAE and truth), and per-true-feature detection.

Results merge into `RUN_DIR/final_info.json` under "synthetic evaluation results" inside the
"training results for layer L" entry, keeping every other key.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from jax_sae.util.files import write_json_atomic
from synth import metrics
from synth.make_world import GROUND_TRUTH, MODEL_PREFIX, WORLD_DIR

RESULT_KEY = "synthetic evaluation results"
EXPORT_DIR = "saelens"
ENCODE_BATCH = 4096
REPO_ROOT = Path(__file__).resolve().parents[1]


class SynthEvalError(ValueError):
    """An evaluation that cannot run as asked; the message names the problem and the fix."""


def find_world(run_dir: Path, world: Path | None) -> Path:
    """The world folder: --world, else the run's cache (relative to the cwd or the repository)."""
    if world is None:
        config_file = run_dir / "config.json"
        if not config_file.is_file():
            raise SynthEvalError(f"{run_dir} has no config.json; pass a run folder from train.py")
        recorded = Path(json.loads(config_file.read_text()).get("cache") or "")
        world = recorded if recorded.is_absolute() or recorded.exists() else REPO_ROOT / recorded
    if not (world / GROUND_TRUTH).is_file() or not (world / WORLD_DIR).is_dir():
        raise SynthEvalError(
            f"{world} is not a synthetic world (no {GROUND_TRUTH} or {WORLD_DIR}/); train on a "
            "cache made by `make synth`, or pass --world DIR"
        )
    return world


def load_sae(export_dir: Path, device: str) -> Any:
    """The exported SAE: SAELens's loader, or the custom two_level module."""
    cfg_file = export_dir / "cfg.json"
    if not cfg_file.is_file():
        raise SynthEvalError(
            f"{export_dir} holds no export; run `python export_to_torch.py RUN_DIR --force` "
            "first (make synth-eval does)"
        )
    from jax_sae.export.torch_twins import load_twin

    twin = load_twin(export_dir)
    if twin is not None:
        return twin.to(device)
    from sae_lens import SAE

    return SAE.load_from_disk(export_dir, device=device)


def read_ground_truth(world: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(world / GROUND_TRUTH)


def sae_firing(sae: Any, acts: np.ndarray) -> sp.csr_matrix:
    """Boolean CSR of which SAE latents fire on each row of `acts` (raw activations)."""
    import torch

    parts = []
    with torch.no_grad():
        for start in range(0, len(acts), ENCODE_BATCH):
            x = torch.from_numpy(acts[start : start + ENCODE_BATCH]).to(sae.W_dec.device)
            parts.append(sp.csr_matrix((sae.encode(x) != 0).cpu().numpy()))
    return sp.vstack(parts, format="csr")


def heldout_metrics(sae: Any, world: Path, truth: dict[str, np.ndarray]) -> dict:
    """The `synth.metrics` results on the held-out cached tokens."""
    from jax_sae.data.cache import ActivationCache

    cache = ActivationCache(world)
    offset = int(truth["heldout_offset"][0])
    true_codes = metrics.heldout_codes(truth)
    end = offset + true_codes.shape[0]
    true_fires = metrics.firing(true_codes)
    sae_fires = sae_firing(sae, cache.acts(cache.layers[0])[offset:end])
    positions = cache.positions()[offset:end]
    latent_of = metrics.best_latents(
        sae.W_dec.detach().cpu().float().numpy(), truth["feature_vectors"]
    )
    result: dict[str, Any] = {"heldout_tokens": int(end - offset), "heldout_offset": offset}
    if "parent" in truth:
        pairs = metrics.absorption(true_fires, sae_fires, truth["parent"], latent_of)
        result["absorption"] = {"mean": pairs["mean"], "n_pairs": pairs["n_pairs"]}
    result["adjacent_jaccard"] = {
        "sae": metrics.adjacent_jaccard(sae_fires, positions),
        "ground_truth": metrics.adjacent_jaccard(true_fires, positions),
    }
    result["firing_rate_spread"] = {
        "sae": metrics.firing_rate_spread(sae_fires),
        "ground_truth": metrics.firing_rate_spread(true_fires),
    }
    result["true_feature_detection"] = metrics.detection(true_fires, sae_fires, latent_of)
    result["cofiring_decoder_cos"] = metrics.cofiring_decoder_cos(
        sae_fires, sae.W_dec.detach().cpu().float().numpy()
    )
    return result


def saelens_metrics(sae: Any, world: Path, samples: int, seed: int) -> dict:
    """SAELens's own synthetic-data evaluation on fresh samples of the world's generator."""
    import torch
    from sae_lens.synthetic import SyntheticModel, eval_sae_on_synthetic_data

    import synth.worlds  # noqa: F401  (registers the worlds' firing-probability law)

    model = SyntheticModel.load_from_disk(world / WORLD_DIR, device=str(sae.W_dec.device))
    torch.manual_seed(seed)
    result = eval_sae_on_synthetic_data(
        sae, model.feature_dict, model.activation_generator, num_samples=samples,
        batch_size=ENCODE_BATCH,
    )  # fmt: skip
    return result.to_dict() | {"num_samples": samples}


def merge_into_final_info(run_dir: Path, layer: int, result: dict) -> Path:
    """Put `result` under the layer's training entry; atomic, every other key kept."""
    info_path = run_dir / "final_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    entry = info.setdefault(f"training results for layer {layer}", {})
    entry[RESULT_KEY] = result
    write_json_atomic(info_path, info)
    return info_path


def evaluate_run(run_dir: Path, world: Path | None, samples: int, device: str) -> dict:
    """Score one run; returns the result that was merged into its final_info.json."""
    world = find_world(run_dir, world)
    sae = load_sae(run_dir / EXPORT_DIR, device)
    sae.eval()
    truth = read_ground_truth(world)
    d_world = truth["feature_vectors"].shape[1]
    if sae.W_dec.shape[1] != d_world:
        raise SynthEvalError(
            f"the SAE reads d_in {sae.W_dec.shape[1]}, the world {world} has d {d_world}; "
            "pass the world it was trained on with --world"
        )
    manifest = json.loads((world / "manifest.json").read_text())
    result = {
        "world": manifest.get("model_name", "").removeprefix(MODEL_PREFIX),
        "world_path": os.path.relpath(world.resolve(), run_dir.resolve()),
        "saelens": saelens_metrics(sae, world, samples, seed=0),
        **heldout_metrics(sae, world, truth),
    }
    layer = json.loads((run_dir / "config.json").read_text()).get("layer", 0)
    merge_into_final_info(run_dir, layer, result)
    return result


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def summary(result: dict) -> str:
    """One line per headline number."""
    s = result["saelens"]
    lines = [
        f"world {result['world']}: MCC {s['mcc']:.3f}  uniqueness {s['uniqueness']:.3f}  "
        f"L0 {s['sae_l0']:.1f} (true {s['true_l0']:.1f})  dead {s['dead_latents']}  "
        f"expl. var. {s['explained_variance']:.3f}  shrinkage {s['shrinkage']:.3f}",
        f"per-latent classification F1 {s['classification']['f1_score']:.3f}; per true feature "
        f"F1 {_fmt(result['true_feature_detection']['f1'])}",
    ]
    if "absorption" in result:
        a = result["absorption"]
        lines.append(f"absorption {_fmt(a['mean'])} over {a['n_pairs']} parent-child pairs")
    j, r = result["adjacent_jaccard"], result["firing_rate_spread"]
    lines.append(f"adjacent-token Jaccard: SAE {_fmt(j['sae'])}, truth {_fmt(j['ground_truth'])}")
    lines.append(
        f"std log10 firing rate: SAE {_fmt(r['sae']['std_log10_rate'])}, "
        f"truth {_fmt(r['ground_truth']['std_log10_rate'])}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="run folder with an export in saelens/")
    parser.add_argument("--world", type=Path, help="world folder (default: the run's cache)")
    parser.add_argument("--samples", type=int, default=65536, help="SAELens eval samples")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args(argv)
    try:
        if not (args.run_dir / "config.json").is_file():
            raise SynthEvalError(f"{args.run_dir} has no config.json; pass a train.py run folder")
        result = evaluate_run(args.run_dir, args.world, args.samples, args.device)
    except SynthEvalError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary(result))
    print(f"-> {args.run_dir / 'final_info.json'} ['{RESULT_KEY}']")
    return 0


if __name__ == "__main__":
    sys.exit(main())
