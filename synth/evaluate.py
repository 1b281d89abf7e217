"""Score a trained run against the ground truth of the synthetic world it was trained on.

    python -m synth.evaluate RUN_DIR [--world DIR] [--samples N]

Runs in `.venv-eval` after `export_to_torch.py RUN_DIR` wrote `RUN_DIR/saelens/` (the exported SAE
acts on raw activations: input normalisation is folded into its weights). The world is the run's
cache (`cache` in its config.json) unless --world names it. Two parts:

* SAELens's `eval_sae_on_synthetic_data` on fresh samples of the world's generator (MCC,
  uniqueness, per-latent classification, L0, dead latents, shrinkage, explained variance);
* `synth.metrics` on the held-out tail of the cache, whose true codes `ground_truth.safetensors`
  stores: absorption on planted hierarchies (with child recall and precision, and SAEBench's
  full-absorption rate), per-true-feature detection, and the structure metrics (adjacent-token
  Jaccard, co-firing decoder |cos|, firing-rate spread) beside the true features' own values;
* feature recovery (MCC, fraction of true features with a decoder row at |cos| > 0.9) beside the
  score of a random unit decoder of the same width: the chance line, meaningful only between
  SAEs of equal width.

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
CHANCE_SEED = 0  # the random unit decoder of the chance line
RECOVERY_COS = 0.9  # a true feature is recovered when some decoder row has |cos| above this


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


def sae_codes(sae: Any, acts: np.ndarray) -> sp.csr_matrix:
    """The SAE's latent activations [tokens, latents] on the rows of `acts` (raw activations)."""
    import torch

    parts = []
    with torch.no_grad():
        for start in range(0, len(acts), ENCODE_BATCH):
            x = torch.from_numpy(acts[start : start + ENCODE_BATCH]).to(sae.W_dec.device)
            parts.append(sp.csr_matrix(sae.encode(x).float().cpu().numpy()))
    return sp.vstack(parts, format="csr")


def absorption_metrics(
    true_codes: sp.csr_matrix,
    codes: sp.csr_matrix,
    decoder: np.ndarray,
    truth: dict[str, np.ndarray],
    latent_of: np.ndarray,
) -> dict:
    """Absorption where the child is detected, with the child detection it was measured on, and
    SAEBench's full-absorption rate (see `synth.metrics`)."""
    pairs = metrics.absorption(
        metrics.firing(true_codes), metrics.firing(codes), truth["parent"], latent_of
    )
    keys = ("rate", "child_recall", "child_precision", "n_pairs", "n_undetected")
    saebench = metrics.saebench_absorption(
        true_codes, codes, decoder, truth["feature_vectors"], truth["parent"], latent_of
    )
    return {key: pairs[key] for key in keys} | {"saebench_full": saebench}


def truth_structure(
    true_fires: sp.csr_matrix, true_directions: np.ndarray, positions: np.ndarray
) -> dict:
    """The structure metrics of the true features themselves: the same for every SAE scored on a
    world, so computed once per world in a process (SynthSAEBench-16k's 31M co-firing pairs take
    tens of seconds)."""
    key = (true_fires.shape, true_fires.nnz, hash(true_directions.tobytes()))
    if key not in _TRUTH:
        _TRUTH[key] = metrics.firing_rate_spread(true_fires) | {
            "adjacent_jaccard": metrics.adjacent_jaccard(true_fires, positions),
            "cofiring_decoder_cos": metrics.cofiring_decoder_cos(true_fires, true_directions),
        }
    return _TRUTH[key]


_TRUTH: dict[tuple, dict] = {}


def structure_metrics(
    true_fires: sp.csr_matrix,
    sae_fires: sp.csr_matrix,
    decoder: np.ndarray,
    true_directions: np.ndarray,
    positions: np.ndarray,
) -> dict:
    """Each structure metric as {"sae", "ground_truth", "distance"}: the distance is scored."""
    sae = metrics.firing_rate_spread(sae_fires)
    true = truth_structure(true_fires, true_directions, positions)
    return {
        "adjacent_jaccard": metrics.anchored(
            metrics.adjacent_jaccard(sae_fires, positions), true["adjacent_jaccard"]
        ),
        "cofiring_decoder_cos": metrics.anchored(
            metrics.cofiring_decoder_cos(sae_fires, decoder), true["cofiring_decoder_cos"]
        ),
        "firing_rate_spread": {
            "std_log10_rate": metrics.anchored(sae["std_log10_rate"], true["std_log10_rate"]),
            "frac_above_10x_median": metrics.anchored(
                sae["frac_above_10x_median"], true["frac_above_10x_median"]
            ),
            "n_live": {"sae": sae["n_live"], "ground_truth": true["n_live"]},
        },
    }


