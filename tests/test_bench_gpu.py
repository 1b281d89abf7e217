"""`make bench-gpu` at toy sizes on whatever device the suite has, so that the script a GPU
session runs once cannot rot: every measurement runs, lands in its table, and the time budget
cuts the plan from the end without losing the table."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import bench_gpu  # noqa: E402
from jax_sae.model.variants import VARIANTS  # noqa: E402


def rows(text: str, prefix: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith(f"| {prefix}")
    ]


def test_every_figure_is_measured_at_toy_sizes(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_gpu, "TINY_MODEL", tmp_path / "no-model")  # streaming: own test
    out = tmp_path / "gpu.md"
    assert bench_gpu.main(["--toy", "--out", str(out), "--budget-s", "600"]) == 0
    text = out.read_text()
    assert text.startswith("## GPU figures: ")
    roofline = rows(text, "B 256")
    assert len(roofline) == 2 and all(float(r[1]) > 0 for r in roofline)
    for name in VARIANTS:
        for dtype in ("bfloat16", "float32"):
            (row,) = rows(text, f"{name}, F 256, {dtype}")
            tokens_per_s, fraction = float(row[2].replace(",", "")), float(row[3])
            assert tokens_per_s > 0 and fraction > 0
    assert [r[0] for r in rows(text, "F 256, N")] == ["F 256, N 1", "F 256, N 4", "F 256, N 8"]
    (sparse,) = rows(text, "F 256 |")
    assert float(sparse[3]) > 0
    assert "streaming: no tiny model" in text


def test_the_budget_cuts_the_plan_and_keeps_the_table(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_gpu, "TINY_MODEL", tmp_path / "no-model")
    out = tmp_path / "gpu.md"
    assert bench_gpu.main(["--toy", "--out", str(out), "--budget-s", "0"]) == 0
    text = out.read_text()
    skipped = "Skipped (time budget or missing input): streaming: no tiny model in "
    assert skipped in text and "; roofline: B 256, d 64, F 256, bfloat16;" in text
    assert "| standard, F 256, bfloat16 |" not in text


def test_streaming_is_timed_against_a_finished_cache(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.setattr(bench_gpu, "TINY_MODEL", tiny_model_dir)
    for stream in (False, True):
        folder = tmp_path / str(stream)
        folder.mkdir()
        assert bench_gpu.stream_tokens_per_s(stream, bench_gpu.TOY, folder) > 0
        assert (folder / "run" / "final_info.json").is_file()


def test_a_measurement_that_fails_is_recorded_and_the_rest_run(tmp_path, monkeypatch):
    def plan(sizes, tmp):
        def out_of_memory() -> str:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 80 GiB\ndetails")

        return [("variants", "huge", out_of_memory), ("roofline", "fine", lambda: "1.000")]

    monkeypatch.setattr(bench_gpu, "plan", plan)
    out = tmp_path / "gpu.md"
    assert bench_gpu.main(["--toy", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| huge | failed: RESOURCE_EXHAUSTED: Out of memory allocating 80 GiB |" in text
    assert "| fine | 1.000 |" in text
