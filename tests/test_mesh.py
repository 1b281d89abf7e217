"""The device mesh (`jax_sae.parallel.layout`): parsing, the layout rule, the collective-bytes
formula, and, on 4 CPU devices in a subprocess (tests/mesh_runs.py), sharded training against 1
device."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType
from jax.sharding import PartitionSpec as P

from jax_sae.model.variants import make_variant
from jax_sae.parallel import layout
from jax_sae.training.optim import make_optimizer

ROOT = Path(__file__).resolve().parents[1]
MESH_RUNS = ["topk", "standard", "hier_ortho", "temporal"]
OTHER_VARIANTS = ["batchtopk", "matryoshka", "jumprelu", "freq", "pair_ortho", "two_level"]


def abstract_mesh(data: int, model: int) -> AbstractMesh:
    """A mesh of the given shape without devices: enough for layouts and checks."""
    return AbstractMesh((data, model), layout.AXES, axis_types=(AxisType.Auto,) * 2)


# ------------------------------------------------------------------------------ parse_mesh


def test_parse_mesh_fills_missing_axes():
    assert layout.parse_mesh("data=2,model=2", 4) == {"data": 2, "model": 2}
    assert layout.parse_mesh(" model = 4 ", 4) == {"data": 1, "model": 4}


@pytest.mark.parametrize(
    "text, message",
    [
        ("data2", "bad --mesh item"),
        ("data=two", "bad --mesh item"),
        ("data=0,model=4", "must be >= 1"),
        ("pipe=4", "unknown mesh axis 'pipe'"),
        ("data=2,data=2", "given twice"),
        ("data=2,model=4", "uses 8 devices but 4 are available"),
    ],
)
def test_parse_mesh_errors_are_one_line(text, message):
    with pytest.raises(ValueError, match=message) as error:
        layout.parse_mesh(text, 4)
    assert "\n" not in str(error.value)


# ------------------------------------------------------------------------------ layout rule


def specs(tree) -> dict[str, P]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): sharding.spec for path, sharding in leaves}


def test_latent_axes_go_to_model_even_when_d_in_equals_d_sae():
    """d_in == d_sae: names decide W_enc's axis and keep b_dec replicated; Adam's moments follow
    their parameters, [F, F] state is split by rows, the step count is replicated."""
    variant = make_variant("hier_ortho", 32, 32, k=4, counts="ema")
    opt = make_optimizer(lr=1e-3, warmup_steps=1)
    params = variant.init_params(jax.random.key(0))
    state = (params, opt.init(params), variant.init_state())
    got = specs(layout.state_shardings(abstract_mesh(2, 2), state, 32))
    latent_rows, latent_cols = P("model"), P(None, "model")
    for prefix in ("[0]", "[1][1].mu", "[1][1].nu"):
        assert got[f"{prefix}['W_enc']"] == latent_cols
        assert got[f"{prefix}['W_dec']"] == latent_rows
        assert got[f"{prefix}['b_enc']"] == latent_rows
        assert got[f"{prefix}['b_dec']"] == P()
    assert got["[1][1].count"] == P()
    for key in ("cofire_ema", "fire_ema", "tokens_since_fired"):
        assert got[f"[2]['{key}']"] == latent_rows


def test_concept_level_replicated_and_member_axis_never_split():
    variant = make_variant("two_level", 16, 256)
    params = jax.eval_shape(variant.init_params, jax.random.key(0))
    members = jax.tree.map(lambda s: jax.ShapeDtypeStruct((3, *s.shape), s.dtype), params)
    got = specs(layout.state_shardings(abstract_mesh(1, 2), members, 256, member_axis=True))
    assert got["['W_enc']"] == P(None, None, "model")
    assert got["['W_dec']"] == P(None, "model")
    assert got["['W_enc_c']"] == got["['W_dec_c']"] == got["['b_enc_c']"] == P()


def test_indivisible_sizes_name_the_fix():
    with pytest.raises(ValueError, match="d_sae=100 is not divisible by the mesh's model size 8"):
        layout.state_shardings(abstract_mesh(1, 8), {"b_enc": np.zeros(100)}, 100)
    with pytest.raises(ValueError, match="choose a batch size that is a multiple of it"):
        layout.batch_sharding(abstract_mesh(4, 1), 30)
    with pytest.raises(ValueError, match="k <= F / model"):
        layout.sharded_top_k(np.zeros((8, 16)), 5, abstract_mesh(1, 4))


def test_collective_bytes_by_hand():
    """d 4, F 8, B 16 on 2 x 2, k 2: gradient shard 4 * ((2*4*8 + 8) / 2 + 4) = 160 bytes,
    ring over 2 sends all of it; x_hat [8, 4] -> 128; candidates 8 tokens * 2 * 8 bytes * 1;
    selected values [8, 2] and their gradient, 64 bytes each, ring over 2 -> 128."""
    got = layout.collective_bytes_per_step(4, 8, 16, data=2, model=2, k=2)
    assert got == {
        "gradient_all_reduce": 160,
        "decoder_all_reduce": 128,
        "top_k_gather": 128,
        "pair_all_reduce": 128,
        "auxk": 0,
        "cofiring_rows": 0,
        "total": 544,
    }
    one_device = layout.collective_bytes_per_step(4, 8, 16, data=1, model=1, k=2, k_aux=1)
    assert one_device["total"] == 0


def test_collective_bytes_of_auxk_and_cofiring_by_hand():
    """AuxK with k_aux 1: a second gradient all-reduce (160) and reconstruction (128), candidates
    8 tokens * 1 * 8 bytes (64), values and gradient 2 * 32 bytes (64). Co-firing rows of k 2:
    [8 tokens, 2, d 4 + B 16 + 1] float32 = 1344 bytes, ring over 2."""
    got = layout.collective_bytes_per_step(4, 8, 16, data=2, model=2, k=2, k_aux=1, cofiring_k=2)
    assert got["auxk"] == 160 + 128 + 64 + 64
    assert got["cofiring_rows"] == 1344
    assert got["total"] == 544 + 416 + 1344


HLO_COLLECTIVES = """
  %a = f32[8,4]{1,0} all-reduce(%x), channel_id=1, replica_groups={{0,1},{2,3}}, to_apply=%add
  %b = (f32[16]{0}, s32[4]{0}) all-reduce(%y, %z), replica_groups=[2,2]<=[4], to_apply=%add
  %c = f32[4,16]{0,1} all-gather(%w), replica_groups=mesh['axis_0'=2,'axis_1'=2] {'axis_1'}, x
  %d = pred[4]{0} all-reduce(%v), replica_groups={{0},{1},{2},{3}}, to_apply=%or
  %e = bf16[2,8]{1,0} reduce-scatter(%u), replica_groups={{0,1,2,3}}, dimensions={0}
  %f = f32[4]{0} collective-permute(%t), source_target_pairs={{0,1},{1,0}}
  %g = f32[4]{0} collective-permute(%s), source_target_pairs={{0,0},{1,1}}
  %h = f32[1024]{0} add(%all-reduce, %q)
