"""Streaming through the trainer (`train.py --stream ... --disk-budget ...`): the extractor runs
beside the training on the tiny model, the cache stays within its budget, and the weights equal
a run over the same stream extracted without a budget, also after the trainer is killed."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import train
from jax_sae.data.cache import MANIFEST
from jax_sae.report import runs
from jax_sae.training.trainer import SHARDS_SEEN
from tests.test_faults import assert_same_weights
from tests.test_train_cli import REPO

pytestmark = pytest.mark.slow  # the extractor beside the trainer

BUDGET = 3 << 19  # 1.5 MiB: about 18 of the stream's 24 shards


def argv(tiny_model_dir: Path, tiny_corpus: Path, cache: Path, out: Path, budget: bool) -> list:
    extract = f"--model {tiny_model_dir} --dataset {tiny_corpus} --layers 2 --tokens 12000 "
    extract += "--ctx-len 64 --batch-size 4 --shard-tokens 512"
    args = ["--cache", str(cache), "--layer", "2", "--variant", "standard"]
    args += ["--set", "d_sae=128", "--batch-size", "128", "--checkpoint-every", "10"]
    args += ["--eval-tokens", "1024", f"--stream={extract}", "--out", str(out)]
    return args + (["--disk-budget", str(BUDGET)] if budget else [])


@pytest.fixture(scope="module")
def unbudgeted(tiny_model_dir, tiny_corpus, tmp_path_factory) -> Path:
    """The same stream with no budget: every shard stays on disk."""
    root = tmp_path_factory.mktemp("stream")
    assert train.main(argv(tiny_model_dir, tiny_corpus, root / "c", root / "run", False)) == 0
    return root


def test_budgeted_stream_trains_the_weights_of_the_unbudgeted_one(
    unbudgeted, tiny_model_dir, tiny_corpus, tmp_path
):
    cache, out = tmp_path / "c", tmp_path / "run"
    assert train.main(argv(tiny_model_dir, tiny_corpus, cache, out, True)) == 0
    assert_same_weights(out, unbudgeted / "run")
    shards = json.loads((cache / MANIFEST).read_text())["shards"]
    assert sum(s.get("deleted", False) for s in shards) > 0  # the budget made it delete
    on_disk = sum(f.stat().st_size for f in cache.rglob("shard_*.npy"))
    assert on_disk <= BUDGET
    seen = runs.read_json(out / SHARDS_SEEN)
    assert seen == runs.read_json(unbudgeted / "run" / SHARDS_SEEN) | {"cache": str(cache)}
    config = runs.read_json(out / runs.CONFIG)
    assert config["cache_manifest_sha256"].startswith("stream:") and config["stream"]


def test_killed_streamed_run_resumes_to_the_same_weights(
    unbudgeted, tiny_model_dir, tiny_corpus, tmp_path
):
    """SIGKILL the trainer as it commits its step-20 checkpoint: the extractor it started exits
    with it; the same command then resumes both sides."""
    cache, out = tmp_path / "c", tmp_path / "run"
    args = argv(tiny_model_dir, tiny_corpus, cache, out, True)
    proc = subprocess.run(
        [sys.executable, "tests/kill_at.py", "checkpoints/20", "1", "train", *args],
        cwd=REPO, capture_output=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert train.main([*args, "--resume"]) == 0
    assert_same_weights(out, unbudgeted / "run")


def test_disk_budget_without_a_stream_is_one_line(capsys):
    assert train.main(["--cache", "c", "--layer", "2", "--variant", "topk", "--disk-budget", "1G"])
    assert "--disk-budget bounds a streamed cache" in capsys.readouterr().err


def test_streamed_sweep_over_sizes_is_refused(tiny_model_dir, tiny_corpus, tmp_path, capsys):
    """Groups train one after the other, but a stream is read once: refused, in one line."""
    args = argv(tiny_model_dir, tiny_corpus, tmp_path / "c", tmp_path / "run", True)
    assert train.main([*args, "--sweep", "d_sae=64,128"]) == 2
    assert "a stream is read once" in capsys.readouterr().err


def test_a_refused_extractor_stops_the_trainer(unbudgeted, tiny_model_dir, tiny_corpus, tmp_path):
    """--stream pointed at a complete cache extracted with other settings: the extractor refuses
    it, and the trainer must stop in one line instead of training on the old cache."""
    out = tmp_path / "run"
    args = argv(tiny_model_dir, tiny_corpus, unbudgeted / "c", out, False)
    args = [a.replace("--ctx-len 64", "--ctx-len 32") for a in args]  # other settings
    manifest = (unbudgeted / "c" / MANIFEST).read_bytes()
    proc = subprocess.run(
        [sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert "the extractor writing" in errors[0] and "settings differ" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not (out / "sae_params.safetensors").exists()
    assert (unbudgeted / "c" / MANIFEST).read_bytes() == manifest
