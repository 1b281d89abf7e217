"""Synthetic worlds (synth.make_world) and their scoring (synth.evaluate, synth.metrics).

The worlds are built once, tiny (d 64, 256 features, 20k tokens), in one `.venv-eval` subprocess;
the metric functions are checked here against direct loops on hand-built cases; the scoring runs
end to end on hand-made SAEs whose answers are known: the oracle (decoder = true directions) and
one built to absorb every parent into its children.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from safetensors.numpy import load_file, save_file

from jax_sae.data.cache import ActivationCache
from jax_sae.export import saelens as ex
from synth import metrics
from tests.test_export import EVAL_PYTHON, REPO, eval_venv_env

pytestmark = pytest.mark.slow  # worlds and scores in .venv-eval

D, F, TOKENS, T, SHARD = 64, 256, 20000, 64, 8192
WORLDS = ("basic", "hierarchy", "temporal", "zipf")
SIZE = ["--d-model", str(D), "--features", str(F), "--tokens", str(TOKENS), "--seq-len", str(T)]
SIZE += ["--shard-tokens", str(SHARD), "--quiet"]

BUILD_SCRIPT = """
import json, sys
from jax_sae.data.cache import CacheWriter
from synth.make_world import main

root, size = sys.argv[1], json.loads(sys.argv[2])
for world in ("basic", "hierarchy", "temporal", "zipf"):
    assert main(["--world", world, "--out", f"{root}/{world}", *size]) == 0
assert main(["--world", "basic", "--out", f"{root}/basic_again", *size]) == 0
# a build killed after two shards, then resumed
write_shard = CacheWriter.write_shard
def dying(self, *args):
    if self.n_shards == 2:
        raise KeyboardInterrupt
    write_shard(self, *args)
CacheWriter.write_shard = dying
try:
    main(["--world", "basic", "--out", f"{root}/basic_resumed", *size])
except KeyboardInterrupt:
    pass
