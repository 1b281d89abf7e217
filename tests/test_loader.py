"""The training loader: token order, resume, held-out split, temporal predecessors, prefetch."""

import threading

import numpy as np
import pytest

from jax_sae.data.cache import ActivationCache, CacheError, CacheWriter
from jax_sae.data.loader import Loader, LoaderError, Prefetcher, make_chunks, norm_scale

D = 8
LAYERS = [2, 5]
TEMPORAL_KEYS = ("x", "x_prev", "seq_start")


def write_cache(path, shard_lengths, dtype="float32", seed=0):
    """A cache whose layer-2 column 0 holds the global token index (exact in float32)."""
    rng = np.random.default_rng(seed)
    writer = CacheWriter(
        path,
        layers=LAYERS,
        d_model=D,
        dtype=dtype,
        settings={"ctx_len": 32},
        metadata={"model": "test"},
    )
    start = 0
    for lengths in shard_lengths:
        n = sum(lengths)
        acts = {layer: rng.normal(size=(n, D)).astype(np.float32) for layer in LAYERS}
        acts[2][:, 0] = np.arange(start, start + n)
        positions = np.concatenate([np.arange(1, m + 1) for m in lengths])
        writer.write_shard(acts, np.arange(start, start + n), positions, len(lengths))
        start += n
    writer.finish()
    return ActivationCache(path)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    rng = np.random.default_rng(1)
    shards = [list(rng.integers(3, 30, size=k)) for k in (9, 4, 12)]
    return write_cache(tmp_path_factory.mktemp("cache") / "c", shards)


def index_of(batch):
    """Recover the token index from the marker column (loader scale 1)."""
    return batch["x"][:, 0].astype(np.int64)


def take(it, n):
    return [next(it) for _ in range(n)]


def test_batches_are_cache_rows_and_deterministic_for_a_seed(cache):
    kw = {"batch_size": 37, "eval_tokens": 50, "chunk_tokens": 40, "buffer_chunks": 3}
    a = take(Loader(cache, 2, seed=7, **kw).host_batches(), 12)
    b = take(Loader(cache, 2, seed=7, **kw).host_batches(), 12)
    c = take(Loader(cache, 2, seed=8, **kw).host_batches(), 12)
    loader = Loader(cache, 2, seed=7, **kw)
    acts = cache.acts(2)[:]
    for step, (x, y) in enumerate(zip(a, b, strict=True)):
        assert x["x"].dtype == np.float32 and x["x"].shape == (37, D)
        np.testing.assert_array_equal(x["x"], y["x"])
        np.testing.assert_array_equal(index_of(x), loader.plan.batch_indices(step))
        np.testing.assert_array_equal(x["x"], acts[index_of(x)])
    assert any(not np.array_equal(x["x"], z["x"]) for x, z in zip(a, c, strict=True))


@pytest.mark.parametrize("start", [1, 5, 11, 23])
def test_resume_at_a_step_gives_the_same_following_batches(cache, start):
    # 23 batches of 41 span more than two epochs of this cache's training part
    kw = {"batch_size": 41, "seed": 3, "eval_tokens": 60, "chunk_tokens": 33, "buffer_chunks": 2}
    loader = Loader(cache, 2, **kw)
    assert 2 * loader.n_train < 23 * 41
    full = take(loader.host_batches(0), 30)
    resumed = take(Loader(cache, 2, **kw).host_batches(start), 30 - start)
    for x, y in zip(full[start:], resumed, strict=True):
        np.testing.assert_array_equal(x["x"], y["x"])


def test_every_training_token_once_per_epoch_and_never_a_heldout_one(cache):
    loader = Loader(cache, 2, batch_size=29, seed=0, eval_tokens=100, chunk_tokens=25)
    n_train = loader.n_train
    steps = 3 * n_train // 29 + 1
    seen = np.concatenate([index_of(b) for b in take(loader.host_batches(), steps)])
    for epoch in range(3):
        visited = seen[epoch * n_train : (epoch + 1) * n_train]
        np.testing.assert_array_equal(np.sort(visited), np.arange(n_train))
    assert seen.max() < loader.train_end == n_train
    # the held-out part is the tail from a sequence start, at least eval_tokens long
    assert cache.sequence_starts()[loader.train_end]
    assert cache.n_tokens - loader.train_end >= 100
    heldout = np.concatenate(list(loader.heldout(64)))
    np.testing.assert_array_equal(heldout, cache.acts(2)[loader.train_end :])


