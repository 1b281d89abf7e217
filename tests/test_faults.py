"""Fault injection: every case of the reliability review ends in one ``error:`` line (no traceback)
or in correct behaviour, and nothing already written is lost (docs/reliability.md, case table).

Each test names its case number. Runs on the small synthetic cache of test_train_cli; the kill
tests drive real subprocesses through tests/kill_at.py and are marked ``slow`` (they still run in
CI: ``make test`` selects every test).
"""

import errno
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
from safetensors.numpy import load_file

import train
from extract.cli import main as extract_main
from extract.extractor import ExtractConfig, extract
from jax_sae.data import cache as cache_module
from jax_sae.data.cache import MANIFEST, ActivationCache, CacheError
from jax_sae.data.loader import Loader
from jax_sae.export import saelens
from jax_sae.report import runs
from jax_sae.training.divergence import DivergenceRule
from jax_sae.util import disk
from tests import test_train_cli
from tests.helpers import poke_cache
from tests.test_train_cli import (
    LAYER,
    STANDARD_SETS,
    STEPS,
    args,
    one_error_line,
    write_cache,
)

cache = test_train_cli.cache  # the small synthetic cache and its uninterrupted reference run
reference_run = test_train_cli.reference_run

pytestmark = pytest.mark.faults
REPO = Path(__file__).resolve().parents[1]


def copy_cache(cache: Path, tmp_path: Path) -> Path:
    out = tmp_path / "cache"
    shutil.copytree(cache, out)
    return out


def assert_same_weights(run: Path, reference: Path) -> None:
    expected = load_file(reference / runs.PARAMS)
    actual = load_file(run / runs.PARAMS)
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_array_equal(actual[key], value, err_msg=key)


def heldout_row(cache: Path) -> int:
    """A row of the held-out tail that ``args`` (--eval-tokens 160) evaluates on."""
    loader = Loader(ActivationCache(cache), LAYER, batch_size=32, eval_tokens=160)
    return loader.train_end + 5


# ------------------------------------------------------------------- 1, 2: what training reads


def test_case1_flipped_byte_in_a_listed_shard_stops_training(cache, tmp_path, capsys):
    bad = copy_cache(cache, tmp_path)
    shard = bad / f"L{LAYER}" / "shard_00001.npy"
    raw = bytearray(shard.read_bytes())
    raw[-7] ^= 0x01  # one bit of one value; the shape and header stay valid
    shard.write_bytes(bytes(raw))
    assert train.main(args(bad, tmp_path / "run", "--steps", "20")) == 2
    line = one_error_line(capsys)
    assert "checksum mismatch" in line and "shard_00001.npy" in line
    assert not (tmp_path / "run" / runs.PARAMS).exists()


def test_case2_nan_in_the_heldout_tail_names_shard_and_row(cache, tmp_path, capsys):
    bad = copy_cache(cache, tmp_path)
    row = heldout_row(bad)
    # a matching checksum: as written by a tool that never checked its values
    shard = poke_cache(bad, f"L{LAYER}", row, np.nan, keep_checksum=True)
    assert train.main(args(bad, tmp_path / "run", "--steps", "20")) == 2
    line = one_error_line(capsys)
    local_row = row - sum(ActivationCache(bad).shard_sizes[:2])
    assert f"{shard} row {local_row} (cache row {row}) holds NaN/inf" in line


def test_case2_inf_is_caught_by_the_public_reader_too(cache, tmp_path):
    bad = copy_cache(cache, tmp_path)
    poke_cache(bad, "L2", 3, np.inf, column=5, keep_checksum=True)
    with pytest.raises(CacheError, match="row 3 .* holds NaN/inf"):
        ActivationCache(bad).acts(2)[3:4]


def test_case2_json_outputs_are_strict(tmp_path):
    record = {"loss": float("nan"), "nested": [1.0, float("inf")], "ok": 2.5}
    runs.write_json(tmp_path / "info.json", record)
    log = runs.MetricsLog(tmp_path / "metrics.jsonl")
    log.append({"step": 1, **record})

    def refuse(token: str):
        raise AssertionError(f"bare {token} in strict JSON")

    info = json.loads((tmp_path / "info.json").read_text(), parse_constant=refuse)
    assert info == {"loss": None, "nested": [1.0, None], "ok": 2.5}
    line = (tmp_path / "metrics.jsonl").read_text()
    assert json.loads(line, parse_constant=refuse)["loss"] is None


