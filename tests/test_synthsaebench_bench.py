"""`make synthsaebench` at its smallest budget, and the pure pieces of its report.

The small budget builds a 1024-feature SynthSAEBench world, draws a cache of it on the device,
trains BatchTopK, trains SAELens's BatchTopK through SAELens's own trainer on the same batches
(with its defaults, and with its dead-latent window set to ours), scores all of them with
SAELens's synthetic evaluation and writes the report. The test holds it to what the benchmark
exists to show: BatchTopK recovers the true features far better than a random decoder of the
same width, SAELens's trainer learns on the same batches too, and the report's numbers are the
scored ones."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import synthsaebench as bench  # noqa: E402

EVAL_PYTHON = REPO / ".venv-eval" / "bin" / "python"


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    if not EVAL_PYTHON.exists():
        pytest.fail(".venv-eval is missing; `make setup-eval` builds it")
    out = tmp_path_factory.mktemp("synthsaebench_small")
    argv = ["--budget", "small", "--arms", "batchtopk", "--seeds", "1", "--out", str(out)]
    done = subprocess.run(
        [sys.executable, "benchmarks/synthsaebench.py", *argv], cwd=REPO, capture_output=True,
        text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_batchtopk_recovers_the_world_far_above_a_random_decoder(small):
    record = json.loads((small / "SYNTHSAEBENCH.json").read_text())
    assert len(record["ours"]) == len(record["theirs"]) == len(record["matched"]) == 1
    chance = record["ours"][0]["chance MCC"]
    assert 0.1 < chance < 0.3  # a random unit decoder of width 1024 in 256 dimensions
    for row in record["ours"]:
        assert row["MCC"] > 1.8 * chance, row
        assert row["EV"] > 0.8, row
        assert 0.7 * 7 < row["L0"] < 7, row  # k 7, exported as JumpReLU
    for row in record["theirs"] + record["matched"]:  # SAELens's trainer, same batches, learns
        assert row["MCC"] > 1.3 * chance, row
        assert row["samples/s"] > 0


def test_the_report_prints_the_scored_numbers(small):
    record = json.loads((small / "SYNTHSAEBENCH.json").read_text())
    text = (small / "SYNTHSAEBENCH.md").read_text()
    stats = bench.seed_stats(record["ours"])
    row = next(line for line in text.splitlines() if line.startswith("| batchtopk (baseline)"))
    for key in ("MCC", "F1", "EV", "recovered"):
        assert bench.fmt_stat(stats[key]) in row, key
    assert "| samples/s |" in text
    png = small / "synthsaebench.png"
    assert png.stat().st_size > 20_000


def row(l0: float, mcc: float) -> dict:
    return {"L0": l0, "MCC": mcc, "F1": None}


def test_a_sweep_is_read_at_the_target_l0_in_log_l0():
    rows = [row(10.0, 0.5), row(40.0, 0.7), row(160.0, 0.2)]
    at_20 = bench.at_l0(rows, 20.0)
    assert at_20 is not None
    assert at_20["MCC"] == pytest.approx(0.6)  # halfway between 10 and 40 in log L0
    assert at_20["L0"] == 20.0
    assert at_20["F1"] is None
    assert bench.at_l0(rows, 80.0)["MCC"] == pytest.approx(0.45)
    assert bench.at_l0(rows, 5.0) is None and bench.at_l0(rows, 200.0) is None


def test_an_l1_arm_that_misses_the_target_says_so():
    arm = next(a for a in bench.ARMS if a.variant == "standard")
    reading, how = bench.arm_row(arm, [row(3.0, 0.4), row(6.0, 0.5)], 25, bench.BUDGETS["cpu"])
    assert reading is None
    assert "not bracketed" in how and "3.0, 6.0" in how


def test_seed_statistics_are_the_mean_and_sample_std():
    stats = bench.seed_stats([row(24.0, 0.5), row(26.0, 0.7)])
    assert stats["L0"] == pytest.approx((25.0, 2**0.5))
    assert stats["MCC"] == pytest.approx((0.6, 0.2 / 2**0.5))
    assert stats["F1"] is None
