"""Research ideas against ground truth: synthetic worlds built with SAELens's synthetic
module (`synth/`), small enough for the CPU test budget."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse as sp
from safetensors.numpy import load_file
from scipy.stats import rankdata

import train
from jax_sae.data.cache import ActivationCache
from jax_sae.model.losses import hier_ortho
from jax_sae.model.variants import make_variant
from jax_sae.report.trained import read_trained
from synth import metrics
from tests.test_export import EVAL_PYTHON, REPO, eval_venv_env

pytestmark = pytest.mark.slow  # trains on synthetic worlds

D, FEATURES, TOKENS, BATCH = 64, 1024, 2**18, 2048
"""World size: one epoch is 128 steps of 2048 tokens (the trainer's default run length)."""
WORLDS = ("basic", "hierarchy", "temporal", "zipf")

BUILD_SCRIPT = """
import sys
from synth.make_world import main

root, worlds, size = sys.argv[1], sys.argv[2].split(","), sys.argv[3:]
for world in worlds:
    assert main(["--world", world, "--out", f"{root}/{world}", *size]) == 0
"""


@pytest.fixture(scope="module")
def worlds(tmp_path_factory) -> Path:
    if not EVAL_PYTHON.exists():
        pytest.skip(".venv-eval does not exist; create it with `make setup-eval`")
    root = tmp_path_factory.mktemp("research_worlds")
    size = ["--d-model", str(D), "--features", str(FEATURES), "--tokens", str(TOKENS), "--quiet"]
    proc = subprocess.run(
        [str(EVAL_PYTHON), "-c", BUILD_SCRIPT, str(root), ",".join(WORLDS), *size], cwd=REPO,
        env=eval_venv_env(root), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def train_at_defaults(
    world: Path, variant: str, out: Path, *sets: str, extra: tuple[str, ...] = ()
) -> dict:
    """A run of `train.py` at the defaults (one epoch unless `extra` says otherwise) but for the
    `--set` items in `sets`; its config.json."""
    argv = ["--cache", str(world), "--layer", "0", "--variant", variant, "--out", str(out)]
    argv += [arg for item in sets for arg in ("--set", item)] + list(extra)
    assert train.main([*argv, "--log-every", "32", "--checkpoint-every", "1000"]) == 0
    return json.loads((out / "config.json").read_text())


def test_jumprelu_reaches_its_target_l0_at_the_defaults(worlds, tmp_path):
    """JumpReLU: at the defaults, on normalised inputs, a default-length run brings L0 within
    25% of target_l0."""
    config = train_at_defaults(worlds / "basic", "jumprelu", tmp_path / "jumprelu")
    target = config["hparams"]["target_l0"]
    info = json.loads((tmp_path / "jumprelu" / "final_info.json").read_text())
    l0 = next(iter(info.values()))["fast evaluation results"]["l0"]
    assert abs(l0 / target - 1) <= 0.25, (l0, target)


def true_firing(world: Path) -> tuple[sp.csr_matrix, np.ndarray]:
    """Boolean [tokens, features] firing of the held-out tail's true codes, and the parents."""
    truth = load_file(world / "ground_truth.safetensors")
    return metrics.firing(metrics.heldout_codes(truth)), truth.get("parent")


def mann_whitney_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(positive > negative) + P(tie) / 2, from average ranks (the Mann-Whitney U statistic)."""
    ranks = rankdata(np.concatenate([positive, negative]))
    u = ranks[: len(positive)].sum() - len(positive) * (len(positive) + 1) / 2
    return float(u / (len(positive) * len(negative)))


def test_hier_ortho_weights_rank_planted_pairs_above_chance_cofirings(worlds):
    """hier_ortho: on the hierarchy world, with latents that are the true features (an oracle SAE of
    F = number of features, k = its mean L0), planted parent-child pairs get larger weights than
    other co-firing pairs (AUC >= 0.9), and fewer than half of co-firing pairs sit at c_max: the
    weights discriminate at the defaults (raw batch counts put every co-firing pair at c_max)."""
    fires, parent = true_firing(worlds / "hierarchy")
    n_features = fires.shape[1]
    hp = make_variant("hier_ortho", D, n_features, k=8).hparams
    chance = fires.sum() / fires.shape[0] / n_features
    related = np.zeros((n_features, n_features), bool)
    children = np.flatnonzero(parent >= 0)
    related[parent[children], children] = related[children, parent[children]] = True
    planted, other, at_cap, raw_at_cap = [], [], [], []
    for start in range(0, fires.shape[0] - BATCH + 1, BATCH):
        m = fires[start : start + BATCH].astype(np.float32)
        n_pair = (m.T @ m).toarray()
        n = np.diag(n_pair).copy()
        rows, cols = np.nonzero(np.triu(n_pair, 1))
        args = (jnp.asarray(n_pair[rows, cols]), jnp.asarray(n[rows]), jnp.asarray(n[cols]))
        w, _ = hier_ortho.competition_weights(
            *args, chance, hp["c_max"], "max", hp["prior_cofirings"]
        )
        raw, _ = hier_ortho.competition_weights(*args, chance, hp["c_max"], "max")
        w, is_planted = np.asarray(w), related[rows, cols]
        planted.append(w[is_planted])
        other.append(w[~is_planted])
        at_cap.append(w >= hp["c_max"])
        raw_at_cap.append(np.asarray(raw) >= hp["c_max"])
    planted, other = np.concatenate(planted), np.concatenate(other)
    assert len(planted) > 100 and len(other) > 100
    auc = mann_whitney_auc(planted, other)
    assert auc >= 0.9, auc
    assert np.concatenate(at_cap).mean() < 0.5
    assert np.concatenate(raw_at_cap).mean() > 0.9  # what the smoothing fixes


def heldout_scores(world: Path, run: Path) -> dict[str, float | None]:
    """The run's SAE on the world's held-out tokens against the ground truth (synth.metrics)."""
    trained = read_trained(run)
    config, v, params = trained.config, trained.variant, trained.params
    truth = load_file(world / "ground_truth.safetensors")
    offset, n_heldout = int(truth["heldout_offset"][0]), len(truth["heldout_indptr"]) - 1
    cache = ActivationCache(world)
    acts = cache.acts(0)[offset : offset + n_heldout] * config["norm_scale"]
    codes = np.concatenate(
        [
            np.asarray(v.encode(params, acts[i : i + BATCH], trained.state))
            for i in range(0, len(acts), BATCH)
        ]
    )
    fires, true_fires = metrics.firing(codes), true_firing(world)[0]
    # two_level codes are [base, concept]: its dictionary is both decoders, in that order
    decoder = np.concatenate([np.asarray(params[k]) for k in ("W_dec", "W_dec_c") if k in params])
    scores = {
        "l0": float(np.mean(np.diff(fires.indptr))),
        "cofiring_cos": metrics.cofiring_decoder_cos(fires, decoder),
        "jaccard": metrics.adjacent_jaccard(fires, cache.positions()[offset : offset + len(acts)]),
        "spread": metrics.firing_rate_spread(fires)["std_log10_rate"],
    }
    if "parent" in truth:
        latent_of = metrics.best_latents(decoder, truth["feature_vectors"])
        scores["absorption"] = metrics.absorption(true_fires, fires, truth["parent"], latent_of)[
            "rate"
        ]
    return scores


@pytest.fixture(scope="module")
def hierarchy_runs(worlds, tmp_path_factory) -> dict[str, dict]:
    """hier_ortho and two_level at their defaults and `topk` at each one's d_sae and k, two epochs
    of the hierarchy world, scored on its held-out tokens."""
    root, world = tmp_path_factory.mktemp("hierarchy_runs"), worlds / "hierarchy"
    epochs = f"--tokens={2 * TOKENS}"
    scores = {}
    for name in ("hier_ortho", "two_level"):
        config = train_at_defaults(world, name, root / name, extra=(epochs,))
        hp = config["hparams"]
        k = hp.get("k") or hp["k_b"] + hp["k_c"]
        matched = root / f"topk_for_{name}"
        train_at_defaults(world, "topk", matched, f"d_sae={config['d_sae']}", f"k={k}",
                          extra=(epochs,))  # fmt: skip
        scores[name], scores[f"topk_for_{name}"] = (
            heldout_scores(world, root / name),
            heldout_scores(world, matched),
        )
    return scores


def test_hier_ortho_lowers_the_overlap_of_cofiring_decoder_rows(hierarchy_runs):
    """The idea's own target at matched L0 (same d_sae and k): co-firing latents get more
    orthogonal decoder rows than plain TopK's."""
    idea, base = hierarchy_runs["hier_ortho"], hierarchy_runs["topk_for_hier_ortho"]
    assert idea["l0"] == pytest.approx(base["l0"], rel=0.05)
    assert idea["cofiring_cos"] < 0.95 * base["cofiring_cos"], (idea, base)


def test_two_level_does_not_absorb_less_than_topk_at_the_same_l0(hierarchy_runs):
    """A measured negative result: counted where the child's latent fires, two_level's parent
    latent is silent about as often as TopK's (within 10%) here, and more often at the bench's
    working point (benchmarks/SYNTH.md, d 256: 0.573 against 0.319)."""
    idea, base = hierarchy_runs["two_level"], hierarchy_runs["topk_for_two_level"]
    assert idea["l0"] == pytest.approx(base["l0"], rel=0.1)
    # measured on these d-64 worlds: 0.905 against 0.912, a tie; the old metric's -47% fails this
    assert idea["absorption"] >= 0.9 * base["absorption"], (idea, base)


def defaults_against_standard(world: Path, idea: str, root: Path) -> tuple[dict, dict, float]:
    """The idea and `standard`, both at their defaults (the same base: init, lambda, warm-up, lr),
    two epochs of `world`: their held-out scores and the idea's gradient share over L1's at the
    last logged interval."""
    scores = {}
    for name in (idea, "standard"):
        train_at_defaults(world, name, root / name, extra=(f"--tokens={2 * TOKENS}",))
        scores[name] = heldout_scores(world, root / name)
    last = [json.loads(line) for line in (root / idea / "metrics.jsonl").open()][-1]
    return scores[idea], scores["standard"], last[f"grad_share/{idea}"] / last["grad_share/l1"]


def test_pair_ortho_acts_but_leaves_cofiring_overlap_at_the_defaults(worlds, tmp_path):
    """A measured null result, asserted so that a change in it is noticed: on the hierarchy world
    (d 64, F = d = 64, L0 ~10) pair_ortho's term acts (gradient share 0.07x the L1 term's at the
    end) but the co-firing decoder overlap stays within 5% of `standard`'s (measured 0.158 against
    0.161, L0 10.5 against 10.5). benchmarks/SYNTH.md measures it at a working point (F = number
    of true features)."""
    idea, base, ratio = defaults_against_standard(worlds / "hierarchy", "pair_ortho", tmp_path)
    assert ratio > 0.02, ratio
    assert idea["l0"] == pytest.approx(base["l0"], rel=0.05)
    assert idea["cofiring_cos"] == pytest.approx(base["cofiring_cos"], rel=0.05), (idea, base)


def test_temporal_acts_but_does_not_raise_adjacent_stability_at_the_defaults(worlds, tmp_path):
    """A measured negative result: on the temporal world (d 64, F = d = 64) temporal's term acts
    (gradient share 0.9x the L1 term's at the end) and makes the code sparser (L0 11.4 against
    13.0), but adjacent tokens do not share more latents: Jaccard 0.488 against `standard`'s 0.508.
    benchmarks/SYNTH.md compares it at matched L0 and a working point."""
    idea, base, ratio = defaults_against_standard(worlds / "temporal", "temporal", tmp_path)
    assert 0.1 < ratio < 10, ratio
    assert idea["l0"] < base["l0"], (idea, base)
    assert idea["jaccard"] <= 1.02 * base["jaccard"], (idea, base)


def test_freq_weighting_changes_the_code_at_the_defaults(worlds, tmp_path):
    """freq (`freq_norm=mean`) against `standard` at the same lambda on the zipf world: the
    weighting acts. Each latent of average firing rate pays 1 + alpha = 1.5x the L1 weight, so
    the code is sparser; the logged gradient share of the weighting stays within 10x of L1's."""
    scores = {}
    for name in ("freq", "standard"):
        train_at_defaults(worlds / "zipf", name, tmp_path / name, extra=(f"--tokens={2 * TOKENS}",))
        scores[name] = heldout_scores(worlds / "zipf", tmp_path / name)
    records = [json.loads(line) for line in (tmp_path / "freq" / "metrics.jsonl").open()]
    ratio = records[-1]["grad_share/freq"] / records[-1]["grad_share/l1"]
    assert 0.1 < ratio < 10, ratio
    assert scores["freq"]["l0"] < 0.9 * scores["standard"]["l0"], scores
