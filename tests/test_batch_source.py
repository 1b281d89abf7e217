"""The BatchSource protocol and BatchSpec: both loaders implement it, a BatchSpec and the same
settings as keywords give the same batches, and a third source (batches made on the fly, no
cache) trains through the Trainer, which never asks which kind of source it holds."""

import hashlib
import itertools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from jax_sae.data.cache import MANIFEST, ActivationCache
from jax_sae.data.loader import Loader, LoaderError, device_batches
from jax_sae.data.source import BatchSource, BatchSpec, DeviceBatches, SourceDescription
from jax_sae.data.stream import StreamCache, StreamError, StreamingLoader
from jax_sae.report import runs
from jax_sae.training import TrainConfig, Trainer
from jax_sae.training.resolve import resolve_run, run_steps
from tests.test_loader import write_cache
from tests.test_stream import write_stream

TEMPORAL = ("x", "x_prev", "seq_start")
PROTOCOL = [name for name in vars(BatchSource) if not name.startswith("_")]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> ActivationCache:
    rng = np.random.default_rng(1)
    shards = [list(rng.integers(3, 30, size=k)) for k in (9, 4, 12)]
    return write_cache(tmp_path_factory.mktemp("cache") / "c", shards)


@pytest.fixture(scope="module")
def stream(tmp_path_factory) -> Path:
    rng = np.random.default_rng(1)
    shards = [list(rng.integers(3, 20, size=rng.integers(2, 6))) for _ in range(14)]
    return write_stream(tmp_path_factory.mktemp("stream") / "c", shards)


def take(batches: Iterator[dict], n: int) -> list[dict]:
    return [next(batches) for _ in range(n)]


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert set(x) == set(y)
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_the_protocol_names_what_the_trainer_asks():
    assert set(PROTOCOL) >= {
        "spec",
        "single_pass",
        "releases_data",
        "describe",
        "batches",
        "sample",
        "heldout",
        "release_before",
        "record",
    }


def test_the_file_loader_is_a_batch_source_and_takes_a_spec(cache):
    spec = BatchSpec(batch_size=29, seed=4, batch_keys=list(TEMPORAL), scale=0.5)
    assert spec.batch_keys == TEMPORAL and spec.temporal
    loader = Loader(cache, 2, spec, eval_tokens=50, chunk_tokens=25)
    assert all(hasattr(loader, name) for name in PROTOCOL)
    keywords = Loader(
        cache, 2, batch_size=29, seed=4, batch_keys=TEMPORAL, scale=0.5, eval_tokens=50,
        chunk_tokens=25,
    )  # fmt: skip
    assert_same_batches(take(loader.host_batches(), 8), take(keywords.host_batches(), 8))
    assert loader.spec == keywords.spec
    assert not loader.single_pass and not loader.releases_data
    assert loader.record(5) is None and loader.eval_tokens == 50
    assert loader.d_model == cache.d_model and loader.heldout_tokens >= 50
    assert loader.mean_sq_norm() == cache.layer_stats(2)["mean_sq_norm"]
    described = loader.describe()
    assert described.identity == hashlib.sha256((cache.path / MANIFEST).read_bytes()).hexdigest()
    assert described.path == cache.path and described.complete


def test_the_streaming_loader_is_a_batch_source_and_takes_a_spec(stream):
    spec = BatchSpec(batch_size=13, seed=3, batch_keys=TEMPORAL)
    loader = StreamingLoader(StreamCache(stream, poll_s=0.01), 2, spec, window=3, eval_tokens=60)
    assert all(hasattr(loader, name) for name in PROTOCOL)
    keywords = StreamingLoader(
        StreamCache(stream, poll_s=0.01), 2, batch_size=13, seed=3, batch_keys=TEMPORAL,
        window=3, eval_tokens=60,
    )  # fmt: skip
    assert_same_batches(list(loader.host_batches()), list(keywords.host_batches()))
    assert loader.single_pass and loader.releases_data
    assert loader.record(4)["steps"] == 4 and loader.eval_tokens == 60
    assert loader.describe().identity.startswith("stream:")


