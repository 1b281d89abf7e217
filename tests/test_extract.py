"""The extraction stage: cached activations equal a plain transformers forward, only the needed
blocks run, kill + resume gives the uninterrupted cache, and bad input fails fast in one line."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma2Config, Gemma2ForCausalLM

import extract.extractor as extractor
from extract.cli import main as cli_main
from extract.cli import parse_count
from extract.errors import ExtractError
from extract.extractor import ExtractConfig, extract, hook_points, tokenize, truncate_after
from extract.tiny_model import TinyModelSpec, build_tiny_model, stdlib_docstrings
from jax_sae.data.cache import MANIFEST, ActivationCache, CacheError

pytestmark = pytest.mark.slow  # runs the tiny model

REPO = Path(__file__).resolve().parents[1]


def _config(model: Path, corpus: Path, out: Path, **overrides) -> ExtractConfig:
    base = ExtractConfig(
        model=str(model),
        dataset=(str(corpus),),
        layers=(0, 2),
        tokens=2500,
        ctx_len=64,
        batch_size=8,
        shard_tokens=600,
        out=out,
        progress=False,
    )
    return dataclasses.replace(base, **overrides)


def _corpus_texts(corpus: Path, n: int) -> list[str]:
    rows = (json.loads(line)["text"] for line in corpus.read_text().splitlines())
    return [t for t in rows if t.strip()][:n]


# ------------------------------------------------------------------ agreement with transformers


@pytest.mark.parametrize(
    "dtype, keep_bos, rtol, atol",
    [("float32", False, 1e-4, 1e-4), ("bfloat16", True, 2**-7, 1e-2)],
)
def test_cache_equals_plain_transformers_forward(
    tiny_model_dir, tiny_corpus, tmp_path, dtype, keep_bos, rtol, atol
):
    """Residual after block L == hidden_states[L + 1] of a full forward, for every kept token."""
    cfg = _config(tiny_model_dir, tiny_corpus, tmp_path / "c", dtype=dtype, keep_bos=keep_bos)
    cache = ActivationCache(extract(cfg), verify=True)
    assert cache.n_tokens == cfg.tokens and cache.complete and len(cache.shard_sizes) > 2
    assert cache.manifest["hook_names"] == {
        "0": "blocks.0.hook_resid_post",
        "2": "blocks.2.hook_resid_post",
    }

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    bos = tokenizer.bos_token_id
    expected = {0: [], 2: []}
    tokens, positions = [], []
    with torch.inference_mode():
        for text in _corpus_texts(tiny_corpus, cache.manifest["n_sequences"]):
            ids = tokenizer(text, truncation=True, max_length=cfg.ctx_len, return_tensors="pt")
            hidden = model(**ids, output_hidden_states=True).hidden_states
            row = ids["input_ids"][0]
            kept = torch.ones_like(row, dtype=torch.bool) if keep_bos else row != bos
            for layer in expected:
                expected[layer].append(hidden[layer + 1][0, kept].numpy())
            tokens.append(row[kept].numpy())
            positions.append(np.flatnonzero(kept.numpy()))
    n = cache.n_tokens
    np.testing.assert_array_equal(cache.tokens()[:], np.concatenate(tokens)[:n])
    np.testing.assert_array_equal(cache.positions()[:], np.concatenate(positions)[:n])
    for layer, parts in expected.items():
        np.testing.assert_allclose(
            cache.acts(layer)[:], np.concatenate(parts)[:n], rtol=rtol, atol=atol
        )
    positions = cache.positions()[:]
    if keep_bos:
        assert (cache.tokens()[:][positions == 0] == bos).all() and (positions == 0).any()
    else:
        assert positions.min() == 1 and bos not in cache.tokens()[:]
        assert cache.manifest["dropped_tokens"]["special"]["bos"]["id"] == bos


def test_blocks_after_the_deepest_layer_never_run(
    tiny_model_dir, tiny_corpus, tmp_path, monkeypatch
):
    calls: dict[str, int] = {}
    load_model = extractor.load_model

    def counting_load_model(*args, **kwargs):
        model, tokenizer = load_model(*args, **kwargs)
        modules = {f"block{i}": block for i, block in enumerate(model.model.layers)}
        for name, module in {**modules, "lm_head": model.lm_head}.items():
            calls[name] = 0
            module.register_forward_hook(
                lambda *_, name=name: calls.__setitem__(name, calls[name] + 1)
            )
        return model, tokenizer

    monkeypatch.setattr(extractor, "load_model", counting_load_model)
    cache = ActivationCache(
        extract(_config(tiny_model_dir, tiny_corpus, tmp_path / "c", layers=(1,), tokens=500))
    )
    assert cache.layers == [1]
    assert calls["block0"] == calls["block1"] > 0
    assert calls["block2"] == calls["block3"] == calls["lm_head"] == 0


def test_norm_outliers_are_dropped_per_batch(tiny_model_dir, tiny_corpus, tmp_path):
    """--drop-norm-outliers F keeps exactly the tokens whose norm is <= F x their batch's median
    (torch's lower median) at every cached layer; recomputed here from an unfiltered run."""
    settings = dict(layers=(1, 2), dtype="float32", batch_size=4)
    full = ActivationCache(
        extract(_config(tiny_model_dir, tiny_corpus, tmp_path / "all", tokens=3000, **settings))
    )
    cfg = _config(tiny_model_dir, tiny_corpus, tmp_path / "some", tokens=1500, **settings)
    some = ActivationCache(extract(dataclasses.replace(cfg, drop_norm_outliers=1.1)))

    text_index = np.cumsum(full.sequence_starts()) - 1  # every text keeps >= 1 token
    batch = text_index // settings["batch_size"]
    keep = np.ones(full.n_tokens, bool)
    for layer in (1, 2):
        norms = np.linalg.norm(full.acts(layer)[:], axis=1)
        for b in np.unique(batch):
            rows = batch == b
            lower_median = np.sort(norms[rows])[(rows.sum() - 1) // 2]
            keep[rows] &= norms[rows] <= 1.1 * lower_median
    assert (~keep[: np.flatnonzero(keep)[1499]]).sum() > 0  # something was dropped
    np.testing.assert_array_equal(some.tokens()[:], full.tokens()[:][keep][:1500])
    np.testing.assert_array_equal(some.positions()[:], full.positions()[:][keep][:1500])
    for layer in (1, 2):
        np.testing.assert_array_equal(some.acts(layer)[:], full.acts(layer)[:][keep][:1500])


def test_tokenize_of_a_cut_prefix_equals_full_tokenization(tiny_model_dir, tiny_corpus):
    """Long documents are tokenised from a prefix; the first ctx_len tokens must not change."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = _corpus_texts(tiny_corpus, 400)
    long_texts = ["\n\n".join(texts[i : i + 40]) for i in range(0, 400, 40)] + ["=" * 5000 + "x"]
    for ctx_len in (16, 64):
        expected = tokenizer(long_texts, truncation=True, max_length=ctx_len)["input_ids"]
        assert tokenize(tokenizer, long_texts, ctx_len) == expected


# --------------------------------------------------------------------------- kill and resume


def test_sigkill_then_resume_gives_the_uninterrupted_cache(tiny_model_dir, tiny_corpus, tmp_path):
    settings = dict(tokens=6000, shard_tokens=300, batch_size=4, dtype="float32")
    reference = ActivationCache(
        extract(_config(tiny_model_dir, tiny_corpus, tmp_path / "ref", **settings))
    )

    out = tmp_path / "killed"
    argv = [
        sys.executable,
        "-m",
        "extract",
        "--model",
        str(tiny_model_dir),
        "--dataset",
        str(tiny_corpus),
    ]
    argv += ["--layers", "0", "2", "--ctx-len", "64", "--out", str(out), "--quiet"]
    argv += [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(argv, cwd=REPO, env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while (
            not _n_shards(out / MANIFEST) and process.poll() is None and time.monotonic() < deadline
        ):
            time.sleep(0.005)
        assert process.poll() is None, process.stderr.read().decode()
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    killed_at = json.loads((out / MANIFEST).read_text())
    assert not killed_at["complete"] and 0 < killed_at["n_tokens"] < settings["tokens"]

    resumed = ActivationCache(
        extract(_config(tiny_model_dir, tiny_corpus, out, resume=True, **settings)), verify=True
    )
    assert resumed.complete and resumed.shard_sizes == reference.shard_sizes
    for key in ("n_sequences", "n_tokens", "stats"):
        assert resumed.manifest[key] == reference.manifest[key], key
    for layer in (0, 2):
        np.testing.assert_array_equal(resumed.acts(layer)[:], reference.acts(layer)[:])
    np.testing.assert_array_equal(resumed.tokens()[:], reference.tokens()[:])
    np.testing.assert_array_equal(resumed.positions()[:], reference.positions()[:])


def _n_shards(manifest: Path) -> int:
    try:
        return len(json.loads(manifest.read_text())["shards"])
    except (OSError, json.JSONDecodeError, KeyError):
        return 0


def test_resume_of_a_complete_cache_changes_nothing(tiny_cache, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(tiny_cache, out)
    before = (out / MANIFEST).read_bytes()
    manifest = json.loads(before)
    cfg = ExtractConfig(
        **{**_settings_as_config(manifest), "out": out, "resume": True, "progress": False}
    )
    assert extract(cfg) == out
    assert (out / MANIFEST).read_bytes() == before
    assert "already complete" in capsys.readouterr().err


def _settings_as_config(manifest: dict) -> dict:
    s = manifest["settings"]
    names = {f.name for f in dataclasses.fields(ExtractConfig)}
    cfg = {k: v for k, v in s.items() if k in names}
    return {**cfg, "dataset": tuple(s["dataset"]), "layers": tuple(s["layers"])}


# ------------------------------------------------------------------------ damaged caches, errors


def _damage(cache: Path, tmp_path: Path, how: str) -> Path:
    out = tmp_path / how
    shutil.copytree(cache, out)
    shard = out / "L2" / "shard_00001.npy"
    if how == "truncated":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif how == "corrupted":
        data = bytearray(shard.read_bytes())
        data[-50:-40] = bytes(b ^ 0xFF for b in data[-50:-40])
        shard.write_bytes(bytes(data))
    elif how == "no_manifest":
        (out / MANIFEST).unlink()
    return out


@pytest.mark.parametrize(
    "how, verify, message",
    [
        ("truncated", False, "truncated or corrupted"),
        ("corrupted", True, "checksum mismatch"),
        ("no_manifest", False, "no manifest.json"),
    ],
)
def test_damaged_cache_is_refused(tiny_cache, tmp_path, how, verify, message):
    out = _damage(tiny_cache, tmp_path, how)
    with pytest.raises(CacheError, match=message):
        ActivationCache(out, verify=verify)


def test_corruption_is_invisible_without_verify(tiny_cache, tmp_path):
    """Flipped bytes keep the shape: only the checksum catches them (why verify exists)."""
    ActivationCache(_damage(tiny_cache, tmp_path, "corrupted"), verify=False)


def test_resume_with_other_settings_is_refused(
    tiny_model_dir, tiny_corpus, tiny_cache, tmp_path, capsys
):
    out = tmp_path / "copy"
    shutil.copytree(tiny_cache, out)
    before = (out / MANIFEST).read_bytes()
    argv = ["--model", str(tiny_model_dir), "--dataset", str(tiny_corpus), "--layers", "1", "2"]
    argv += ["--tokens", "8000", "--ctx-len", "128", "--batch-size", "16", "--out", str(out)]
    assert cli_main([*argv, "--shard-tokens", "2000", "--resume", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot resume") and "ctx_len" in err and err.count("\n") == 1
    assert (out / MANIFEST).read_bytes() == before  # nothing was touched
    assert cli_main([*argv, "--quiet"]) == 2  # an existing cache is never overwritten
    assert "--resume" in capsys.readouterr().err


def _cli_error(capsys, argv: list[str]) -> str:
    started = time.monotonic()
    assert cli_main([*argv, "--quiet"]) == 2
    assert time.monotonic() - started < 20, "must fail fast"
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_bad_inputs_fail_fast_with_one_line(tiny_model_dir, tiny_corpus, tmp_path, capsys):
    model, data = ["--model", str(tiny_model_dir)], ["--dataset", str(tiny_corpus)]
    out = ["--out", str(tmp_path / "c")]
    err = _cli_error(capsys, ["--model", str(tmp_path / "no_model"), *data, *out])
    assert "model folder" in err and "does not exist" in err
    err = _cli_error(capsys, [*model, "--dataset", str(tmp_path / "missing.jsonl"), *out])
    assert "dataset file" in err and "does not exist" in err
    err = _cli_error(capsys, [*model, *data, "--layers", "1", "4", *out])
    assert "layer 4 does not exist" in err and "4 layers" in err
    err = _cli_error(capsys, [*model, *data, "--text-field", "body", *out])
    assert "no field 'body'" in err and "text" in err
    err = _cli_error(capsys, [*model, *data, "--tokens", "ten", *out])
    assert "not a token count" in err
    assert not (tmp_path / "c").exists()  # no half-made cache folder for any of these


@pytest.mark.parametrize("offline", [False, True])
def test_unknown_or_unreachable_hub_names_fail_fast(
    tiny_corpus, tmp_path, capsys, monkeypatch, offline
):
    """Without network (or with HF_HUB_OFFLINE) a hub name fails in seconds, never by retries."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)
    argv = ["--model", "jax-sae-lab-test/no-such-model", "--dataset", str(tiny_corpus)]
    err = _cli_error(capsys, [*argv, "--out", str(tmp_path / "c")])
    assert "jax-sae-lab-test/no-such-model" in err
    if offline:
        assert "HF_HUB_OFFLINE is set" in err
    else:  # no network here: unreachable; with network: the repository does not exist
        assert "hub is unreachable" in err or "not a repository on the" in err


# ------------------------------------------------------------------- the real Gemma-2-2b layout

GEMMA_2_2B = dict(
    vocab_size=256000,
    hidden_size=2304,
    intermediate_size=9216,
    num_hidden_layers=26,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=256,
    hidden_activation="gelu_pytorch_tanh",
    max_position_embeddings=8192,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0,
    query_pre_attn_scalar=256,
    sliding_window=4096,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)


def test_gemma_2_2b_hook_points_on_the_meta_device():
    with torch.device("meta"):
        model = Gemma2ForCausalLM(Gemma2Config(**GEMMA_2_2B))
    points = hook_points(model, [25, 0, 12])
    assert [p.layer for p in points] == [0, 12, 25]
    assert [p.hook_name for p in points] == [f"blocks.{i}.hook_resid_post" for i in (0, 12, 25)]
    assert [p.module_name for p in points] == [f"model.layers.{i}" for i in (0, 12, 25)]
    assert all(p.module is model.model.layers[p.layer] for p in points)
    with pytest.raises(ExtractError, match=r"layer 26 does not exist: .* 26 layers \(0-25\)"):
        hook_points(model, [12, 26])
    blocks = list(model.model.layers)
    twelve = hook_points(model, [12])
    truncate_after(model, 12)
    assert list(model.model.layers) == blocks[:13] and twelve[0].module is model.model.layers[12]
    assert model.config.hidden_size == 2304


# ------------------------------------------------------------------------------ small helpers


def test_norm_outlier_filter_drops_only_large_rows():
    rows = {0: torch.ones(6, 4), 3: torch.ones(6, 4)}
    rows[0][2] *= 10
    rows[3][4] *= 2.5
    keep = extractor._below_norm_limit(rows, 2.0)
    assert keep.tolist() == [True, True, False, True, False, True]


def test_parse_count():
    assert [parse_count(s) for s in ("10000000", "10_000_000", "1e7", "10M", "500k")] == [
        10**7, 10**7, 10**7, 10**7, 500_000,
    ]  # fmt: skip


def test_tiny_model_loads_like_a_hub_model_and_builds_deterministically(tiny_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert type(model).__name__ == "Gemma2ForCausalLM" and model.config.num_hidden_layers == 4
    assert tokenizer("import os")["input_ids"][0] == tokenizer.bos_token_id == 2
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)
    info = json.loads((tiny_model_dir / "build_info.json").read_text())
    assert info["final_loss"] < info["initial_loss"]  # training learned something
    assert stdlib_docstrings(max_chars=20_000) == stdlib_docstrings(max_chars=20_000)

    spec = TinyModelSpec(train_steps=2, train_batch=2, max_corpus_chars=30_000)
    a, b = (
        build_tiny_model(tmp_path / "a", spec, False),
        build_tiny_model(tmp_path / "b", spec, False),
    )
    for name in ("model.safetensors", "tokenizer.json", "stdlib_docstrings.jsonl"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert build_tiny_model(a, spec, False) == a  # an existing build with the same spec is reused


def test_tiny_model_force_and_partial_never_delete_a_foreign_folder(tmp_path, capsys):
    """`--force` replaces only a tiny model folder built here, and a `<out>.partial` that no
    build left behind is refused, not removed."""
    from extract.tiny_model import main as tiny_main

    users = tmp_path / "mine"
    users.mkdir()
    (users / "thesis.pdf").write_bytes(b"%PDF")
    assert tiny_main(["--out", str(users), "--force", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a tiny model folder" in err and err.count("\n") == 1
    assert (users / "thesis.pdf").read_bytes() == b"%PDF"

    partial = tmp_path / "model.partial"
    partial.mkdir()
    (partial / "keep").write_text("mine")
    with pytest.raises(FileExistsError, match="not left by a tiny-model build"):
        build_tiny_model(tmp_path / "model")
    assert (partial / "keep").read_text() == "mine"
