"""Offline SAEBench on the embedded tiny model: the TransformerLens model equals the extractor's
Hugging Face model, SAEBench core agrees with a direct computation, results land in
final_info.json; plus the driver's refusals (offline hub evals, unreachable hub)."""

from __future__ import annotations

import json
import re
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from jax_sae.export import saelens as ex
from jax_sae.model.variants import make_variant
from saebench_eval import run as driver
from tests.test_export import EVAL_PYTHON, REPO, eval_venv_env

pytestmark = pytest.mark.slow  # SAEBench in .venv-eval

LAYER, F, SCALE = 2, 256, 0.5
N_TEXTS = 24  # corpus rows for the eval: a few thousand tokens, one core batch
TRAINING_KEY = f"training results for layer {LAYER}"

EVAL_SCRIPT = """
import sys
import numpy as np
from saebench_eval.offline import hooked_transformer_from_folder, tokenized_corpus
from saebench_eval import run
model_dir, corpus, run_dir, out = sys.argv[1:5]
model = hooked_transformer_from_folder(model_dir)
tokens = tokenized_corpus(corpus, model, 128)["input_ids"]
_, cache = model.run_with_cache(tokens[:2])
resid = {str(i): cache[f"blocks.{i}.hook_resid_post"].numpy() for i in range(model.cfg.n_layers)}
np.savez(out, tokens=tokens.numpy(), **resid)
# the hub evals cannot run here: check that their calls bind to SAEBench's run_eval signatures
import inspect, json
from pathlib import Path
from saebench_eval import evals

llm = evals.LLMSettings("gemma-2-2b", "cuda", "bfloat16", 32)
calls = {}
for name in evals.HUB_EVALS:
    fn, kwargs = evals.hub_eval_call(name, None, "sae", llm, Path(run_dir), "key")
    inspect.signature(fn).bind(**kwargs)
    calls[name] = {"model_name": kwargs["config"].model_name,
                   "k_values": getattr(kwargs["config"], "k_values", None)}
Path(out).with_suffix(".calls.json").write_text(json.dumps(calls))
sys.exit(run.main([run_dir, "--evals", "core", "meta_structure", "--offline-model", model_dir,
                   "--dataset", corpus, "--core-batch-size", str(len(tokens)),
                   "--meta-structure-steps", "20"]))
"""


def standard_sae(d_in: int):
    """A ReLU SAE with data-independent but sparse codes: unit decoder rows, encoder = their
    transpose, negative encoder biases, a non-zero decoder bias."""
    v = make_variant("standard", d_in, F)
    params = dict(v.init_params(jax.random.key(1)))
    params["W_enc"] = params["W_dec"].T
    params["b_enc"] = jnp.full((F,), -1.5, jnp.float32)
    params["b_dec"] = jax.random.normal(jax.random.key(2), (d_in,)) * 0.1
    return v, params