CacheWriter.write_shard = write_shard
assert main(["--world", "basic", "--out", f"{root}/basic_resumed", "--resume", *size]) == 0
"""


def run_eval_python(args: list[str], tmp: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(EVAL_PYTHON), *args], cwd=REPO, env=eval_venv_env(tmp), capture_output=True,
        text=True, timeout=timeout,
    )  # fmt: skip


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    if not EVAL_PYTHON.exists():
        pytest.skip(".venv-eval does not exist; create it with `make setup-eval`")
    root = tmp_path_factory.mktemp("worlds")
    proc = run_eval_python(["-c", BUILD_SCRIPT, str(root), json.dumps(SIZE)], root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def heldout_codes(world: Path) -> tuple[np.ndarray, dict]:
    """Dense true codes of the held-out tail, and the whole ground-truth file."""
    truth = load_file(world / "ground_truth.safetensors")
    return metrics.heldout_codes(truth).toarray(), truth


def direct_jaccard(active: np.ndarray) -> float:
    """Adjacent-token Jaccard by a plain loop (held-out tails start on a sequence start)."""
    values = []
    for t in range(len(active) - 1):
        if (t + 1) % T == 0:
            continue
        union = np.sum(active[t] | active[t + 1])
        if union:
            values.append(np.sum(active[t] & active[t + 1]) / union)
    return float(np.mean(values))


# ------------------------------------------------------------------------------------------------
# the worlds
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", WORLDS)
def test_world_is_a_readable_cache_with_ground_truth(built, world):
    cache = ActivationCache(built / world, verify=True)
    n = -(-TOKENS // T) * T
    assert cache.complete and cache.layers == [0] and cache.d_model == D and cache.n_tokens == n
    assert cache.manifest["model_name"] == f"synthetic-{world}"
    assert len(cache.shard_sizes) == -(-n // SHARD)
    assert np.array_equal(cache.positions()[:], np.tile(np.arange(1, T + 1), n // T))
    codes, truth = heldout_codes(built / world)
    offset = int(truth["heldout_offset"][0])
    assert offset % T == 0 and offset + len(codes) == n
    assert offset <= n - min(65536, n // 10)  # covers the trainer's held-out tail
    assert truth["feature_vectors"].shape == (F, D)
    # the cached activations are the true codes through the dictionary (bfloat16 storage)
    expected = codes @ truth["feature_vectors"] + truth["bias"]
    stored = cache.acts(0)[offset:]
    assert np.max(np.abs(stored - expected)) < 0.02 * np.max(np.abs(expected))
    # token ids: 1 + strongest true feature, 0 where none fires
    ids = np.where(codes.max(1) > 0, codes.argmax(1) + 1, 0)
    assert np.array_equal(cache.tokens()[offset:], ids)
    assert ("parent" in truth) == (world == "hierarchy")


@pytest.mark.parametrize("copy", ["basic_again", "basic_resumed"])
def test_builds_are_deterministic_and_resume_exactly(built, copy):
    files = [
        f for kind in ("L0", "tokens", "positions") for f in (built / "basic" / kind).iterdir()
    ]
    assert len(files) == 9
    for file in files + [built / "basic" / "manifest.json"]:
        assert file.read_bytes() == (built / copy / file.relative_to(built / "basic")).read_bytes()
    a, b = (load_file(built / w / "ground_truth.safetensors") for w in ("basic", copy))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_temporal_persistence_acts_and_keeps_the_firing_rates(built):
    jaccard = {}
    for world in ("basic", "temporal"):
        codes, truth = heldout_codes(built / world)
        jaccard[world] = direct_jaccard(codes > 0)
        # marginal rates stay p: fresh firings are drawn with p' = p(1-q)/(1-pq)
        rate, expected = (codes > 0).mean(0).sum(), truth["firing_probabilities"].sum()
        assert abs(rate / expected - 1) < 0.08, (world, rate, expected)
    assert jaccard["basic"] < 0.05 and jaccard["temporal"] > 0.5, jaccard


def test_zipf_firing_rates_are_heavy_tailed(built):
    spread = {}
    for world in ("basic", "zipf"):
        codes, _ = heldout_codes(built / world)
        rates = (codes > 0).mean(0)
        live = rates[rates > 0]
        spread[world] = (np.std(np.log10(live)), live.max() / np.median(live))
    assert spread["zipf"][0] > 2 * spread["basic"][0] and spread["zipf"][1] > 50, spread
    assert spread["basic"][1] < 20, spread


def test_hierarchy_children_need_their_parent_and_exclude_their_siblings(built):
    codes, truth = heldout_codes(built / "hierarchy")
    active, parent = codes > 0, truth["parent"]
    children = np.flatnonzero(parent >= 0)
    assert len(children) == 8 * 3 + 8 * 9  # F // 32 trees of 1 + 3 + 9 features
    assert not np.any(active[:, children] & ~active[:, parent[children]])
    for p in np.unique(parent[children]):
        assert active[:, parent == p].sum(1).max() == 1  # at most one child, and some fire
    assert active[:, children].any(0).mean() > 0.9


def test_existing_folders_are_refused_in_one_line(built, tmp_path):
    manifest = (built / "basic" / "manifest.json").read_bytes()
    cases = {
        "other world": ["--world", "zipf", "--out", str(built / "basic")],
        "same world": ["--world", "basic", "--out", str(built / "basic")],
    }
    other = tmp_path / "not_a_cache"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    cases["foreign folder"] = ["--world", "basic", "--out", str(other)]
    script = "import sys; from synth.make_world import main; sys.exit(main(sys.argv[1:]))"
    for name, args in cases.items():
        force = [] if name == "same world" else ["--force"]
        proc = run_eval_python(["-c", script, *args, *SIZE, *force], tmp_path)
        assert proc.returncode == 2, (name, proc.stderr)
        assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert (built / "basic" / "manifest.json").read_bytes() == manifest
    assert (other / "notes.txt").read_text() == "keep"


# ------------------------------------------------------------------------------------------------
# the metric functions on hand-built cases
# ------------------------------------------------------------------------------------------------


def test_absorption_on_hand_built_codes():
    rng = np.random.default_rng(0)
    parent = np.array([-1, 0, 0, -1, 3])  # 0 -> {1, 2}, 3 -> {4}
    true = np.zeros((400, 5), bool)
    true[:, 0] = rng.random(400) < 0.5
    kid = rng.integers(1, 3, 400)
    true[np.arange(400), kid] = true[:, 0] & (rng.random(400) < 0.6)  # one child at most
    true[:, 3] = rng.random(400) < 0.3
    true[:, 4] = true[:, 3] & (rng.random(400) < 0.5)
    latent_of = np.array([0, 1, 2, 3, 4])
    oracle = true.copy()
    absorbing = true.copy()
    absorbing[:, 0] &= ~(true[:, 1] | true[:, 2])  # the parent latent is silent under children
    absorbing[:, 3] &= ~true[:, 4]
    half = true.copy()
    half[:200, 3] &= ~true[:200, 4]  # pair (3, 4) absorbed on the first half only
    for sae, expected in ((oracle, 0.0), (absorbing, 1.0)):
        result = metrics.absorption(sp.csr_matrix(true), sp.csr_matrix(sae), parent, latent_of)
        assert result["n_pairs"] == 3 and result["mean"] == pytest.approx(expected)
    result = metrics.absorption(sp.csr_matrix(true), sp.csr_matrix(half), parent, latent_of)
    child = true[:, 4]
    direct = np.sum(child & ~half[:, 3] & half[:, 4]) / child.sum()
    assert result["per_pair"] == pytest.approx([0.0, 0.0, direct])
    assert 0.3 < direct < 0.7
    # the child latent must fire: a parent latent silent because the SAE is blind is no absorption
    blind = np.zeros_like(true)
    result = metrics.absorption(sp.csr_matrix(true), sp.csr_matrix(blind), parent, latent_of)
    assert result["mean"] == 0.0


def test_adjacent_jaccard_on_a_hand_made_sequence():
    active = np.array(
        [[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 1, 1], [0, 1, 1, 0]], bool
    )
    positions = np.array([1, 2, 3, 4, 1, 2])  # two sequences: (0-3), (4-5)
    # pairs (0,1): 1/3; (1,2): 0/2; (2,3): empty, skipped; (3,4): other sequence; (4,5): 2/3
    expected = np.mean([1 / 3, 0.0, 2 / 3])
    assert metrics.adjacent_jaccard(sp.csr_matrix(active), positions) == pytest.approx(expected)


def test_firing_rate_spread_and_detection():
    active = np.zeros((1000, 4), bool)
    active[:600, 0], active[:50, 1], active[:5, 2] = True, True, True  # feature 3 is dead
    spread = metrics.firing_rate_spread(sp.csr_matrix(active))
    assert spread["n_live"] == 3
    assert spread["std_log10_rate"] == pytest.approx(np.std(np.log10([0.6, 0.05, 0.005])))
    assert spread["frac_above_10x_median"] == pytest.approx(1 / 3)
    sae = np.zeros((1000, 2), bool)
    sae[:300, 0] = True  # latent 0 detects half of feature 0 and nothing false
    sae[:100, 1] = True  # latent 1 detects all of feature 1 with 50 false alarms
    result = metrics.detection(sp.csr_matrix(active[:, :2]), sp.csr_matrix(sae), np.array([0, 1]))
    f1 = [2 * 1 * 0.5 / 1.5, 2 * 0.5 * 1 / 1.5]
    assert result["precision"] == pytest.approx(0.75) and result["recall"] == pytest.approx(0.75)
    assert result["f1"] == pytest.approx(np.mean(f1))


def test_best_latents_matches_by_decoder_cosine():
    true = np.eye(3)
    decoder = np.array([[0, 0, 2.0], [1, 0.1, 0], [0.2, 1, 0.1], [-1, 0, 0]])
    assert metrics.best_latents(decoder, true).tolist() == [1, 2, 0]


# ------------------------------------------------------------------------------------------------
# synth.evaluate end to end on hand-made SAEs
# ------------------------------------------------------------------------------------------------


def fake_run(
    run_dir: Path, world: Path, w_enc, w_dec, b_enc, b_dec, variant="standard", **extra
) -> Path:
    """A run folder as train.py leaves it (a ReLU SAE by default), exported like make synth-eval;
    `extra` holds further tensors and, under "hparams", the variant's hyper-parameters."""
    run_dir.mkdir()
    config = {
        "variant": variant, "d_in": D, "d_sae": w_dec.shape[0], "layer": 0,
        "cache": str(world), "model_name": "synthetic-hierarchy", "ctx_len": T,
        "dataset": "synthetic", "prepend_bos": False, "norm_scale": 1.0,
        "hparams": extra.pop("hparams", {}),
    }  # fmt: skip
    (run_dir / "config.json").write_text(json.dumps(config))
    (run_dir / "final_info.json").write_text(json.dumps({"training results for layer 0": {"x": 1}}))
    arrays = {"W_enc": w_enc, "W_dec": w_dec, "b_enc": b_enc, "b_dec": b_dec, **extra}
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in arrays.items()},
              run_dir / ex.RUN_WEIGHTS)  # fmt: skip
    ex.export_run(run_dir, force=True)
    return run_dir