def test_chunks_cover_training_part_without_crossing_shards():
    chunks = make_chunks([100, 7, 50], end=140, chunk_tokens=30)
    np.testing.assert_array_equal(chunks[:, 0][1:], chunks[:, 1][:-1])
    assert chunks[0, 0] == 0 and chunks[-1, 1] == 140
    assert (chunks[:, 1] - chunks[:, 0]).max() <= 30
    for a, b in chunks:
        assert not (a < 100 < b or a < 107 < b)


def test_temporal_predecessor_is_the_previous_token_of_the_same_sequence(cache):
    loader = Loader(
        cache, 2, batch_size=64, seed=1, eval_tokens=40, chunk_tokens=50, batch_keys=TEMPORAL_KEYS
    )
    acts, tokens = cache.acts(2)[:], cache.tokens()[:]
    positions, starts = cache.positions()[:], cache.sequence_starts()
    n_starts = 0
    for step, batch in enumerate(take(loader.host_batches(), 20)):
        idx = loader.plan.batch_indices(step)
        np.testing.assert_array_equal(batch["x"], acts[idx])
        np.testing.assert_array_equal(batch["seq_start"], starts[idx])
        first = positions[idx] == 1
        np.testing.assert_array_equal(batch["seq_start"], first)
        n_starts += first.sum()
        assert not batch["x_prev"][first].any()
        # the predecessor row is the cached token just before, one position earlier
        prev = index_of({"x": batch["x_prev"]})[~first]
        np.testing.assert_array_equal(prev, idx[~first] - 1)
        np.testing.assert_array_equal(positions[prev] + 1, positions[idx[~first]])
        np.testing.assert_array_equal(tokens[prev], tokens[idx[~first]] - 1)
        np.testing.assert_array_equal(batch["x_prev"][~first], acts[prev])
    assert n_starts > 0


def test_normalisation_scale_and_bfloat16_storage(tmp_path):
    cache = write_cache(tmp_path / "bf16", [[20, 30], [25]], dtype="bfloat16")
    scale = norm_scale(cache, 5)
    acts = cache.acts(5)[:].astype(np.float64)
    np.testing.assert_allclose(np.mean(np.sum((scale * acts) ** 2, axis=1)), D, rtol=1e-5)
    loader = Loader(cache, 5, batch_size=16, seed=2, scale=scale, chunk_tokens=10)
    for step, batch in enumerate(take(loader.host_batches(), 6)):
        expected = scale * acts[loader.plan.batch_indices(step)]
        np.testing.assert_allclose(batch["x"], expected, rtol=1e-6)


def test_bad_requests_fail_with_one_line_errors(cache):
    with pytest.raises(CacheError, match=r"layer 3 is not in cache .*\[2, 5\]"):
        Loader(cache, 3, batch_size=8)
    with pytest.raises(LoaderError, match="eval-tokens"):
        Loader(cache, 2, batch_size=8, eval_tokens=cache.n_tokens)
    with pytest.raises(LoaderError, match="batch-size"):
        Loader(cache, 2, batch_size=cache.n_tokens + 1)


@pytest.mark.parametrize("convert_on_device", [False, True])
def test_device_batches_match_host_batches_and_stop(cache, convert_on_device):
    kw = {"batch_size": 32, "seed": 4, "chunk_tokens": 64, "batch_keys": TEMPORAL_KEYS}
    kw |= {"scale": 0.3}
    host = take(Loader(cache, 2, **kw).host_batches(3), 5)
    with Loader(cache, 2, prefetch=2, **kw).batches(3, 8, convert_on_device) as device:
        got = list(device)
    assert len(got) == 5
    for h, d in zip(host, got, strict=True):
        assert set(d) == set(TEMPORAL_KEYS)
        for key in TEMPORAL_KEYS:
            np.testing.assert_array_equal(np.asarray(d[key]), h[key])
    # an endless stream stops cleanly when the consumer leaves early
    before = threading.active_count()
    with Loader(cache, 2, **kw).batches(convert_on_device=convert_on_device) as device:
        next(device)
    assert threading.active_count() == before


def test_prefetch_errors_reach_the_consumer():
    def source():
        yield 1
        raise OSError("disk gone")

    with Prefetcher(source(), lambda v: v * 10, depth=2) as it:
        assert next(it) == 10
        with pytest.raises(OSError, match="disk gone"):
            next(it)