def heldout_metrics(sae: Any, world: Path, truth: dict[str, np.ndarray]) -> dict:
    """The `synth.metrics` results on the held-out cached tokens."""
    from jax_sae.data.cache import ActivationCache

    cache = ActivationCache(world)
    offset = int(truth["heldout_offset"][0])
    true_codes = metrics.heldout_codes(truth)
    end = offset + true_codes.shape[0]
    true_fires = metrics.firing(true_codes)
    codes = sae_codes(sae, cache.acts(cache.layers[0])[offset:end])
    sae_fires = metrics.firing(codes)
    decoder = sae.W_dec.detach().cpu().float().numpy()
    latent_of = metrics.best_latents(decoder, truth["feature_vectors"])
    result: dict[str, Any] = {"heldout_tokens": int(end - offset), "heldout_offset": offset}
    if "parent" in truth:
        result["absorption"] = absorption_metrics(true_codes, codes, decoder, truth, latent_of)
    result["true_feature_detection"] = metrics.detection(true_fires, sae_fires, latent_of)
    positions = cache.positions()[offset:end]
    return result | structure_metrics(
        true_fires, sae_fires, decoder, truth["feature_vectors"], positions
    )


def chance_scores(width: int, true_directions: np.ndarray) -> tuple[float, float]:
    """(MCC, recovered fraction) of `metrics.random_unit_decoder` of this width (seed
    CHANCE_SEED) against the true directions; computed once per world and width in a process,
    since a Hungarian matching of 4096 x 16384 takes tens of seconds."""
    key = (width, true_directions.shape, hash(true_directions.tobytes()))
    if key not in _CHANCE:
        import torch
        from sae_lens.synthetic import mean_correlation_coefficient

        chance = metrics.random_unit_decoder(width, true_directions.shape[1], seed=CHANCE_SEED)
        mcc = mean_correlation_coefficient(
            torch.from_numpy(chance).float(), torch.from_numpy(true_directions).float()
        )
        recovered = metrics.recovered_fraction(chance, true_directions, RECOVERY_COS)
        _CHANCE[key] = (mcc, recovered)
    return _CHANCE[key]


_CHANCE: dict[tuple, tuple[float, float]] = {}


def feature_recovery(decoder: np.ndarray, true_directions: np.ndarray, sae_mcc: float) -> dict:
    """MCC and the fraction of true features recovered at |cos| > RECOVERY_COS, each beside its
    chance line (`chance_scores`). MCC is decoder-only (Hungarian matching of |cos|), so no
    sampling is needed; the chance line grows with width, so `width` is recorded for comparisons
    to refuse unequal ones."""
    width, d = decoder.shape
    chance_mcc, chance_recovered = chance_scores(width, true_directions)
    return {
        "width": int(width),
        "d": int(d),
        "n_true_features": int(len(true_directions)),
        "mcc": {"sae": sae_mcc, "chance": chance_mcc},
        "recovered": {
            "sae": metrics.recovered_fraction(decoder, true_directions, RECOVERY_COS),
            "chance": chance_recovered,
        },
        "recovery_cos": RECOVERY_COS,
        "chance_seed": CHANCE_SEED,
    }


class StoredCodes:
    """SAELens's activation-generator interface (`sample(n)`) over stored true codes: each call
    returns the next n rows, dense, so its evaluation reads the cache's held-out samples."""

    def __init__(self, codes: sp.csr_matrix) -> None:
        self.codes, self.position = codes, 0

    def sample(self, n: int) -> Any:
        import torch

        rows = self.codes[self.position : self.position + n]
        if rows.shape[0] < n:
            raise SynthEvalError(f"asked for {n} more stored samples, {rows.shape[0]} are left")
        self.position += n
        return torch.from_numpy(rows.toarray()).float()


def saelens_metrics(
    sae: Any, world: Path, samples: int, seed: int, stored: sp.csr_matrix | None = None
) -> dict:
    """SAELens's own synthetic-data evaluation: on fresh samples of the world's generator, or on
    `stored` true codes (the held-out tail; SAELens's sampler draws ~240 samples/s on a CPU at
    SynthSAEBench-16k's size, and the cache's samples are drawn from the same distribution)."""
    import torch
    from sae_lens.synthetic import SyntheticModel, eval_sae_on_synthetic_data

    import synth.worlds  # noqa: F401  (registers the worlds' firing-probability law)

    model = SyntheticModel.load_from_disk(world / WORLD_DIR, device=str(sae.W_dec.device))
    torch.manual_seed(seed)
    generator = model.activation_generator if stored is None else StoredCodes(stored)
    if stored is not None:
        samples = min(samples, stored.shape[0])
    result = eval_sae_on_synthetic_data(
        sae, model.feature_dict, generator, num_samples=samples, batch_size=ENCODE_BATCH
    )
    source = "generator" if stored is None else "held-out"
    return result.to_dict() | {"num_samples": samples, "samples_from": source}