def test_a_spec_checks_itself_and_comes_once(cache, stream):
    with pytest.raises(LoaderError, match="batch keys"):
        BatchSpec(batch_size=8, batch_keys=("x_next",))
    with pytest.raises(LoaderError, match="must lie in a batch of 8 and come with a sharding"):
        BatchSpec(batch_size=8, rows=slice(0, 4))
    with pytest.raises(TypeError, match="beside a BatchSpec"):
        Loader(cache, 2, BatchSpec(batch_size=8), seed=3)
    with pytest.raises(StreamError, match="--stream runs in one process"):
        StreamingLoader(
            StreamCache(stream, poll_s=0.01),
            2,
            BatchSpec(batch_size=8, sharding=object(), rows=slice(0, 4)),
        )


class GaussianSource:
    """A third kind of source: sparse combinations of fixed directions, drawn for each step on
    the fly from ``(seed, step)`` (no cache on disk)."""

    single_pass = False
    releases_data = False

    def __init__(self, spec: BatchSpec, d_model: int = 16, eval_tokens: int = 256) -> None:
        self.spec = spec
        self.d_model = d_model
        self.n_train = 100 * spec.batch_size
        self.eval_tokens = self.heldout_tokens = eval_tokens
        self.directions = np.random.default_rng(0).normal(size=(32, d_model))

    def rows(self, key: int, n: int) -> np.ndarray:
        rng = np.random.default_rng([self.spec.seed, key])
        codes = rng.exponential(size=(n, 32)) * (rng.random((n, 32)) < 0.1)
        return (codes @ self.directions + 1.0).astype(np.float32)

    def describe(self) -> SourceDescription:
        return SourceDescription(Path("synthetic"), "gaussian:0", True, None, None, "gauss", None)

    def mean_sq_norm(self) -> float:
        return float(np.mean(np.sum(self.rows(10**6, 4096) ** 2, axis=1)))

    def batches(
        self, start_step: int = 0, stop_step: int | None = None, convert_on_device=None
    ) -> DeviceBatches:
        steps = itertools.count(start_step) if stop_step is None else range(start_step, stop_step)
        made = ({"x": self.rows(step, self.spec.batch_size)} for step in steps)
        spec = self.spec
        return device_batches(made, spec.scale, spec.sharding, spec.prefetch, convert_on_device)

    def sample(self, n_tokens: int, windows: int = 16) -> np.ndarray:
        return self.rows(10**6 + 1, n_tokens) * np.float32(self.spec.scale)

    def heldout(self, batch_size: int) -> Iterator[np.ndarray]:
        rows = self.rows(10**6 + 2, self.heldout_tokens)
        for start in range(0, len(rows), batch_size):
            yield rows[start : start + batch_size]

    def release_before(self, step: int) -> None:
        pass

    def record(self, step: int) -> dict | None:
        return None


@pytest.mark.slow
def test_a_source_made_on_the_fly_trains_through_the_trainer(tmp_path, monkeypatch):
    cfg = TrainConfig(
        cache="synthetic",
        layer=0,
        variant="standard",
        hparams={"d_sae": 32, "lr": 0.01, "warmup_steps": 2},
        steps=20,
        batch_size=32,
        checkpoint_every=10,
        log_every=5,
        normalize=False,
        out=str(tmp_path / "run"),
    )
    source = GaussianSource(BatchSpec(batch_size=32, seed=cfg.batch_seed))
    assert run_steps(cfg.replace(steps=None, tokens=None), source) == 100  # one epoch
    record = resolve_run(cfg, source, tmp_path / "run").config
    assert record.cache_manifest_sha256 == "gaussian:0" and record.dataset == "gauss"
    monkeypatch.setattr(Trainer, "_loader", lambda self, producer: source)
    (finished,) = Trainer(cfg).fit()
    assert finished.status == runs.FINISHED and finished.fast_eval["n_tokens"] == 256
    written = runs.read_json(tmp_path / "run" / runs.CONFIG)
    assert written["cache_manifest_sha256"] == "gaussian:0" and written["steps"] == 20
    assert not (tmp_path / "run" / "shards_seen.json").exists()