# ----------------------------------------------------------------------- 3, 11: divergence


def test_case3_huge_learning_rate_is_diverged_and_not_exported(cache, tmp_path, capsys):
    out = tmp_path / "run"
    argv = args(cache, out, "--steps", str(STEPS), "--set", "lr=1e6")
    assert train.main(argv) == 2
    assert "the run diverged: reconstruction loss" in one_error_line(capsys)
    assert runs.read_status(out)["state"] == runs.DIVERGED
    assert saelens.main([str(out)]) == 2
    line = one_error_line(capsys)
    assert "diverged" in line and "pass --force" in line


def test_divergence_rule_thresholds():
    rule = DivergenceRule(loss_factor=1000, min_explained_variance=0.0)
    assert rule.loss_reason({"step": 5, "loss": 9e3, "recon": 900.0}, zero_loss=1.0) is None
    assert "at step 5" in rule.loss_reason({"step": 5, "loss": 1.0, "recon": 1e4}, 1.0)
    assert rule.loss_reason({"step": 5, "loss": float("nan")}, 1.0) is not None
    first, falling = {"step": 5, "loss": 10.0}, {"step": 50, "loss": 5.0}
    rising = {"step": 50, "loss": 50.0}
    below = {"explained_variance_pooled": -0.2}
    assert rule.eval_reason({"explained_variance_pooled": 0.97}, first, rising) is None
    assert rule.eval_reason(below, first, falling) is None  # short but healthy
    assert rule.eval_warning(below) is not None
    assert rule.eval_reason(below, first, first) is None  # one record shows no trend
    assert "(pooled, 1 - FVU) -0.2" in rule.eval_reason(below, first, rising)


def test_divergence_at_the_end_marks_the_run_and_keeps_its_weights(
    cache, tmp_path, capsys, monkeypatch
):
    """The wiring of the end-of-run sign (the rule itself: test_divergence_rule_thresholds)."""
    reason = "held-out explained variance -5 is below 0 (forced by the test)"
    monkeypatch.setattr(DivergenceRule, "eval_reason", lambda self, *_: reason)
    out = tmp_path / "run"
    assert train.main(args(cache, out, "--steps", "20")) == 2
    assert "held-out explained variance" in one_error_line(capsys)
    assert runs.read_status(out)["state"] == runs.DIVERGED
    assert (out / runs.PARAMS).exists()
    for flags in ([], ["--replace"]):  # what make export-eval passes
        assert saelens.main([str(out), *flags]) == 2
        assert "diverged" in one_error_line(capsys)
    assert saelens.main([str(out), "--force"]) == 0
    assert "warning: exporting anyway" in capsys.readouterr().err


def test_case11_non_finite_loss_before_the_first_checkpoint(cache, tmp_path, capsys):
    bad = copy_cache(cache, tmp_path)
    loader = Loader(ActivationCache(bad), LAYER, batch_size=32, eval_tokens=160)
    row = int(loader.plan.batch_indices(0)[0])
    poke_cache(bad, f"L{LAYER}", row, 1e30, keep_checksum=True)  # finite; its square is not
    assert train.main(args(bad, tmp_path / "run", "--steps", "20")) == 2
    line = one_error_line(capsys)
    assert "not finite at step 1;" in line and "no checkpoint was saved yet" in line
    assert "step None" not in line and "NaN rows" not in line
    assert "inputs read were finite and matched their checksums" in line


# --------------------------------------------------------------------------------- 4: locks


def test_case4_second_trainer_on_a_busy_folder_fails_at_once(cache, tmp_path, capsys):
    out = tmp_path / "run"
    holder = runs.RunLock(out)
    holder.acquire()
    try:
        started = time.monotonic()
        assert train.main(args(cache, out, "--steps", "20")) == 2
        assert time.monotonic() - started < 30
        line = one_error_line(capsys)
        assert f"in use by another trainer (pid {os.getpid()}" in line
        assert sorted(p.name for p in out.iterdir()) == [runs.LOCK]  # nothing written
    finally:
        holder.release()
    assert not (out / runs.LOCK).exists()