def test_synth_eval_scores_oracle_and_absorbing_saes(built, tmp_path):
    world = built / "hierarchy"
    truth = load_file(world / "ground_truth.safetensors")
    dirs, bias, parent = truth["feature_vectors"], truth["bias"], truth["parent"]
    b_enc = np.full(F, -0.2)  # a low threshold: at d 64 interference would hide parents
    oracle = fake_run(tmp_path / "oracle", world, dirs.T, dirs, b_enc, bias)
    # each child latent carries part of its parent's direction (less than the parent's own latent,
    # so matching by cosine still finds the parent's latent); each parent latent is switched off
    # by its children's directions
    decoder = dirs.copy()
    kids = np.flatnonzero(parent >= 0)
    decoder[kids] += 0.5 * dirs[parent[kids]]
    decoder /= np.linalg.norm(decoder, axis=1, keepdims=True)
    encoder = dirs.copy()
    np.add.at(encoder, parent[kids], -1.5 * dirs[kids])
    absorbing = fake_run(tmp_path / "absorbing", world, encoder.T, decoder, b_enc, bias)
    scores = {}
    for run in (oracle, absorbing):
        proc = run_eval_python(["-m", "synth.evaluate", str(run), "--samples", "8192"], tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        entry = json.loads((run / "final_info.json").read_text())["training results for layer 0"]
        assert entry["x"] == 1  # other keys survive the merge
        scores[run.name] = entry["synthetic evaluation results"]
    o, a = scores["oracle"], scores["absorbing"]
    assert o["world"] == "hierarchy" and o["absorption"]["n_pairs"] == 96
    assert o["saelens"]["mcc"] > 0.999 and o["saelens"]["dead_latents"] == 0
    assert o["absorption"]["mean"] < 0.05 and o["true_feature_detection"]["recall"] > 0.95
    assert a["absorption"]["mean"] > 0.5 and a["saelens"]["mcc"] < 0.99
    j = o["adjacent_jaccard"]
    assert j["sae"] == pytest.approx(j["ground_truth"], abs=0.05)


def test_synth_eval_refuses_a_run_of_a_real_cache(built, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"cache": str(tmp_path), "layer": 0}))
    proc = run_eval_python(["-m", "synth.evaluate", str(run)], tmp_path)
    assert proc.returncode == 2 and "not a synthetic world" in proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr


