"""The SAELens export (`jax_sae.export.saelens`, command `export_to_torch.py`): folding algebra,
SAELens config, bad inputs, and the round trip through
SAELens's own loader in `.venv-eval` against our JAX encode/decode."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jax_sae.export import saelens as ex
from jax_sae.model.variants import VARIANTS, make_variant

REPO = Path(__file__).resolve().parents[1]
EVAL_PYTHON = REPO / ".venv-eval" / "bin" / "python"
needs_eval_venv = pytest.mark.skipif(
    not EVAL_PYTHON.exists(), reason=".venv-eval does not exist; create it with `make setup-eval`"
)
D, F = 32, 128


def eval_venv_env(tmp_path: Path) -> dict[str, str]:
    """Environment for `.venv-eval` subprocesses: offline, caches inside the test's tmp dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    hub_off = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return env | hub_off | {"HF_HOME": str(tmp_path / "hf"), "MPLBACKEND": "Agg"}


# ------------------------------------------------------------------------------------------------
# an independent float64 NumPy model of the encoders
# ------------------------------------------------------------------------------------------------


def topk_relu(pre: np.ndarray, k: int) -> np.ndarray:
    keep = np.argsort(-pre, axis=-1)[:, :k]
    out = np.zeros_like(pre)
    np.put_along_axis(out, keep, np.maximum(np.take_along_axis(pre, keep, -1), 0), -1)
    return out


def encode_ref(arch: str, a: dict[str, np.ndarray], x: np.ndarray, k=None) -> np.ndarray:
    """Codes in float64; two_level returns [base, concept] (the export's latent order)."""
    a = {name: v.astype(np.float64) for name, v in a.items()}
    pre = (x - a["b_dec"]) @ a["W_enc"] + a["b_enc"]
    if arch == "standard":
        return np.maximum(pre, 0)
    if arch == "topk":
        return topk_relu(pre, k)
    if arch == "jumprelu":
        return pre * (pre > a["threshold"])
    k_base, k_concept = k
    concept = topk_relu(np.maximum((x - a["b_dec"]) @ a["W_enc_c"] + a["b_enc_c"], 0), k_concept)
    parent = np.arange(pre.shape[1]) // (pre.shape[1] // concept.shape[1])
    base = topk_relu(np.maximum(pre, 0) * (concept > 0)[:, parent], k_base)
    return np.concatenate([base, concept], axis=1)


def decode_ref(a: dict[str, np.ndarray], h: np.ndarray) -> np.ndarray:
    w_dec = np.concatenate([a["W_dec"], a["W_dec_c"]]) if "W_dec_c" in a else a["W_dec"]
    return h @ w_dec.astype(np.float64) + a["b_dec"].astype(np.float64)