def test_case4_stale_lock_of_a_dead_process_is_taken_over(cache, tmp_path, capsys):
    out = tmp_path / "run"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out.mkdir()
    (out / runs.LOCK).write_text(f"{dead.pid}\n")
    assert train.main(args(cache, out, "--steps", "20")) == 0
    assert f"took over the lock of pid {dead.pid}" in capsys.readouterr().err
    assert not (out / runs.LOCK).exists()


def test_lock_holds_across_processes(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from jax_sae.report.runs import RunLock; "
         "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(60)",
         str(tmp_path)],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(runs.RunFolderError, match=f"pid {holder.pid}"):
            runs.RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = runs.RunLock(tmp_path)
    assert lock.acquire() == str(holder.pid)  # the killed holder's lock is stale
    lock.release()


# ----------------------------------------------------------------------------- 5: full disk


def test_case5_full_disk_before_a_checkpoint_is_one_line_and_resumes(
    reference_run, cache, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "run"
    real_free = disk.free_bytes
    monkeypatch.setattr(
        disk, "free_bytes", lambda path: 500 if "checkpoints" in str(path) else real_free(path)
    )
    assert train.main(args(cache, out, "--steps", str(STEPS))) == 2
    line = one_error_line(capsys)
    assert f"no space left on the disk holding {out / 'checkpoints'}" in line
    assert "checkpoint 10 needs about" in line and "500 B free" in line
    monkeypatch.undo()
    assert train.main(args(cache, out, "--steps", str(STEPS), "--resume")) == 0
    assert_same_weights(out, reference_run)


def test_case5_full_disk_mid_write_is_one_line(cache, tmp_path, capsys, monkeypatch):
    """A write that fails with ENOSPC (another process filled the disk after the check)."""
    out = tmp_path / "run"

    def full(self, record):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

    monkeypatch.setattr(runs.MetricsLog, "append", full)
    assert train.main(args(cache, out, "--steps", "20")) == 2
    line = one_error_line(capsys)
    assert f"disk holding {out / runs.METRICS}: about" in line and "--resume" in line


def test_case5_full_disk_while_exporting(reference_run, tmp_path, capsys, monkeypatch):
    def full(arrays, filename):
        raise OSError(errno.ENOSPC, "No space left on device", str(filename))

    monkeypatch.setattr(saelens, "save_file", full)
    assert saelens.main([str(reference_run), "--out", str(tmp_path / "e")]) == 2
    assert "no space left on the disk holding" in one_error_line(capsys)
    assert not (tmp_path / "e").exists()


def _no_space_on_write(path, write):
    raise OSError(errno.ENOSPC, "No space left on device", str(path))


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        (("free_bytes", lambda path: 5000), "shard 0 needs about"),  # seen before writing
        (("write_atomic", _no_space_on_write), "still to write"),  # a write that fails
    ],
)
def test_case5_full_disk_while_extracting(
    tiny_model_dir, tiny_corpus, tmp_path, capsys, monkeypatch, patch, message
):
    name, replacement = patch
    monkeypatch.setattr(disk if name == "free_bytes" else cache_module, name, replacement)
    out = tmp_path / "c"
    argv = ["--model", str(tiny_model_dir), "--dataset", str(tiny_corpus), "--layers", "1"]
    assert extract_main([*argv, "--tokens", "600", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: no space left on the disk holding {out}") and message in err
    assert err.count("\n") == 1 and "--resume" in err


# ---------------------------------------------------------------------- 6, 7: cache contents


def test_case6_incomplete_cache_is_refused_unless_allowed(tmp_path, capsys):
    partial = write_cache(tmp_path / "partial")
    manifest = json.loads((partial / MANIFEST).read_text())
    manifest["complete"] = False  # as while the extractor is still running
    (partial / MANIFEST).write_text(json.dumps(manifest))
    assert train.main(args(partial, tmp_path / "run", "--steps", "20")) == 2
    line = one_error_line(capsys)
    assert "is not complete" in line and "--allow-incomplete" in line
    assert not (tmp_path / "run").exists()
    argv = args(partial, tmp_path / "run", "--steps", "20", "--allow-incomplete")
    assert train.main(argv) == 0
    assert runs.read_json(tmp_path / "run" / runs.CONFIG)["cache_complete"] is False


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda m: [m], "holds a JSON list, not an object"),
        (lambda m: {k: v for k, v in m.items() if k != "shards"}, "lacks a valid 'shards'"),
        (lambda m: m | {"shards": [{"index": 0}]}, "lacks a valid 'shards[0].n_tokens'"),
        (lambda m: m | {"dtype": "int4"}, "gives dtype 'int4'"),
        (lambda m: m | {"stats": None}, "lacks a valid 'stats'"),
    ],
)
def test_case7_corrupted_manifest_is_one_line(cache, tmp_path, capsys, damage, message):
    bad = copy_cache(cache, tmp_path)
    manifest = json.loads((bad / MANIFEST).read_text())
    (bad / MANIFEST).write_text(json.dumps(damage(manifest)))
    assert train.main(args(bad, tmp_path / "run", "--steps", "3")) == 2
    assert message in one_error_line(capsys)