def test_synth_eval_scores_a_two_level_export(built, tmp_path):
    """two_level exports a custom module (base latents gated by concepts), not a SAELens SAE."""
    truth = load_file(built / "hierarchy" / "ground_truth.safetensors")
    dirs, bias = truth["feature_vectors"], truth["bias"]
    concepts = np.random.default_rng(0).normal(size=(8, D))
    concepts /= np.linalg.norm(concepts, axis=1, keepdims=True)
    run = fake_run(
        tmp_path / "two_level", built / "hierarchy", dirs.T, dirs, np.full(F, -0.2), bias,
        variant="two_level", W_enc_c=concepts.T, W_dec_c=concepts, b_enc_c=np.full(8, 10.0),
        hparams={"k_c": 8, "k_b": 4},
    )  # fmt: skip
    proc = run_eval_python(["-m", "synth.evaluate", str(run), "--samples", "4096"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((run / "final_info.json").read_text())["training results for layer 0"]
    result = info["synthetic evaluation results"]
    assert result["saelens"]["mcc"] > 0.999  # the base decoder is the true dictionary
    assert 8 < result["saelens"]["sae_l0"] <= 8 + 4  # all 8 concepts and at most k_b base latents


def test_cofiring_decoder_cos_against_a_pair_loop():
    rng = np.random.default_rng(3)
    codes = (rng.random((40, 7)) < 0.3).astype(np.float32)
    decoder = rng.normal(size=(7, 5))
    total = weight = 0.0
    for t in range(40):
        active = np.flatnonzero(codes[t])
        for i in active:
            for j in active:
                if i != j:
                    cos = decoder[i] @ decoder[j]
                    cos /= np.linalg.norm(decoder[i]) * np.linalg.norm(decoder[j])
                    total, weight = total + abs(cos), weight + 1
    value = metrics.cofiring_decoder_cos(metrics.firing(codes), decoder)
    assert value == pytest.approx(total / weight, rel=1e-10)
    assert metrics.cofiring_decoder_cos(metrics.firing(np.eye(7)), decoder) is None
