"""`python -m jax_sae.report.compare` and sweep reports on small fake run folders in train.py's
format."""

import json
import random
from pathlib import Path

import pytest

from jax_sae.report import compare, runs
from synth.evaluate import merge_into_final_info

TRAINED_ALIKE = {"tokens": 4096, "normalize": True, "layer": 3, "eval_tokens": 1024}


def fake_run(
    root: Path,
    name: str,
    *,
    variant="topk",
    hparams=None,
    cache="a" * 64,
    fast=True,
    core=None,
    l0=7.5,
    ev=0.81,
    pooled=None,
    **config_entries,
) -> Path:
    run = root / name
    run.mkdir(parents=True)
    config = {
        "variant": variant,
        "hparams": hparams or {"k": 8, "lr": 1e-3},
        "d_in": 16,
        "d_sae": 64,
        "cache": "activations_cache/tiny",
        "cache_manifest_sha256": cache,
        **TRAINED_ALIKE,
        **config_entries,
    }
    runs.write_json(run / runs.CONFIG, config)
    log = runs.MetricsLog(run / runs.METRICS)
    for step in range(1, 5):
        record = {"step": step, "tokens": 32 * step, "loss": 4.0 / step, "l0": 8.0 + step}
        log.append(record | {"explained_variance": 0.5 + 0.1 * step})
    extra = {runs.FAST_EVAL_KEY: None}
    if fast:  # as the fast evaluation writes it: ev is SAEBench's formula, 1 - FVU ev - 0.06
        pooled = ev - 0.06 if pooled is None else pooled
        extra[runs.FAST_EVAL_KEY] = {
            "l0": l0,
            "explained_variance": pooled,
            "explained_variance_pooled": pooled,
            "explained_variance_saebench": ev,
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


def add_synthetic_results(run: Path, mcc: float) -> None:
    """What `python -m synth.evaluate` merges in (its own writer, so a renamed key fails here)."""
    result = {"world": "hierarchy", "saelens": {"mcc": mcc}, "absorption": {"rate": 0.2}}
    merge_into_final_info(run, TRAINED_ALIKE["layer"], result)


def table_lines(markdown: str) -> list[list[str]]:
    """The markdown table's header and rows, split into cells."""
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("| ").split(" | ")] for line in lines]


def test_pareto_front_matches_brute_force():
    def dominated(p, points):
        return any(q != p and q[0] <= p[0] and q[1] >= p[1] for q in points)

    rng = random.Random(0)
    for trial in range(300):
        n = rng.randint(1, 12)
        # small integer grids force ties in L0, in quality and whole duplicates
        grid = 4 if trial % 2 else 1000
        points = [(float(rng.randint(1, grid)), float(rng.randint(0, grid))) for _ in range(n)]
        front = compare.pareto_front(points)
        expected = {i for i, p in enumerate(points) if not dominated(p, points)}
        assert set(front) == expected and len(front) == len(expected), points
        assert [points[i][0] for i in front] == sorted(points[i][0] for i in front)


def test_table_plot_and_json(tmp_path):
    a = fake_run(tmp_path, "a", core=0.97)
    b = fake_run(tmp_path, "b", hparams={"k": 16, "lr": 1e-3}, fast=False)
    c = fake_run(tmp_path, "c", variant="hier_ortho", hparams={"k": 8, "lr": 1e-3, "lambda_2": 0.1})
    out = tmp_path / "cmp"
    assert compare.main([str(a), str(b), str(c), "--out", str(out)]) == 0
    markdown = (out / "comparison.md").read_text()
    assert "Not like for like" not in markdown
    header, row_a, row_b, row_c = table_lines(markdown)
    assert header[:3] == ["run", "variant", "hparams"] and "mismatch" not in header
    assert "ce_loss_score" in header and "core_l0" in header and "absorption" not in header
    # one explained-variance definition per column, each named; 1 - FVU leads
    ev, ev_train, formula = (
        header.index(h) for h in ("EV (1 - FVU)", "EV (train batches)", "EV (SAEBench formula)")
    )
    assert not any("explained_variance" in h or "FVU (pooled)" in h for h in header)
    assert header.index("L0") < ev < ev_train < header.index("final_loss") < formula
    assert formula == header.index("ce_loss_score") - 1  # beside SAEBench's other numbers
    assert (row_a[ev], row_a[ev_train], row_a[formula]) == ("0.75", "-", "0.81")
    assert (row_b[ev], row_b[ev_train], row_b[formula]) == ("-", "0.9", "-")
    assert row_a[2] == "k=8" and row_b[2] == "k=16" and row_c[2] == "k=8"  # lambda_2: c only
    rows = json.loads((out / "comparison.json").read_text())
    assert rows[0]["ev"] == 0.75 and rows[0]["ev_saebench_formula"] == 0.81
    assert rows[0]["mse"] == 0.25
    assert rows[0]["ce_loss_score"] == 0.97 and rows[1]["ce_loss_score"] is None
    # b has no held-out evaluation: the last logged training interval, marked
    assert rows[1]["metrics_from"] == "train" and rows[1]["l0"] == 12.0
    assert rows[1]["final_loss"] == 1.0
    assert (out / "comparison.png").stat().st_size > 10_000
    assert (out / "pareto.png").stat().st_size > 10_000