def random_arrays(arch: str, rng: np.random.Generator, unit_rows: bool = True) -> dict:
    def rows(n):
        w = rng.normal(size=(n, D))
        norms = 1.0 if unit_rows else rng.uniform(0.5, 2.0, size=(n, 1))
        return (w / np.linalg.norm(w, axis=1, keepdims=True) * norms).astype(np.float32)

    a = {
        "W_enc": rng.normal(size=(D, F)).astype(np.float32) / np.sqrt(D),
        "W_dec": rows(F),
        "b_enc": rng.normal(size=F).astype(np.float32) * 0.1,
        "b_dec": rng.normal(size=D).astype(np.float32) * 0.1,
    }
    if arch == "jumprelu":
        a["threshold"] = rng.uniform(0.05, 0.5, size=F).astype(np.float32)
    if arch == "two_level":
        a |= {
            "W_enc_c": rng.normal(size=(D, F // 8)).astype(np.float32) / np.sqrt(D),
            "W_dec_c": rows(F // 8),
            "b_enc_c": rng.normal(size=F // 8).astype(np.float32) * 0.1,
        }
    return a


# ------------------------------------------------------------------------------------------------
# folding algebra (NumPy only)
# ------------------------------------------------------------------------------------------------

K_OF = {"standard": None, "topk": 8, "jumprelu": None, "two_level": (16, 4)}


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu", "two_level"])
@pytest.mark.parametrize("scale", [1.0, 0.37, 2.5])
def test_folded_sae_on_raw_x_reproduces_the_sae_trained_on_scaled_x(arch, scale):
    """decode(encode(s x)) / s == folded decode(folded encode(x)); folded codes are h / s."""
    rng = np.random.default_rng(0)
    a = random_arrays(arch, rng)
    x = rng.normal(size=(64, D)) / scale
    h_trained = encode_ref(arch, a, scale * x, K_OF[arch])
    folded = ex.unit_norm_decoder(ex.fold_input_scale(a, scale), legacy_form(arch, a))
    h = encode_ref(arch, folded, x, K_OF[arch])
    assert np.count_nonzero(h) > 0 and np.count_nonzero(h == 0) > 0  # the test can see sparsity
    np.testing.assert_allclose(h, h_trained / scale, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        decode_ref(folded, h), decode_ref(a, h_trained) / scale, rtol=1e-5, atol=1e-5
    )
    for name in ("W_dec", "W_dec_c"):
        if name in folded:
            np.testing.assert_allclose(np.linalg.norm(folded[name], axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize("arch", ["standard", "jumprelu"])
def test_non_unit_decoder_rows_fold_exactly_into_the_encoder(arch):
    rng = np.random.default_rng(1)
    a = random_arrays(arch, rng, unit_rows=False)
    x = rng.normal(size=(64, D))
    folded = ex.unit_norm_decoder(a, legacy_form(arch, a))
    np.testing.assert_allclose(np.linalg.norm(folded["W_dec"], axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(
        decode_ref(folded, encode_ref(arch, folded, x)),
        decode_ref(a, encode_ref(arch, a, x)),
        rtol=1e-5,
        atol=1e-5,
    )


def test_topk_with_non_unit_decoder_rows_is_refused():
    a = random_arrays("topk", np.random.default_rng(2), unit_rows=False)
    with pytest.raises(ex.ExportError, match="unit norm"):
        ex.unit_norm_decoder(a, legacy_form("topk", a))


# ------------------------------------------------------------------------------------------------
# export folder contents and bad inputs
# ------------------------------------------------------------------------------------------------


def legacy_form(architecture: str, arrays: dict) -> dict:
    """The export form of a run of `architecture` from before runs recorded one."""
    info = {"architecture": architecture, "k": 8, "k_c": 2, "k_b": 4}
    return ex.legacy_export_form({"export_info": info, "d_sae": arrays["b_enc"].shape[0]}, arrays)


def write_run(run_dir: Path, variant: str, arrays: dict, *, norm_scale: float = 1.0, **extra):
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "variant": variant,
        "hparams": {"k": 8} if variant in ("topk", "hier_ortho", "batchtopk") else {},
        "d_in": D,
        "d_sae": F,
        "layer": 12,
        "model_name": "google/gemma-2-2b",
        "hook_name": "blocks.12.hook_resid_post",
        "ctx_len": 128,
        "dataset": "monology/pile-uncopyrighted",
        "norm_scale": norm_scale,
    } | extra
    (run_dir / ex.RUN_CONFIG).write_text(json.dumps(config))
    save_file(arrays, run_dir / ex.RUN_WEIGHTS)
    return run_dir


@pytest.mark.parametrize(
    ("variant", "architecture"),
    [("freq", "standard"), ("hier_ortho", "topk"), ("jumprelu", "jumprelu")],
)
def test_export_writes_a_saelens_folder(tmp_path, variant, architecture):
    arrays = random_arrays(architecture, np.random.default_rng(3), unit_rows=False)
    if architecture == "topk":
        arrays = random_arrays(architecture, np.random.default_rng(3))
    out = ex.export_run(write_run(tmp_path / "run", variant, arrays, norm_scale=0.5))
    assert out == tmp_path / "run" / "saelens"
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == architecture
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"], cfg["device"]) == (D, F, "float32", "cpu")
    assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
    meta = cfg["metadata"]
    assert meta["model_name"] == "gemma-2-2b"
    assert meta["hook_name"] == "blocks.12.hook_resid_post" and meta["hook_head_index"] is None
    assert (meta["context_size"], meta["prepend_bos"]) == (128, True)
    assert meta["dataset_path"] == "monology/pile-uncopyrighted"
    assert int(meta["sae_lens_version"].split(".")[0]) >= 6  # else SAELens renames keys as pre-6
    assert ("k" in cfg) == (architecture == "topk") and cfg.get("k", 8) == 8
    weights = load_file(out / "sae_weights.safetensors")
    assert set(weights) == set(arrays)
    assert all(w.dtype == np.float32 for w in weights.values())
    np.testing.assert_allclose(np.linalg.norm(weights["W_dec"], axis=1), 1.0, atol=1e-6)


def test_model_names_map_to_transformer_lens_names():
    assert ex.transformer_lens_name("google/gemma-2-2b") == "gemma-2-2b"
    assert ex.transformer_lens_name("models/tiny-gemma2/") == "tiny-gemma2"
    assert ex.transformer_lens_name("gpt2") == "gpt2"


def test_existing_export_is_never_overwritten_without_force(tmp_path, capsys):
    run = write_run(
        tmp_path / "run", "standard", random_arrays("standard", np.random.default_rng(4))
    )
    out = ex.export_run(run)
    before = (out / "sae_weights.safetensors").read_bytes()
    save_file(random_arrays("standard", np.random.default_rng(5)), run / ex.RUN_WEIGHTS)
    assert ex.main([str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--replace" in err and err.count("\n") == 1
    assert (out / "sae_weights.safetensors").read_bytes() == before
    assert ex.main([str(run), "--force"]) == 0
    assert (out / "sae_weights.safetensors").read_bytes() != before
    assert sorted(p.name for p in run.iterdir()) == [
        "config.json",
        "sae_params.safetensors",
        "saelens",
    ]


def _tree(root: Path) -> dict[str, bytes]:
    """Every file below `root` with its bytes: what must survive a refused export."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _standard_run(path: Path, seed: int = 4, **extra) -> Path:
    return write_run(
        path, "standard", random_arrays("standard", np.random.default_rng(seed)), **extra
    )


@pytest.mark.parametrize("flag", ["--replace", "--force"])
@pytest.mark.parametrize("target", ["parent", "run", "sibling_run", "user_folder", "file"])
def test_replace_never_deletes_what_the_exporter_did_not_write(tmp_path, capsys, flag, target):
    """--out naming the runs folder, the run itself, another run, a user's folder or a file is
    refused in one line with every byte left in place."""
    runs = tmp_path / "runs"
    run = _standard_run(runs / "a")
    (run / "checkpoints" / "7").mkdir(parents=True)
    (run / "checkpoints" / "7" / "state").write_bytes(b"orbax")
    _standard_run(runs / "b", seed=5)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "paper.tex").write_text("\\section{results}")
    (tmp_path / "weights.bin").write_bytes(b"mine")
    out = {
        "parent": runs,
        "run": run,
        "sibling_run": runs / "b",
        "user_folder": tmp_path / "notes",
        "file": tmp_path / "weights.bin",
    }[target]
    before = _tree(tmp_path)
    assert ex.main([str(run), "--out", str(out), flag]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "nothing was deleted" in err or "run folder" in err
    assert _tree(tmp_path) == before


def test_replace_refuses_the_export_of_another_run(tmp_path, capsys):
    first, second = _standard_run(tmp_path / "a"), _standard_run(tmp_path / "b", seed=5)
    shared = tmp_path / "shared_export"
    ex.export_run(first, shared)
    before = _tree(shared)
    assert ex.main([str(second), "--out", str(shared), "--replace"]) == 2
    assert "export of another run" in capsys.readouterr().err
    assert _tree(shared) == before
    assert ex.main([str(first), "--out", str(shared), "--replace"]) == 0


def test_replace_refuses_an_export_folder_holding_a_users_file(tmp_path, capsys):
    run = _standard_run(tmp_path / "run")
    out = ex.export_run(run)
    (out / "my_notes.txt").write_text("keep me")
    before = _tree(out)
    assert ex.main([str(run), "--replace"]) == 2
    assert "my_notes.txt" in capsys.readouterr().err
    assert _tree(out) == before


def test_replace_accepts_a_moved_run_by_its_config_hash_and_an_old_unmarked_export(tmp_path):
    """A run folder moved with its export is still recognised (config hash); an export written
    before exports recorded their source is replaceable at the run's own `saelens/` only."""
    run = _standard_run(tmp_path / "run", config_hash="abc123")
    ex.export_run(run)
    moved = tmp_path / "moved"
    os.replace(run, moved)
    assert ex.export_run(moved, replace=True) == moved / "saelens"
    cfg_path = moved / "saelens" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    assert cfg["metadata"]["exported_from"]["run"] == str(moved.resolve())
    del cfg["metadata"]["exported_from"]
    cfg_path.write_text(json.dumps(cfg))
    assert ex.export_run(moved, replace=True) == moved / "saelens"
    elsewhere = tmp_path / "elsewhere"
    os.replace(moved / "saelens", elsewhere)
    cfg_path = elsewhere / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["metadata"]["exported_from"]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ex.ExportError, match="does not record its run"):
        ex.export_run(moved, elsewhere, replace=True)


def test_replace_leaves_a_users_dot_old_folder_alone_and_uses_the_umask(tmp_path):
    run = _standard_run(tmp_path / "run")
    ex.export_run(run)
    users = run / ".saelens.old"
    users.mkdir()
    (users / "keep").write_text("mine")
    previous = os.umask(0o022)
    try:
        out = ex.export_run(run, replace=True)
    finally:
        os.umask(previous)
    assert (users / "keep").read_text() == "mine"
    assert sorted(p.name for p in run.iterdir()) == [
        ".saelens.old", "config.json", "sae_params.safetensors", "saelens"
    ]  # fmt: skip
    assert out.stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o644}


def _rng_arrays(arch: str, **replace) -> dict:
    arrays = random_arrays(arch, np.random.default_rng(6)) | replace
    return {name: value for name, value in arrays.items() if value is not None}


# case -> (variant written to config.json, weights, config overrides, expected message)
BAD_RUNS = {
    "no weights": ("standard", None, {}, "has no sae_params.safetensors"),
    "unknown variant": ("sparsemax", _rng_arrays("standard"), {}, "unknown variant 'sparsemax'"),
    "unknown architecture": (
        "standard",
        _rng_arrays("standard"),
        {"export_info": {"architecture": "gated"}},
        "unknown architecture 'gated'",
    ),
    "shape mismatch": ("standard", _rng_arrays("standard"), {"d_sae": 2 * F}, "W_enc has shape"),
    "missing threshold": (
        "jumprelu",
        _rng_arrays("jumprelu", threshold=None),
        {},
        "missing ['threshold']",
    ),
    "extra tensor": ("standard", _rng_arrays("jumprelu"), {}, "unexpected ['threshold']"),
    "topk without k": ("topk", _rng_arrays("topk"), {"hparams": {}}, "records no 'k'"),
    "negative threshold": (
        "jumprelu",
        _rng_arrays("jumprelu", threshold=-np.ones(F, np.float32)),
        {},
        "negative",
    ),
    "nan weights": (
        "standard",
        _rng_arrays("standard", b_dec=np.full(D, np.nan, np.float32)),
        {},
        "NaN",
    ),
}


@pytest.mark.parametrize("case", BAD_RUNS)
def test_bad_runs_fail_with_one_line_errors(tmp_path, capsys, case):
    variant, arrays, overrides, message = BAD_RUNS[case]
    run = write_run(tmp_path / "run", variant, arrays or _rng_arrays("standard"), **overrides)
    if arrays is None:
        (run / ex.RUN_WEIGHTS).unlink()
    assert ex.main([str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (run / "saelens").exists()


# ------------------------------------------------------------------------------------------------
# round trip: SAELens's loader in .venv-eval against our JAX variants
# ------------------------------------------------------------------------------------------------

APPLY_EXPORTS = """
import json, sys
import numpy as np, torch
from saebench_eval.saes import load_exported_sae
for job in json.loads(sys.argv[1]):
    sae = load_exported_sae(job["export"], "roundtrip", "cpu")
    with torch.no_grad():
        h = sae.encode(torch.from_numpy(np.load(job["x"])))
        x_hat = sae.decode(h)
    np.savez(job["out"], h=h.numpy(), x_hat=x_hat.numpy())
    print(json.dumps({"name": job["name"], "class": type(sae).__name__,
                      "k": getattr(sae.cfg, "k", None)}))
"""
# name -> (variant, hyper-parameters, norm_scale, SAE class SAELens/SAEBench must load).
# The reference is `make_variant(variant).encode/decode`, except for "two_level-spec", whose
# reference is the NumPy two_level model above (it runs whether or not the variant exists yet).
ROUND_TRIPS = {
    "standard": ("standard", {}, 1.0, "StandardSAE"),
    "standard-scaled": ("standard", {}, 0.37, "StandardSAE"),
    "topk-scaled": ("topk", {"k": 8}, 2.5, "TopKSAE"),
    "jumprelu-scaled": ("jumprelu", {}, 0.37, "JumpReLUSAE"),
    "batchtopk-scaled": ("batchtopk", {"k": 8}, 0.37, "JumpReLUSAE"),
    "matryoshka-scaled": ("matryoshka", {"k": 8}, 0.37, "JumpReLUSAE"),
    "two_level-scaled": ("two_level", {}, 0.37, "TwoLevelSAE"),
    "two_level-spec": ("two_level", {"k_b": 16, "k_c": 4}, 0.37, "TwoLevelSAE"),
}


def variant_case(name: str, rng: np.random.Generator, x: np.ndarray) -> tuple[dict, dict, dict]:
    """(arrays to save, hparams, reference) for a trained-looking SAE of a registered variant."""
    variant, hparams, scale, _ = ROUND_TRIPS[name]
    v = make_variant(variant, D, F, **hparams)
    params = dict(v.init_params(jax.random.key(0)))
    params["b_enc"] = jnp.asarray(rng.normal(size=F) * 0.1, jnp.float32)
    params["b_dec"] = jnp.asarray(rng.normal(size=D) * 0.1, jnp.float32)
    if "threshold" in params:
        params["threshold"] = jnp.asarray(rng.uniform(0.05, 0.5, F), jnp.float32)
    state = v.init_state()
    if "threshold" in state:  # batchtopk, matryoshka: their EMA inference threshold, set
        state = state | {"threshold": jnp.float32(0.2)}
    arrays = v.params_to_arrays(params)
    info = v.export_info(params, state)
    if "threshold" in info:
        arrays["threshold"] = np.asarray(info["threshold"], np.float32)
    h = v.encode(params, jnp.asarray(scale * x), state if "threshold" in state else None)
    reference = {
        "h_ref": np.asarray(h) / scale,
        "x_hat_ref": np.asarray(v.decode(params, h)) / scale,
    }
    return arrays, {"hparams": dict(v.hparams), "export_form": v.export_form()}, reference


def spec_case(name: str, rng: np.random.Generator, x: np.ndarray) -> tuple[dict, dict, dict]:
    _, hparams, scale, _ = ROUND_TRIPS[name]
    arrays = random_arrays("two_level", rng)
    h = encode_ref("two_level", arrays, scale * x, (hparams["k_b"], hparams["k_c"]))
    reference = {"h_ref": h / scale, "x_hat_ref": decode_ref(arrays, h) / scale}
    return arrays, {"hparams": hparams}, reference  # no export_form: a run from before it


@pytest.fixture(scope="module")
def round_trips(tmp_path_factory):
    """Export every case, then load and apply all of them in one `.venv-eval` process."""
    if not EVAL_PYTHON.exists():
        pytest.skip(".venv-eval does not exist; create it with `make setup-eval`")
    tmp = tmp_path_factory.mktemp("roundtrip")
    rng = np.random.default_rng(7)
    references, jobs = {}, []
    for name, (variant, _, scale, _) in ROUND_TRIPS.items():
        x = (rng.normal(size=(64, D)) / scale).astype(np.float32)
        if name.endswith("-spec"):
            arrays, settings, references[name] = spec_case(name, rng, x)
        elif variant in VARIANTS:
            arrays, settings, references[name] = variant_case(name, rng, x)
        else:
            continue
        run = write_run(tmp / name, variant, arrays, norm_scale=scale, **settings)
        ex.export_run(run)
        np.save(tmp / f"{name}.x.npy", x)
        files = {"x": str(tmp / f"{name}.x.npy"), "out": str(tmp / f"{name}.out.npz")}
        jobs.append({"name": name, "export": str(run / "saelens")} | files)
    proc = subprocess.run(
        [str(EVAL_PYTHON), "-c", APPLY_EXPORTS, json.dumps(jobs)],
        cwd=REPO,
        env=eval_venv_env(tmp),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = {r["name"]: r for r in map(json.loads, proc.stdout.strip().splitlines())}
    return {
        name: references[name] | loaded[name] | dict(np.load(tmp / f"{name}.out.npz"))
        for name in references
    }


@pytest.mark.slow
@needs_eval_venv
@pytest.mark.parametrize("name", ROUND_TRIPS)
def test_saelens_export_matches_our_encode_decode(round_trips, name):
    """float32 tolerance: |diff| <= 1e-5 * (1 + |reference|) for codes and reconstructions."""
    variant, hparams, _, sae_class = ROUND_TRIPS[name]
    if name not in round_trips:
        pytest.skip(f"variant {variant} is not registered in jax_sae.model.variants yet")
    result = round_trips[name]
    assert result["class"] == sae_class
    if sae_class == "TopKSAE":
        assert result["k"] == hparams["k"]
    h = result["h_ref"]  # two_level: the joint code [base, concept] on both sides
    assert np.count_nonzero(h) > 0 and np.count_nonzero(h == 0) > 0  # sparsity is visible
    np.testing.assert_allclose(result["h"], h, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result["x_hat"], result["x_hat_ref"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(ex.LEGACY_ARCHITECTURE_OF_VARIANT))
def test_each_architecture_records_the_form_the_exporter_used_before(name, tmp_path):
    """`export_form` (recorded by the model class) and the form the exporter derived from the
    variant before runs recorded one agree, and give byte-identical export folders. Variants
    registered since (`matryoshka`) have no runs without an export form."""
    hparams = {"k": 8} if name in ("topk", "batchtopk", "hier_ortho") else {}
    variant = make_variant(name, D, F, **hparams)
    arrays = variant.params_to_arrays(variant.init_params(jax.random.key(0)))
    info = variant.export_info(variant.init_params(jax.random.key(0)), variant.init_state())
    if "threshold" in info:
        arrays["threshold"] = np.full(F, 0.1, np.float32)
    legacy = write_run(tmp_path / "legacy", name, arrays, hparams=dict(variant.hparams))
    recorded = write_run(
        tmp_path / "recorded", name, arrays, hparams=dict(variant.hparams),
        export_form=variant.export_form(),
    )  # fmt: skip
    config = json.loads((legacy / ex.RUN_CONFIG).read_text())
    assert ex.legacy_export_form(config, arrays) == json.loads(json.dumps(variant.export_form()))
    exports = [ex.export_run(run) for run in (legacy, recorded)]
    cfgs = [json.loads((out / "cfg.json").read_text()) for out in exports]
    for cfg in cfgs:
        del cfg["metadata"]["exported_from"]
    assert cfgs[0] == cfgs[1] and list(cfgs[0]) == list(cfgs[1])
    weights = [(out / "sae_weights.safetensors").read_bytes() for out in exports]
    assert weights[0] == weights[1]


def test_a_damaged_export_form_is_refused_in_one_line(tmp_path, capsys):
    run = _standard_run(tmp_path / "run", export_form={"architecture": "standard"})
    assert ex.main([str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "export_form is damaged" in err and err.count("\n") == 1