def merge_into_final_info(run_dir: Path, layer: int, result: dict) -> Path:
    """Put `result` under the layer's training entry; atomic, every other key kept."""
    info_path = run_dir / "final_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    entry = info.setdefault(f"training results for layer {layer}", {})
    entry[RESULT_KEY] = result
    write_json_atomic(info_path, info)
    return info_path


def evaluate_sae(sae: Any, world: Path, samples: int, heldout: bool = False) -> dict:
    """Every synthetic metric of a loaded SAE on a world cache. `heldout`: SAELens's evaluation
    reads the cache's held-out samples instead of drawing its own."""
    sae.eval()
    truth = read_ground_truth(world)
    d_world = truth["feature_vectors"].shape[1]
    if sae.W_dec.shape[1] != d_world:
        raise SynthEvalError(
            f"the SAE reads d_in {sae.W_dec.shape[1]}, the world {world} has d {d_world}; "
            "pass the world it was trained on with --world"
        )
    manifest = json.loads((world / "manifest.json").read_text())
    stored = metrics.heldout_codes(truth) if heldout else None
    saelens = saelens_metrics(sae, world, samples, seed=0, stored=stored)
    decoder = sae.W_dec.detach().cpu().float().numpy()
    return {
        "world": manifest.get("model_name", "").removeprefix(MODEL_PREFIX),
        "saelens": saelens,
        "feature_recovery": feature_recovery(decoder, truth["feature_vectors"], saelens["mcc"]),
        **heldout_metrics(sae, world, truth),
    }


def evaluate_run(
    run_dir: Path, world: Path | None, samples: int, device: str, heldout: bool = False
) -> dict:
    """Score one run; returns the result that was merged into its final_info.json."""
    world = find_world(run_dir, world)
    result = evaluate_sae(load_sae(run_dir / EXPORT_DIR, device), world, samples, heldout)
    result["world_path"] = os.path.relpath(world.resolve(), run_dir.resolve())
    layer = json.loads((run_dir / "config.json").read_text()).get("layer", 0)
    merge_into_final_info(run_dir, layer, result)
    return result


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def summary(result: dict) -> str:
    """One line per headline number; structure metrics as SAE / truth / distance."""
    s, r = result["saelens"], result["feature_recovery"]
    lines = [
        f"world {result['world']}: width {r['width']}, d {r['d']}, {r['n_true_features']} true "
        f"features; MCC {_fmt(r['mcc']['sae'])} (chance {_fmt(r['mcc']['chance'])}), recovered "
        f"at |cos| > {r['recovery_cos']} {_fmt(r['recovered']['sae'])} (chance "
        f"{_fmt(r['recovered']['chance'])}); compare only at equal width",
        f"uniqueness {s['uniqueness']:.3f}  L0 {s['sae_l0']:.1f} (true {s['true_l0']:.1f})  "
        f"dead {s['dead_latents']}  expl. var. {s['explained_variance']:.3f}  "
        f"shrinkage {s['shrinkage']:.3f}",
        f"per-latent classification F1 {s['classification']['f1_score']:.3f}; per true feature "
        f"F1 {_fmt(result['true_feature_detection']['f1'])}",
    ]
    if "absorption" in result:
        a, b = result["absorption"], result["absorption"]["saebench_full"]
        lines += [
            f"absorption {_fmt(a['rate'])} where the child is detected, over "
            f"{a['n_pairs'] - a['n_undetected']} of {a['n_pairs']} pairs ({a['n_undetected']} "
            f"never detected, left out); child recall {_fmt(a['child_recall'])}, precision "
            f"{_fmt(a['child_precision'])}",
            f"SAEBench-style full absorption {_fmt(b['rate'])} over {b['n_parents']} parents",
        ]
    spread = result["firing_rate_spread"]
    for label, m in (
        ("adjacent-token Jaccard", result["adjacent_jaccard"]),
        ("co-firing decoder |cos|", result["cofiring_decoder_cos"]),
        ("std log10 firing rate", spread["std_log10_rate"]),
    ):
        lines.append(
            f"{label}: SAE {_fmt(m['sae'])}, truth {_fmt(m['ground_truth'])}, "
            f"distance {_fmt(m['distance'])}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="run folder with an export in saelens/")
    parser.add_argument("--world", type=Path, help="world folder (default: the run's cache)")
    parser.add_argument("--samples", type=int, default=65536, help="SAELens eval samples")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--heldout", action="store_true",
                        help="SAELens's evaluation on the cache's held-out samples (at most "
                        "--samples), not fresh draws of its sampler: ~240 samples/s on a CPU "
                        "at 16k features")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        if not (args.run_dir / "config.json").is_file():
            raise SynthEvalError(f"{args.run_dir} has no config.json; pass a train.py run folder")
        result = evaluate_run(args.run_dir, args.world, args.samples, args.device, args.heldout)
    except SynthEvalError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary(result))
    print(f"-> {args.run_dir / 'final_info.json'} ['{RESULT_KEY}']")
    return 0


if __name__ == "__main__":
    sys.exit(main())
