"""Research ideas against ground truth (SPEC 8): synthetic worlds built with SAELens's synthetic
module (`synth/`), small enough for the CPU test budget."""

from __future__ import annotations

import subprocess
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse as sp
from safetensors.numpy import load_file
from scipy.stats import rankdata

from jax_sae.losses import hier_ortho
from jax_sae.variants import make_variant
from tests.test_export import EVAL_PYTHON, REPO, eval_venv_env

D, FEATURES, TOKENS, BATCH = 64, 1024, 65536, 2048


@pytest.fixture(scope="module")
def worlds(tmp_path_factory) -> Path:
    if not EVAL_PYTHON.exists():
        pytest.skip(".venv-eval does not exist; create it with `make setup-eval`")
    root = tmp_path_factory.mktemp("research_worlds")
    for world in ("hierarchy",):
        args = ["--world", world, "--out", str(root / world), "--d-model", str(D)]
        args += ["--features", str(FEATURES), "--tokens", str(TOKENS), "--quiet"]
        proc = subprocess.run(
            [str(EVAL_PYTHON), "-m", "synth.make_world", *args], cwd=REPO,
            env=eval_venv_env(root), capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def true_firing(world: Path) -> tuple[sp.csr_matrix, np.ndarray]:
    """Boolean [tokens, features] firing of the held-out tail's true codes, and the parents."""
    truth = load_file(world / "ground_truth.safetensors")
    indptr = truth["heldout_indptr"]
    shape = (len(indptr) - 1, len(truth["parent"]))
    codes = sp.csr_matrix((truth["heldout_values"], truth["heldout_indices"], indptr), shape=shape)
    return sp.csr_matrix(codes > 0), truth["parent"]


def mann_whitney_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(positive > negative) + P(tie) / 2, from average ranks (the Mann-Whitney U statistic)."""
    ranks = rankdata(np.concatenate([positive, negative]))
    u = ranks[: len(positive)].sum() - len(positive) * (len(positive) + 1) / 2
    return float(u / (len(positive) * len(negative)))


def test_hier_ortho_weights_rank_planted_pairs_above_chance_cofirings(worlds):
    """SPEC 3.6: on the hierarchy world, with latents that are the true features (an oracle SAE of
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
