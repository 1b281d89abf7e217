"""Synthetic worlds (synth.make_world) and their scoring (synth.evaluate, synth.metrics).

The worlds are built once, tiny (d 64, 256 features, 20k tokens), in one `.venv-eval` subprocess;
the metric functions are checked here on hand-built cases against answers worked out by hand or
by direct loops, and the chance line against SciPy's Hungarian matching; the scoring runs end to
end on hand-made SAEs whose answers are known: the oracle (decoder = true directions) and one
built to absorb every parent into its children.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from safetensors.numpy import load_file, save_file
from scipy.optimize import linear_sum_assignment

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


# pairs (0, 1), (0, 2), (3, 4), (5, 6) on 64 tokens; pair (5, 6) has too few child tokens.
# Feature f fires on tokens HAND_SPANS[f][0] .. HAND_SPANS[f][1] - 1.
HAND_PARENT = np.array([-1, 0, 0, -1, 3, -1, 5])
HAND_SPANS = [(0, 32), (0, 8), (16, 24), (32, 48), (32, 40), (48, 52), (48, 50)]


def hand_truth() -> np.ndarray:
    true = np.zeros((64, 7), bool)
    for feature, (start, stop) in enumerate(HAND_SPANS):
        true[start:stop, feature] = True
    return true


def hand_absorption(true: np.ndarray, sae: np.ndarray) -> dict:
    return metrics.absorption(
        sp.csr_matrix(true), sp.csr_matrix(sae), HAND_PARENT, np.arange(7), min_tokens=5
    )


def test_absorption_known_answers_on_hand_built_codes():
    true = hand_truth()
    perfect = hand_absorption(true, true)
    assert perfect["n_pairs"] == 3 and perfect["n_undetected"] == 0
    assert perfect["per_pair"]["child"] == [1, 2, 4]
    assert (perfect["rate"], perfect["child_recall"], perfect["child_precision"]) == (0, 1, 1)
    # fully absorbed: every child latent fires on its child, the parent latent is silent there
    absorbed = true.copy()
    for child in (1, 2, 4, 6):
        absorbed[true[:, child], HAND_PARENT[child]] = False
    full = hand_absorption(true, absorbed)
    assert (full["rate"], full["child_recall"], full["child_precision"]) == (1, 1, 1)
    # missed child: latent 4 never fires, so pair (3, 4) has no absorption rate, not a rate of 0
    missed = true.copy()
    missed[:, 4] = False
    result = hand_absorption(true, missed)
    assert result["n_undetected"] == 1 and result["per_pair"]["absorption"] == [0, 0, None]
    assert result["per_pair"]["recall"] == [1, 1, 0]
    assert result["per_pair"]["precision"] == [1, 1, None]
    assert result["rate"] == 0 and result["child_recall"] == pytest.approx(2 / 3)
    # partial, on top of the missed child: latent 2 fires on 4 of its 8 child tokens (16-19), the
    # parent latent is silent on 2 of those (16, 17), and latent 2 fires on 4 other tokens (56-59)
    partial = missed.copy()
    partial[20:24, 2] = False
    partial[16:18, 0] = False
    partial[56:60, 2] = True
    result = hand_absorption(true, partial)
    assert result["per_pair"]["absorption"] == [0, 2 / 4, None]
    assert result["per_pair"]["recall"] == [1, 4 / 8, 0]
    assert result["per_pair"]["precision"] == [1, 4 / 8, None]
    assert result["rate"] == pytest.approx((0 + 0.5) / 2)  # over the 2 pairs where it is defined
    assert result["child_recall"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert result["child_precision"] == pytest.approx((1 + 0.5) / 2)
    assert result["n_pairs"] == 3 and result["n_undetected"] == 1
    # a blind SAE: nothing detected, no absorption rate at all
    blind = hand_absorption(true, np.zeros_like(true))
    assert blind["rate"] is None and blind["child_precision"] is None
    assert blind["child_recall"] == 0 and blind["n_undetected"] == 3


def test_absorption_matches_a_token_loop_on_random_codes():
    rng = np.random.default_rng(0)
    parent = np.array([-1, 0, 0, -1, 3])  # 0 -> {1, 2}, 3 -> {4}
    true = np.zeros((400, 5), bool)
    true[:, 0] = rng.random(400) < 0.5
    kid = rng.integers(1, 3, 400)
    true[np.arange(400), kid] = true[:, 0] & (rng.random(400) < 0.6)  # one child at most
    true[:, 3] = rng.random(400) < 0.3
    true[:, 4] = true[:, 3] & (rng.random(400) < 0.5)
    sae = true ^ (rng.random(true.shape) < 0.2)  # a noisy detector of every feature
    result = metrics.absorption(sp.csr_matrix(true), sp.csr_matrix(sae), parent, np.arange(5))
    rates, recalls, precisions = [], [], []
    for child in (1, 2, 4):
        detected = absorbed = fires = on_child = 0
        for t in range(400):
            fires += int(sae[t, child])
            if true[t, child]:
                on_child += 1
                if sae[t, child]:
                    detected += 1
                    absorbed += int(not sae[t, parent[child]])
        rates.append(absorbed / detected)
        recalls.append(detected / on_child)
        precisions.append(detected / fires)
    assert result["per_pair"]["absorption"] == pytest.approx(rates, rel=1e-12)
    assert result["rate"] == pytest.approx(np.mean(rates), rel=1e-12)
    assert result["child_recall"] == pytest.approx(np.mean(recalls), rel=1e-12)
    assert result["child_precision"] == pytest.approx(np.mean(precisions), rel=1e-12)


def test_saebench_absorption_known_answers():
    """Parent 0 (direction e0) fires on tokens 0-6 with magnitude 1 (2 on token 5); parent 2 fires
    on 3 tokens only (below min_tokens). Latent 0 is m(0); X = (e0 + e1)/sqrt2 projects 0.707 per
    unit of activation, Y has cos 0.3, Z cos 0.01."""
    true_dirs = np.eye(4)
    x = np.array([1, 1, 0, 0]) / np.sqrt(2)
    y = np.array([0.3, 0, np.sqrt(1 - 0.09), 0])
    z = np.array([0.01, 0, 0, np.sqrt(1 - 1e-4)])
    decoder = np.stack([true_dirs[0], true_dirs[1], true_dirs[2], true_dirs[3], x, y, z])
    parent, latent_of = np.array([-1, 0, -1, 2]), np.arange(4)
    codes = np.zeros((10, 4))
    codes[:7, 0] = [1, 1, 1, 1, 1, 2, 1]
    codes[7:, 2] = 1
    acts = np.zeros((10, 7))
    acts[0, 0] = 1  # the parent's latent fires: not absorption
    acts[1, 4] = 1  # X carries 0.707 >= 0.4 x 1: absorbed
    acts[2, 5] = 1  # Y carries 0.3 < 0.4: not absorbed
    # token 3: nothing fires
    acts[4, 4], acts[4, 6] = 0.5, 50  # the top projector is Z (0.5 > 0.354), cos 0.01 < 0.025
    acts[5, 4] = 1  # 0.707 < 0.4 x 2: not absorbed
    acts[6, 4], acts[6, 5] = 2, 1  # X carries 1.414 and is the top projector: absorbed
    result = metrics.saebench_absorption(
        sp.csr_matrix(codes), sp.csr_matrix(acts), decoder, true_dirs, parent, latent_of
    )
    assert result["n_parents"] == 1 and result["rate"] == pytest.approx(2 / 7)
    perfect = metrics.saebench_absorption(
        sp.csr_matrix(codes), sp.csr_matrix(codes), true_dirs, true_dirs, parent, latent_of
    )
    assert perfect["rate"] == 0


def test_structure_metrics_are_anchored_to_the_truth():
    from synth.evaluate import structure_metrics

    rng = np.random.default_rng(1)
    true = sp.csr_matrix(rng.random((300, 20)) < 0.1)
    dirs = rng.normal(size=(20, 8))
    positions = np.tile(np.arange(1, 31), 10)
    perfect = structure_metrics(true, true, dirs, dirs, positions)
    spread = perfect["firing_rate_spread"]
    triples = [perfect["adjacent_jaccard"], perfect["cofiring_decoder_cos"]]
    triples += [spread["std_log10_rate"], spread["frac_above_10x_median"]]
    for triple in triples:
        assert triple["sae"] == triple["ground_truth"] is not None and triple["distance"] == 0
    assert spread["n_live"] == {"sae": 20, "ground_truth": 20}
    assert metrics.anchored(0.25, 0.1) == {"sae": 0.25, "ground_truth": 0.1, "distance": 0.15}
    assert metrics.anchored(None, 0.1)["distance"] is None


def test_recovered_fraction_known_answers_and_chance():
    true = np.eye(3)
    decoder = np.array([[-2.0, 0, 0], [0, 0.95, np.sqrt(1 - 0.95**2)], [0.6, 0, 0.8]])
    # best |cos|: feature 0 -> 1.0 (sign ignored), 1 -> 0.95, 2 -> 0.8
    assert metrics.recovered_fraction(decoder, true) == pytest.approx(2 / 3)
    assert metrics.recovered_fraction(decoder, true, threshold=0.7) == 1
    rng = np.random.default_rng(2)
    dirs = rng.normal(size=(256, 64))
    assert metrics.recovered_fraction(dirs * 3.0, dirs) == 1  # the perfect decoder
    random = metrics.random_unit_decoder(1024, 64, seed=3)
    assert random.shape == (1024, 64)
    assert np.allclose(np.linalg.norm(random, axis=1), 1)
    best = [
        max(abs(r @ t) / (np.linalg.norm(r) * np.linalg.norm(t)) for r in random[:256])
        for t in dirs[:16]
    ]  # a float64 loop on a slice: random directions in d 64 stay far below 0.9
    assert max(best) < 0.9
    assert metrics.recovered_fraction(random, dirs) == 0
    assert metrics.recovered_fraction(random, dirs, chunk=100) == 0


CHANCE_SCRIPT = """
import json, sys
import numpy as np
from synth import metrics
from synth.evaluate import feature_recovery