"""


def test_compiled_collective_bytes_reads_every_spelling():
    """Ring bytes per device: all-reduce 128 B over 2 -> 128; (64 + 16) B over 2 -> 80; an
    all-gather of 256 B over 2 -> 128; groups of one send nothing; reduce-scatter of a 32 B
    shard over 4 -> 96; a permute to another device 16, to itself 0; `add` is no collective."""
    got = layout.compiled_collective_bytes(HLO_COLLECTIVES)
    assert got == {
        "all-reduce": 208,
        "all-gather": 128,
        "reduce-scatter": 96,
        "all-to-all": 0,
        "collective-permute": 16,
        "total": 448,
    }


# ------------------------------------------------------------------------------ 4 devices


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[np.lib.npyio.NpzFile, dict]:
    out = tmp_path_factory.mktemp("mesh")
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "mesh_runs.py"), str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return np.load(out / "arrays.npz"), json.loads((out / "facts.json").read_text())


def run_of(arrays, run: str) -> dict[str, np.ndarray]:
    """The leaves saved by `mesh_runs.flat` under `run`, by key path."""
    prefix = f"{run}/"
    return {key[len(prefix) :]: arrays[key] for key in arrays.files if key.startswith(prefix)}


def assert_same_state(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys() and expected
    for key, value in expected.items():
        np.testing.assert_allclose(actual[key], value, rtol=1e-4, atol=1e-5, err_msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["4x1", "2x2", "1x4"])
@pytest.mark.parametrize("variant", MESH_RUNS)
def test_mesh_gives_the_weights_of_one_device(runs, variant, mesh):
    """20 steps of the sharded step (params, Adam state, regulariser state) against 1 device."""
    arrays, facts = runs
    assert facts["devices"] == 4
    assert_same_state(run_of(arrays, f"{variant}/{mesh}"), run_of(arrays, f"{variant}/1"))
    assert facts[f"layouts_kept/{variant}/{mesh}"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "variant, mesh",
    [
        *[(name, "2x2") for name in OTHER_VARIANTS],
        *[(name, "1x4") for name in ("batchtopk", "matryoshka", "two_level")],
    ],
)
def test_every_other_variant_gives_the_weights_of_one_device(runs, variant, mesh):
    arrays, facts = runs
    assert_same_state(run_of(arrays, f"{variant}/{mesh}"), run_of(arrays, f"{variant}/1"))
    assert facts[f"layouts_kept/{variant}/{mesh}"]


@pytest.mark.slow
def test_sweep_members_sharded_like_unsharded(runs):
    arrays, _ = runs
    expected = run_of(arrays, "sweep/1")
    assert expected["[0]['W_enc']"].shape[0] == 2
    assert not np.allclose(expected["[0]['W_enc']"][0], expected["[0]['W_enc']"][1])
    assert_same_state(run_of(arrays, "sweep/2x2"), expected)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["2x2", "1x4"])
def test_sharded_top_k_equals_lax_top_k_ties_included(runs, mesh):
    arrays, _ = runs
    for part in ("values", "indices"):
        np.testing.assert_array_equal(arrays[f"top_k/{mesh}/{part}"], arrays[f"top_k/lax/{part}"])


COLLECTIVE_VARIANTS = ["topk", "batchtopk", "matryoshka", "hier_ortho", "two_level", "topk_dense"]


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["4x1", "2x2", "1x4"])
@pytest.mark.parametrize("variant", COLLECTIVE_VARIANTS)
def test_step_moves_what_the_formula_says(runs, variant, mesh):
    """The bytes a device sends in the compiled step (`compiled_collective_bytes`) are within 2x
    of `collective_bytes_per_step`, and no all-gather holds a whole [B, F] array or decoder.
    Before the sparse path ran under shard_map, topk on 1 x 4 sent 3.3x the formula (the
    gathered decoder rows [B k, d] summed over `model`) and matryoshka 7x."""
    _, facts = runs
    got = facts[f"collectives/{variant}/{mesh}"]
    assert 0.5 <= got["compiled"] / got["formula"] <= 2.0, got
    assert not got["whole_gathers"], "\n".join(got["whole_gathers"])


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["2x2", "1x4"])
def test_sparse_topk_step_moves_the_formula_to_a_few_percent(runs, mesh):
    """topk's sparse path, whose every collective the formula names: within 5%."""
    _, facts = runs
    got = facts[f"collectives/topk/{mesh}"]
    assert got["compiled"] == pytest.approx(got["formula"], rel=0.05), got