@pytest.mark.parametrize("key", compare.CONSISTENCY_KEYS)
def test_mismatch_refused_naming_the_key_or_flagged(tmp_path, capsys, key):
    odd = {"tokens": 8192, "normalize": False, "layer": 4, "eval_tokens": 2048}[key]
    folders = [str(fake_run(tmp_path, n)) for n in ("a", "b")]
    folders.append(str(fake_run(tmp_path, "c", **{key: odd})))
    out = tmp_path / "out"
    assert compare.main([*folders, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: runs differ in {key} (c: {json.dumps(odd)}; a, b: ")
    assert "\n" not in err and "--allow-mismatch" in err
    assert not out.exists()

    assert compare.main([*folders, "--out", str(out), "--allow-mismatch"]) == 0
    markdown = (out / "comparison.md").read_text()
    assert markdown.splitlines()[2].startswith(
        f"> **Not like for like** (--allow-mismatch): runs differ in {key}"
    )
    header, *rows = table_lines(markdown)
    column = header.index("mismatch")
    assert [row[column] for row in rows] == ["-", "-", f"{key}={json.dumps(odd)}"]
    assert (out / "pareto.png").is_file()


def test_refuses_runs_of_different_caches_even_with_allow_mismatch(tmp_path, capsys):
    a = fake_run(tmp_path, "a")
    b = fake_run(tmp_path, "b", cache="b" * 64)
    for flags in ([], ["--allow-mismatch"]):
        assert compare.main([str(a), str(b), "--out", str(tmp_path / "out"), *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: runs come from different activation caches")
        assert "\n" not in err
    assert not (tmp_path / "out").exists()


def test_not_a_run_folder(tmp_path, capsys):
    with pytest.raises(compare.CompareError, match="not a run folder"):
        compare.compare([tmp_path], tmp_path / "out")
    assert compare.main([str(tmp_path / "missing")]) == 2
    assert "error:" in capsys.readouterr().err


def test_same_member_name_in_two_sweeps_and_a_run_given_twice(tmp_path, capsys):
    a = fake_run(tmp_path / "sweep_a", "m0")
    b = fake_run(tmp_path / "sweep_b", "m0")
    rows = compare.compare([a, b], tmp_path / "out")
    assert [row["run"] for row in rows] == ["sweep_a/m0", "sweep_b/m0"]
    assert compare.main([str(a), str(a)]) == 2
    assert "given twice" in capsys.readouterr().err


def test_pareto_panels_follow_the_results_present(tmp_path):
    a = fake_run(tmp_path, "a")
    b = fake_run(tmp_path, "b", l0=20.0, ev=0.9)
    rows = compare.compare([a, b], tmp_path / "plain")
    assert [p.y for p in compare.pareto_panels(rows)] == ["ev"]  # FVU = 1 - EV: no panel

    add_synthetic_results(b, mcc=0.7)
    c = fake_run(tmp_path, "c", core=0.97, fast=False)
    rows = compare.compare([a, b, c], tmp_path / "all")
    panels = [p.y for p in compare.pareto_panels(rows)]
    assert panels == ["ev", "ev_train_batches", "ce_loss_score", "synth_mcc"]
    assert rows[1]["synth_mcc"] == 0.7 and rows[1]["synth_absorption"] == 0.2
    assert "MCC (synthetic)" in (tmp_path / "all" / "comparison.md").read_text()


def test_write_sweep_report(tmp_path):
    sweep = tmp_path / "runs" / "lam"
    members = []
    for i, (lam, seed) in enumerate([(0.01, 0), (0.1, 0), (0.01, 1)]):
        swept = {"lambda": lam, "seed": seed}
        config = {"sweep": {"name": "lam", "member": f"m{i}", "swept": swept}}
        members.append(fake_run(sweep, f"m{i}", variant="standard", l0=40.0 / (i + 1), **config))
    add_synthetic_results(members[0], mcc=0.6)
    path = compare.write_sweep_report(sweep, members)
    assert path == sweep / "sweep.md" and (sweep / "pareto.png").stat().st_size > 10_000
    markdown = path.read_text()
    assert markdown.startswith("# Sweep `lam`: 3 members")
    header, *rows = table_lines(markdown)
    assert header[:4] == ["member", "variant", "lambda", "seed"]
    for needed in (
        "L0",
        "EV (1 - FVU)",
        "EV (SAEBench formula)",
        "dead_frac",
        "final_loss",
        "MCC (synthetic)",
    ):
        assert needed in header
    assert [row[:4] for row in rows] == [
        ["m0", "standard", "0.01", "0"],
        ["m1", "standard", "0.1", "0"],
        ["m2", "standard", "0.01", "1"],
    ]


def test_a_run_evaluated_before_the_headline_changed_reads_alike(tmp_path):
    """Older final_info.json files hold SAEBench's formula under `explained_variance` and 1 - FVU
    only under `explained_variance_pooled`: the columns still mean what their headers say."""
    old = fake_run(tmp_path, "old")
    info = runs.read_json(old / runs.FINAL_INFO)
    fast = info["training results for layer 3"][runs.FAST_EVAL_KEY]
    del fast["explained_variance_saebench"]
    fast["explained_variance"], fast["explained_variance_pooled"] = 1.066, 0.57  # 5x scale
    runs.write_json(old / runs.FINAL_INFO, info)
    new = fake_run(tmp_path, "new", ev=1.066, pooled=0.57)  # the same run evaluated today
    rows = compare.compare([old, new], tmp_path / "out")
    assert [(r["ev"], r["ev_saebench_formula"]) for r in rows] == [(0.57, 1.066)] * 2


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (0.001131370849898476, "0.00113"),
        (1.131370849898476e-05, "1.13e-05"),
        (3e-4, "0.0003"),
        (1.5, "1.5"),
        (3.0, "3"),
        (1234.5, "1230"),
        (2.5e7, "2.5e+07"),
        (0.0, "0.0"),
        (16384, "16384"),  # integers stay whole
        (True, "True"),
        ("cosine", "cosine"),
        ([0.001131370849898476, 128], "[0.00113, 128]"),
    ],
)
def test_settings_are_shown_to_three_significant_digits(value, shown):
    assert compare.setting_text(value) == shown


def test_tables_round_hyper_parameters_in_labels_and_cells(tmp_path):
    lr = 0.001131370849898476  # what a learning rate scaled by sqrt(2) looks like
    a = fake_run(tmp_path, "a", hparams={"k": 8, "lr": lr}, d_sae=16384)
    b = fake_run(tmp_path, "b", hparams={"k": 8, "lr": 2 * lr}, d_sae=32768)
    out = tmp_path / "cmp"
    compare.compare([a, b], out)
    markdown = (out / "comparison.md").read_text()
    _, row_a, row_b = table_lines(markdown)
    assert row_a[2] == "d_sae=16384, lr=0.00113" and row_b[2] == "d_sae=32768, lr=0.00226"
    assert "0.0011313" not in markdown

    sweep = tmp_path / "runs" / "lr"
    members = [
        fake_run(sweep, f"m{i}", sweep={"name": "lr", "swept": {"lr": value, "seed": 0}})
        for i, value in enumerate((lr, 1e-4 * 2**0.5))
    ]
    header, *rows = table_lines(compare.write_sweep_report(sweep, members).read_text())
    column = header.index("lr")
    assert [r[column] for r in rows] == ["0.00113", "0.000141"]