rng = np.random.default_rng(4)
dirs = rng.normal(size=(256, 64))
other = metrics.random_unit_decoder(512, 64, seed=11)
print(json.dumps(feature_recovery(other, dirs, sae_mcc=0.0)))
"""


def test_feature_recovery_chance_line_is_a_random_decoders_mcc(tmp_path):
    proc = run_eval_python(["-c", CHANCE_SCRIPT], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert (result["width"], result["d"], result["n_true_features"]) == (512, 64, 256)
    rng = np.random.default_rng(4)
    dirs = rng.normal(size=(256, 64))

    def mcc(decoder: np.ndarray) -> float:  # SAELens's definition, in float64
        cos = np.abs(decoder @ dirs.T)
        cos /= np.outer(np.linalg.norm(decoder, axis=1), np.linalg.norm(dirs, axis=1))
        rows, cols = linear_sum_assignment(1 - cos)
        return float(cos[rows, cols].mean())

    chance = np.random.default_rng(0).standard_normal((512, 64))  # the documented chance decoder
    assert result["mcc"]["chance"] == pytest.approx(mcc(chance), abs=1e-5)
    # any other random decoder of the same width lands on the line; MCC alone is far from 0
    for seed in (11, 12):
        other = np.random.default_rng(seed).standard_normal((512, 64))
        assert mcc(other) == pytest.approx(result["mcc"]["chance"], abs=0.01)
    assert 0.3 < result["mcc"]["chance"] < 0.5
    assert result["recovered"] == {"sae": 0.0, "chance": 0.0}


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
        assert "compare only at equal width" in proc.stdout and "distance" in proc.stdout
        entry = json.loads((run / "final_info.json").read_text())["training results for layer 0"]
        assert entry["x"] == 1  # other keys survive the merge
        scores[run.name] = entry["synthetic evaluation results"]
    o, a = scores["oracle"], scores["absorbing"]
    assert o["world"] == "hierarchy" and o["absorption"]["n_pairs"] == 96
    assert o["saelens"]["mcc"] > 0.999 and o["saelens"]["dead_latents"] == 0
    assert o["absorption"]["rate"] < 0.05 and o["absorption"]["child_recall"] > 0.95
    assert o["absorption"]["n_undetected"] == 0 and o["true_feature_detection"]["recall"] > 0.95
    assert a["absorption"]["rate"] > 0.5 and a["absorption"]["child_recall"] > 0.5
    assert a["saelens"]["mcc"] < 0.99
    # SAEBench-style: the oracle's parents are kept; the absorbing SAE's children carry them
    assert o["absorption"]["saebench_full"]["n_parents"] == 32  # 8 trees of 1 root + 3 inner nodes
    assert o["absorption"]["saebench_full"]["rate"] < 0.02
    assert a["absorption"]["saebench_full"]["rate"] > 0.15
    # feature recovery beside the chance line of a random unit decoder of the same width
    r = o["feature_recovery"]
    assert (r["width"], r["d"], r["n_true_features"]) == (F, D, F)
    assert r["mcc"]["sae"] == o["saelens"]["mcc"] and r["recovered"] == {"sae": 1.0, "chance": 0.0}
    chance = np.random.default_rng(r["chance_seed"]).standard_normal((F, D))
    cos = np.abs(chance @ dirs.T)
    cos /= np.outer(np.linalg.norm(chance, axis=1), np.linalg.norm(dirs, axis=1))
    rows, cols = linear_sum_assignment(1 - cos)
    assert r["mcc"]["chance"] == pytest.approx(cos[rows, cols].mean(), abs=1e-5)
    assert a["feature_recovery"]["mcc"]["chance"] == r["mcc"]["chance"]
    # structure metrics: the same truth anchor for both, the distance to it scored
    for key in ("adjacent_jaccard", "cofiring_decoder_cos"):
        for result in (o, a):
            m = result[key]
            assert m["distance"] == pytest.approx(abs(m["sae"] - m["ground_truth"]))
        assert o[key]["ground_truth"] == a[key]["ground_truth"]
    assert o["adjacent_jaccard"]["distance"] < 0.05  # i.i.d. tokens: truth ~0.005
    assert 0.05 < o["cofiring_decoder_cos"]["ground_truth"] < 0.2  # random directions in d 64
    spread = o["firing_rate_spread"]["std_log10_rate"]
    assert spread["distance"] == pytest.approx(abs(spread["sae"] - spread["ground_truth"]))


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