@pytest.mark.slow
def test_checkpoint_of_2x2_restores_onto_1x4(runs):
    arrays, facts = runs
    assert_same_state(run_of(arrays, "restore/1x4"), run_of(arrays, "restore/saved"))
    assert facts["restore_layouts"]


# ------------------------------------------------------------------------------ train.py --mesh


def train_on_devices(tmp_path: Path, *argv: str, kill_before: str | None = None) -> int:
    """train.py (or tests/kill_at.py around it) in a process that sees 4 CPU devices."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    env["OMP_NUM_THREADS"] = "1"
    prefix = ["tests/kill_at.py", kill_before, "1", "train"] if kill_before else ["train.py"]
    proc = subprocess.run(
        [sys.executable, *prefix, *argv], cwd=ROOT, env=env, capture_output=True, timeout=600
    )
    assert kill_before or proc.returncode == 0, proc.stderr.decode()[-2000:]
    return proc.returncode


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory) -> Path:
    from tests.test_train_cli import write_cache

    return write_cache(tmp_path_factory.mktemp("cache") / "c")


@pytest.mark.slow
def test_train_py_on_a_mesh_and_resumed_on_another(small_cache, tmp_path):
    """The trainer end to end: a 2x2 run equals the 1-device run; a run killed at its step-10
    checkpoint on 2x2 resumes on 1x4 and still ends with the same weights."""
    from tests.test_sweep import assert_close_weights
    from tests.test_train_cli import args

    sets = ("d_sae=64", "k=4", "warmup_steps=5", "lr=0.01")
    common = ["--steps", "20"]
    one, mesh, moved = tmp_path / "one", tmp_path / "2x2", tmp_path / "moved"
    train_on_devices(tmp_path, *args(small_cache, one, *common, variant="topk", sets=sets))
    train_on_devices(
        tmp_path,
        *args(small_cache, mesh, *common, "--mesh", "data=2,model=2", variant="topk", sets=sets),
    )
    assert_close_weights(mesh, one)
    killed = args(
        small_cache, moved, *common, "--mesh", "data=2,model=2", variant="topk", sets=sets
    )
    assert train_on_devices(tmp_path, *killed, kill_before="checkpoints/20") == -signal.SIGKILL
    resumed = args(
        small_cache, moved, *common, "--mesh", "model=4", "--resume", variant="topk", sets=sets
    )
    train_on_devices(tmp_path, *resumed)
    assert_close_weights(moved, one)