@pytest.fixture(scope="module")
def offline_eval(tiny_model_dir, tiny_corpus, tmp_path_factory):
    if not EVAL_PYTHON.exists():
        pytest.skip(".venv-eval does not exist; create it with `make setup-eval`")
    tmp = tmp_path_factory.mktemp("offline")
    lines = tiny_corpus.read_text().splitlines()[:N_TEXTS]
    corpus = tmp / "corpus.jsonl"
    corpus.write_text("\n".join(lines) + "\n")
    # eager attention, as the extractor runs it: the only kernel exact for Gemma-2's soft-capping
    hf = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    variant, params = standard_sae(hf.config.hidden_size)
    run = tmp / "run"
    run.mkdir()
    config = {
        "variant": "standard",
        "hparams": dict(variant.hparams),
        "d_in": variant.d_in,
        "d_sae": F,
        "layer": LAYER,
        "model_name": str(tiny_model_dir),
        "hook_name": f"blocks.{LAYER}.hook_resid_post",
        "ctx_len": 128,
        "dataset": str(corpus),
        "prepend_bos": None,
        "norm_scale": SCALE,
    }
    (run / "config.json").write_text(json.dumps(config))
    (run / "final_info.json").write_text(json.dumps({TRAINING_KEY: {"final_info": {"a": 1}}}))
    save_file(variant.params_to_arrays(params), run / "sae_params.safetensors")
    ex.export_run(run)
    out = tmp / "tokens_and_resid.npz"
    proc = subprocess.run(
        [
            str(EVAL_PYTHON),
            "-c",
            EVAL_SCRIPT,
            str(tiny_model_dir),
            str(corpus),
            str(run),
            str(out),
        ],
        cwd=REPO,
        env=eval_venv_env(tmp),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    calls = json.loads(out.with_suffix(".calls.json").read_text())
    return {
        "run": run,
        "hub_calls": calls,
        "hf": hf,
        "variant": variant,
        "params": params,
        **np.load(out),
    }


def hf_layer_outputs(hf, tokens: np.ndarray) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """Residual stream after every decoder layer (forward hooks) and the logits."""
    outputs = {}
    hooks = [
        layer.register_forward_hook(
            lambda _m, _i, out, i=i: outputs.__setitem__(
                i, out[0] if isinstance(out, tuple) else out
            )
        )
        for i, layer in enumerate(hf.model.layers)
    ]
    try:
        with torch.no_grad():
            logits = hf(torch.from_numpy(tokens).long()).logits
    finally:
        for hook in hooks:
            hook.remove()
    return {i: o.numpy() for i, o in outputs.items()}, logits.numpy()


def test_hooked_transformer_equals_the_extractors_hf_model(offline_eval):
    """TransformerLens's resid_post == HF's layer outputs (float32; sequences of 128 > the
    64-token sliding window, so local and global attention layers are both exercised)."""
    hf_resid, _ = hf_layer_outputs(offline_eval["hf"], offline_eval["tokens"][:2])
    for layer, expected in hf_resid.items():
        got = offline_eval[str(layer)]
        scale = np.abs(expected).max()
        np.testing.assert_allclose(got, expected, atol=2e-6 * scale, err_msg=f"layer {layer}")


def direct_core_metrics(offline_eval) -> dict[str, float]:
    """SAEBench 0.6.0 core definitions (one batch = every corpus row) computed in float64 from
    the HF model, our JAX SAE on s * x (the un-folded training weights), and NumPy."""
    tokens = offline_eval["tokens"]
    tokenizer = AutoTokenizer.from_pretrained(offline_eval["hf"].name_or_path)
    special = [tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id]
    keep = ~np.isin(tokens, special)
    resid, logits = hf_layer_outputs(offline_eval["hf"], tokens)
    x = resid[LAYER][keep].astype(np.float32)
    v, params = offline_eval["variant"], offline_eval["params"]
    h_trained = v.encode(params, jnp.asarray(SCALE * x))
    h = np.asarray(h_trained, np.float64) / SCALE
    x_hat = np.asarray(v.decode(params, h_trained), np.float64) / SCALE
    x = x.astype(np.float64)
    rss = ((x - x_hat) ** 2).sum(1)
    mean_sq = (x**2).sum(1).mean()
    log_probs = torch.log_softmax(torch.from_numpy(logits[:, :-1]).double(), -1).numpy()
    token_ce = -np.take_along_axis(log_probs, tokens[:, 1:, None], -1)[..., 0]
    return {
        "explained_variance": 1 - rss.mean() / (mean_sq - (mean_sq / x.shape[1]) ** 2),
        "mse": (rss / len(x)).mean(),
        "cossim": (
            (x * x_hat).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(x_hat, axis=1)
        ).mean(),
        "l2_ratio": (np.linalg.norm(x_hat, axis=1) / np.linalg.norm(x, axis=1)).mean(),
        "l0": (h != 0).sum(1).mean(),
        "l1": h.sum(1).mean(),
        "ce_loss_without_sae": token_ce[keep[:, :-1]].mean(),
    }


def test_saebench_core_agrees_with_a_direct_computation(offline_eval):
    """Tolerance: 1e-4 relative (two float32 pipelines, different LLM implementations); L0 to
    0.02 latents (a pre-activation within float32 noise of 0 may flip)."""
    info = json.loads((offline_eval["run"] / "final_info.json").read_text())
    groups = info["core evaluation results"]["eval_result_metrics"]
    got = {name: value for group in groups.values() for name, value in group.items()}
    expected = direct_core_metrics(offline_eval)
    assert 0 < expected["l0"] < F / 2  # sparse, not dead: the comparison means something
    for name, value in expected.items():
        tolerance = {"abs": 0.02} if name == "l0" else {"rel": 1e-4}
        assert got[name] == pytest.approx(value, **tolerance), name


def test_results_are_merged_into_final_info(offline_eval):
    run = offline_eval["run"]
    info = json.loads((run / "final_info.json").read_text())
    assert info[TRAINING_KEY] == {"final_info": {"a": 1}}  # training results kept
    core = info["core evaluation results"]
    assert "eval_result_details" not in core  # per-latent lists stay in SAEBench's own file
    full = json.loads((run / core["result_file"]).read_text())
    assert len(full["eval_result_details"]) == F
    assert core["sae_cfg_dict"]["metadata"]["model_name"] == "tiny-gemma2"
    meta = info["meta structure evaluation results"]["eval_result_metrics"]["meta_structure"]
    assert meta["decoder_fraction_variance_explained"] <= 1


@pytest.mark.parametrize(
    ("evals", "offline", "api_key", "message"),
    [
        (["core", "scr", "tpp"], True, None, "scr, tpp need gemma-2-2b"),
        (["core", "absorption"], True, None, "absorption also stops early"),
        (["core", "autointerp"], False, None, "OPENAI_API_KEY"),
        (["core", "spelling"], False, None, "unknown eval(s) spelling"),
    ],
)
def test_driver_refuses_evals_that_cannot_run(evals, offline, api_key, message):
    with pytest.raises(driver.EvalSetupError, match=re.escape(message)):
        driver.check_requested_evals(evals, offline, api_key)


def test_unreachable_hub_is_one_clear_error_naming_the_evals(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: refused at once
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(driver.EvalSetupError, match="unreachable") as error:
        driver.check_requested_evals(["core", "sparse_probing", "meta_structure"], False, None)
    assert "core, sparse_probing download" in str(error.value)
    driver.check_requested_evals(["meta_structure"], False, None)  # needs no hub: no probe


@pytest.mark.skipif(not EVAL_PYTHON.exists(), reason=".venv-eval does not exist")
def test_driver_cli_fails_fast_offline_of_the_hub(tmp_path):
    (tmp_path / "saelens").mkdir()
    env = eval_venv_env(tmp_path) | {"HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [str(EVAL_PYTHON), "-m", "saebench_eval.run", str(tmp_path), "--evals", "core", "scr"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: HF_HUB_OFFLINE is set; core, scr download")
    assert proc.stderr.count("\n") == 1


def test_driver_needs_an_export_first(tmp_path, capsys):
    assert driver.main([str(tmp_path), "--evals", "meta_structure"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "export_to_torch.py" in err and err.count("\n") == 1


def test_hub_evals_are_called_with_the_reference_configs(offline_eval):
    """They need the hub, so only their calls are checked: each binds to SAEBench's `run_eval`
    (in the fixture's `.venv-eval` process) with SAEBench's model and settings."""
    calls = offline_eval["hub_calls"]
    assert set(calls) == set(driver.HUB_EVALS)
    assert calls["unlearning"]["model_name"] == "gemma-2-2b-it"
    assert calls["scr"]["model_name"] == calls["absorption"]["model_name"] == "gemma-2-2b"
    assert calls["sparse_probing"]["k_values"] == [1, 2, 5, 10, 20, 50]
