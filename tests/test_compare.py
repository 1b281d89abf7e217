"""`python -m jax_sae.compare` on small fake run folders in train.py's format."""

import json
from pathlib import Path

import pytest

from jax_sae import compare, runs


def fake_run(
    root: Path,
    name: str,
    *,
    variant="topk",
    hparams=None,
    cache="a" * 64,
    fast=True,
    core=None,
) -> Path:
    run = root / name
    run.mkdir(parents=True)
    config = {
        "variant": variant,
        "hparams": hparams or {"k": 8, "lr": 1e-3},
        "d_in": 16,
        "d_sae": 64,
        "layer": 3,
        "cache": "activations_cache/tiny",
        "cache_manifest_sha256": cache,
    }
    runs.write_json(run / runs.CONFIG, config)
    log = runs.MetricsLog(run / runs.METRICS)
    for step in range(1, 5):
        log.append({"step": step, "tokens": 32 * step, "loss": 4.0 / step, "l0": 8.0 + step})
    extra = {runs.FAST_EVAL_KEY: None}
    if fast:
        extra[runs.FAST_EVAL_KEY] = {
            "l0": 7.5,
            "explained_variance": 0.81,
            "mse_per_token": 0.25,
            "dead_frac": 0.125,
        }
    info = runs.final_info(
        config,
        training_steps=4,
        final_loss=1.0,
        learning_rate=1e-3,
        sparsity_penalty=8,
        extra=extra,
    )
    if core is not None:  # what saebench_eval.run merges in
        info["core evaluation results"] = {
            "eval_result_metrics": {
                "model_performance_preservation": {"ce_loss_score": core},
                "sparsity": {"l0": 7.0},
            }
        }
    runs.write_json(run / runs.FINAL_INFO, info)
    return run


def test_table_plot_and_json(tmp_path):
    a = fake_run(tmp_path, "a", core=0.97)
    b = fake_run(tmp_path, "b", hparams={"k": 16, "lr": 1e-3}, fast=False)
    c = fake_run(tmp_path, "c", variant="hier_ortho", hparams={"k": 8, "lr": 1e-3, "lambda_2": 0.1})
    out = tmp_path / "cmp"
    assert compare.main([str(a), str(b), str(c), "--out", str(out)]) == 0
    table = (out / "comparison.md").read_text()
    header, _, *lines = table.strip().splitlines()[2:]
    assert header.split(" | ")[:3] == ["| run", "variant", "hparams"]
    assert "ce_loss_score" in header and "core_l0" in header and "absorption" not in header
    row_a, row_b, row_c = (line.split(" | ") for line in lines)
    assert (
        row_a[2] == "k=8" and row_b[2] == "k=16" and row_c[2] == "k=8"
    )  # lambda_2: hier_ortho only
    rows = json.loads((out / "comparison.json").read_text())
    assert rows[0]["explained_variance"] == 0.81 and rows[0]["mse"] == 0.25
    assert rows[0]["ce_loss_score"] == 0.97 and rows[1]["ce_loss_score"] is None
    # b has no held-out evaluation: the last logged training interval, marked
    assert rows[1]["metrics_from"] == "train" and rows[1]["l0"] == 12.0
    assert rows[1]["final_loss"] == 1.0
    assert (out / "comparison.png").stat().st_size > 10_000


def test_refuses_runs_of_different_caches(tmp_path, capsys):
    a = fake_run(tmp_path, "a")
    b = fake_run(tmp_path, "b", cache="b" * 64)
    assert compare.main([str(a), str(b), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: runs come from different activation caches") and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_not_a_run_folder(tmp_path, capsys):
    with pytest.raises(compare.CompareError, match="not a run folder"):
        compare.compare([tmp_path], tmp_path / "out")
    assert compare.main([str(tmp_path / "missing")]) == 2
    assert "error:" in capsys.readouterr().err