def test_missing_checksum_is_one_line(cache, tmp_path):
    bad = copy_cache(cache, tmp_path)
    manifest = json.loads((bad / MANIFEST).read_text())
    del manifest["shards"][0]["crc32"][f"L{LAYER}"]
    (bad / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="lists no checksum"):
        ActivationCache(bad).acts(LAYER)[:1]


def test_sharded_array_works_with_numpy(tmp_path):
    cache = ActivationCache(write_cache(tmp_path / "c"))
    acts = cache.acts(LAYER)
    dense = np.asarray(acts)
    assert dense.shape == acts.shape == (cache.n_tokens, 16) and acts.ndim == 2
    assert dense.dtype == acts.dtype == np.float32
    np.testing.assert_array_equal(dense, acts[:])
    assert np.asarray(acts, dtype=np.float64).dtype == np.float64
    np.testing.assert_array_equal(np.asarray(cache.tokens()), cache.tokens()[:])


# ---------------------------------------------------------------------- 8, 10: extract input


def test_case8_empty_dataset_file_is_one_line(tiny_model_dir, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    argv = ["--model", str(tiny_model_dir), "--dataset", str(empty)]
    assert extract_main([*argv, "--out", str(tmp_path / "c"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: dataset file '{empty}' is empty; pass a file with texts\n"


def test_case10_extract_out_on_a_file_fails_before_loading(tiny_model_dir, tiny_corpus, tmp_path):
    target = tmp_path / "a_file"
    target.write_text("keep me")
    cfg = ExtractConfig(
        model=str(tiny_model_dir), dataset=(str(tiny_corpus),), layers=(1,), out=target
    )
    from extract.errors import ExtractError

    with pytest.raises(ExtractError, match="is a file; pass a folder"):
        extract(cfg)
    assert target.read_text() == "keep me"


# ---------------------------------------------------------------------- 9, 12: command lines


def test_case9_bad_learning_rate_fails_before_writing_and_rerun_works(cache, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(args(cache, out, "--steps", "20", "--set", "lr=-1")) == 2
    assert "need lr > 0" in one_error_line(capsys)
    assert not out.exists()
    assert train.main(args(cache, out, "--steps", "20")) == 0


def test_folder_with_only_a_config_is_not_a_run(cache, tmp_path):
    """A run that wrote its config and failed before any checkpoint holds nothing to keep."""
    out = tmp_path / "run"
    out.mkdir()
    (out / runs.CONFIG).write_text("{}")
    assert train.main(args(cache, out, "--steps", "20")) == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--steps", "abc"], "Error parsing --steps"),
        (["--no-such-flag"], "Unrecognized options: --no-such-flag"),
    ],
)
def test_case12_usage_errors_are_one_line(cache, tmp_path, capsys, argv, message):
    assert train.main([*args(cache, tmp_path / "run"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert saelens.main(["run", *argv]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_case12_help_still_works(capsys):
    assert train.main(["--help"]) == 0
    assert "--allow-incomplete" in capsys.readouterr().out


# ------------------------------------------------------------------- extend, kill, resume


def test_resume_with_more_steps_extends_a_finished_run_bit_for_bit(
    reference_run, cache, tmp_path, capsys
):
    longer = tmp_path / "longer"
    # the extended run keeps the L1 warm-up adapted to its first length (10% of STEPS)
    same_warmup = (*STANDARD_SETS, f"sparsity_warmup_steps={STEPS // 10}")
    assert train.main(args(cache, longer, "--steps", str(STEPS + 20), sets=same_warmup)) == 0
    extended = tmp_path / "extended"
    shutil.copytree(reference_run, extended)
    assert train.main(args(cache, extended, "--steps", str(STEPS + 20), "--resume")) == 0
    assert f"extending {extended} from {STEPS} to {STEPS + 20} steps" in capsys.readouterr().err
    assert_same_weights(extended, longer)
    config = runs.read_json(extended / runs.CONFIG)
    assert config["steps"] == STEPS + 20 and config["extends"][0]["steps"] == STEPS
    assert runs.read_status(extended)["state"] == runs.FINISHED
    assert train.main(args(cache, extended, "--steps", str(STEPS), "--resume")) == 2
    assert f"pass --steps {STEPS + 20} or more" in one_error_line(capsys)


@pytest.mark.slow
@pytest.mark.parametrize(
    "kill_before",
    [
        "checkpoints/20.orbax-checkpoint-tmp/state",  # mid-orbax save: record written, state not
        "checkpoints/20",  # orbax save complete but not committed
        runs.PARAMS,  # the final weights
        runs.STATUS,  # everything but the finished status: the exporter must refuse
    ],
)
def test_sigkill_at_exact_points_of_training_then_resume(
    reference_run, cache, tmp_path, kill_before
):
    out = tmp_path / "killed"
    nth = 2 if kill_before == runs.STATUS else 1  # the first status write marks the run running
    argv = args(cache, out, "--steps", str(STEPS))
    proc = subprocess.run(
        [sys.executable, "tests/kill_at.py", kill_before, str(nth), "train", *argv],
        cwd=REPO, capture_output=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert runs.read_status(out)["state"] == runs.RUNNING
    assert saelens.main([str(out)]) == 2  # not finished: refused
    assert train.main(args(cache, out, "--steps", str(STEPS), "--resume")) == 0
    assert_same_weights(out, reference_run)
    assert runs.read_status(out)["state"] == runs.FINISHED


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kill_before", "nth"),
    [
        (MANIFEST, 3),  # shard 1 on disk, not yet listed
        ("L2/shard_00002.npy", 1),  # mid-shard: layer 1 written, layer 2 not
    ],
)
def test_sigkill_at_exact_points_of_extraction_then_resume(
    tiny_model_dir, tiny_corpus, tiny_cache, tmp_path, kill_before, nth
):
    """Same settings as the ``tiny_cache`` fixture, so the resumed cache must equal it."""
    out = tmp_path / "killed"
    argv = ["--model", str(tiny_model_dir), "--dataset", str(tiny_corpus), "--layers", "1", "2"]
    argv += ["--tokens", "8000", "--ctx-len", "64", "--batch-size", "16"]
    argv += ["--shard-tokens", "2000", "--out", str(out), "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "tests/kill_at.py", kill_before, str(nth), "extract", *argv],
        cwd=REPO, env=env, capture_output=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert not json.loads((out / MANIFEST).read_text())["complete"]
    assert extract_main([*argv, "--resume"]) == 0
    resumed, reference = ActivationCache(out, verify=True), ActivationCache(tiny_cache)
    for key in ("shards", "n_tokens", "n_sequences", "stats", "complete"):
        assert resumed.manifest[key] == reference.manifest[key], key
    for kind in ("L1", "L2", "tokens", "positions"):
        for index in range(len(reference.shard_sizes)):
            name = f"{kind}/shard_{index:05d}.npy"
            assert (out / name).read_bytes() == (tiny_cache / name).read_bytes(), name
