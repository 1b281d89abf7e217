"""The feature browser: a static HTML page of a trained SAE's latents (`make features RUN=...`).

    python -m jax_sae.features RUN [--cache DIR] [--out DIR] [--tokens N] [--top K] [--model DIR]

One pass over the cache's activations at the run's layer (a labelled progress bar) collects, for
every latent: how often it fires (code > 0), its mean and largest activation, a histogram of its
nonzero activations on log-spaced bins, and the K tokens where it is largest. The page then shows,
per latent, those tokens in their context (the activating token highlighted, its activation
beside it), the histogram, the tokens its decoder direction writes to most through the model's
unembedding (``W_U d_i``, before the final norm, when the model's weights are on this machine),
and on a synthetic world (a cache with ``ground_truth.safetensors``) the true feature its decoder
direction matches best and their cosine. The overview lists every latent by firing rate with a
search box (a latent's number, or text of its top tokens) and the histogram of firing rates.

Why a static folder: it opens from disk in any browser with no server, and it can be copied next
to a paper's data. Per-latent details live in ``data/latents_NNN.js`` files of 256 latents that
the page loads only when one of their latents is opened, so a 16k-latent page opens at once.
Written to ``RUN/features`` unless ``--out`` says otherwise; a folder this module did not write
is never overwritten.

Above every layer (like ``jax_sae.sae``): it uses ``jax_sae.SAE`` for encoding, so the run's
input scale and inference threshold are applied exactly as everywhere else.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from dataclasses import dataclass
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jax_sae.data.cache import ActivationCache, CacheError
from jax_sae.report import runs
from jax_sae.sae import SAE, SAEError
from jax_sae.util.cli import OneLineParser
from jax_sae.util.files import write_bytes_atomic

TOP_CONTEXTS = 20
CONTEXT_BEFORE, CONTEXT_AFTER = 12, 4
"""Tokens shown before and after the activating token, within its sequence."""
HISTOGRAM_BINS = 30
CHUNK_TOKENS = 4096
LATENTS_PER_FILE = 256
OUTPUT_TOKENS = 8
SUMMARY = "features.json"
"""Written last; its presence marks a folder this module wrote (and may overwrite)."""
GROUND_TRUTH = "ground_truth.safetensors"
"""A synthetic world's true dictionary beside its cache (written by ``synth.make_world``)."""
PAGE_ASSET = "feature_page.html"


class FeaturesError(ValueError):
    """An input the browser cannot use; the message names the fix."""


@dataclass
class LatentStats:
    """What one pass over the cache collected, per latent (arrays of length d_code first)."""

    n_tokens: int
    fire_counts: np.ndarray
    act_sums: np.ndarray
    top_values: np.ndarray
    """[d_code, K] largest activations, descending; 0 where the latent fired fewer than K times."""
    top_rows: np.ndarray
    """[d_code, K] cache rows of ``top_values``."""
    histogram: np.ndarray
    """[d_code, HISTOGRAM_BINS] counts of nonzero activations per log-spaced bin."""
    bin_edges: np.ndarray
    """[HISTOGRAM_BINS + 1] activation values of the bin edges (values outside: the end bins)."""


def histogram_edges(first_codes: np.ndarray) -> np.ndarray:
    """Log-spaced bin edges spanning the first chunk's nonzero activations, a decade wider on
    each side (later values outside land in the end bins)."""
    positive = first_codes[first_codes > 0]
    if positive.size == 0:
        low, high = -3.0, 1.0
    else:
        low = float(np.log10(np.quantile(positive, 0.001))) - 1
        high = float(np.log10(positive.max())) + 1
    return np.logspace(low, high, HISTOGRAM_BINS + 1)


@partial(jax.jit, static_argnames="top")
def _accumulate(
    carry: tuple,
    codes: jax.Array,
    first_row: jax.Array,
    n_valid: jax.Array,
    log_edges: jax.Array,
    top: int,
) -> tuple:
    """Fold one chunk of codes [B, F] into the running counts, sums, top-K and histogram."""
    counts, sums, top_values, top_rows, histogram = carry
    valid = jnp.arange(codes.shape[0]) < n_valid
    codes = jnp.where(valid[:, None], jnp.maximum(codes, 0.0), 0.0)
    fired = codes > 0
    counts = counts + fired.sum(0)
    sums = sums + codes.sum(0)
    values, rows = jax.lax.top_k(codes.T, top)
    values = jnp.concatenate([top_values, values], axis=1)
    rows = jnp.concatenate([top_rows, rows + first_row], axis=1)
    top_values, keep = jax.lax.top_k(values, top)
    top_rows = jnp.take_along_axis(rows, keep, axis=1)
    width = (log_edges[-1] - log_edges[0]) / (log_edges.shape[0] - 1)
    bins = jnp.floor((jnp.log10(jnp.maximum(codes, 1e-30)) - log_edges[0]) / width)
    bins = jnp.clip(bins, 0, log_edges.shape[0] - 2).astype(jnp.int32)
    latent = jnp.broadcast_to(jnp.arange(codes.shape[1]), codes.shape)
    histogram = histogram.at[latent, bins].add(fired.astype(jnp.int32))
    return counts, sums, top_values, top_rows, histogram


def collect(
    sae: SAE,
    acts: Any,
    n_tokens: int,
    top: int = TOP_CONTEXTS,
    chunk: int = CHUNK_TOKENS,
    progress: bool = True,
) -> LatentStats:
    """One pass over ``acts[:n_tokens]`` (raw activations [N, d_in], e.g. a cache layer)."""
    chunk = max(chunk, top)
    carry: tuple | None = None
    edges = np.zeros(0)
    bar = tqdm(
        total=n_tokens,
        unit="tok",
        unit_scale=True,
        desc="features: encoding the cache",
        disable=not progress,
    )
    for start in range(0, n_tokens, chunk):
        batch = np.asarray(acts[start : min(start + chunk, n_tokens)], np.float32)
        n_valid = len(batch)
        if n_valid < chunk:  # one compiled shape for every chunk
            batch = np.concatenate([batch, np.zeros((chunk - n_valid, batch.shape[1]), np.float32)])
        codes = sae.encode(batch)
        if carry is None:
            edges = histogram_edges(np.asarray(codes[:n_valid]))
            width = codes.shape[1]
            carry = (
                jnp.zeros(width, jnp.int32),
                jnp.zeros(width, jnp.float32),
                jnp.zeros((width, top), jnp.float32),
                jnp.zeros((width, top), jnp.int32),
                jnp.zeros((width, HISTOGRAM_BINS), jnp.int32),
            )
        carry = _accumulate(
            carry,
            codes,
            jnp.int32(start),
            jnp.int32(n_valid),
            jnp.asarray(np.log10(edges), jnp.float32),
            top,
        )
        bar.update(n_valid)
    bar.close()
    assert carry is not None, "collect needs at least one token"
    counts, sums, top_values, top_rows, histogram = (np.asarray(a) for a in carry)
    return LatentStats(n_tokens, counts, sums, top_values, top_rows, histogram, edges)


def decoder_directions(sae: SAE, block: int = 1024) -> np.ndarray:
    """[d_code, d_in] what each latent adds to the reconstruction at activation 1, in the units
    of the raw activations: ``decode(e_i) - decode(0)``, for any variant's (linear) decoder."""
    zero = np.asarray(sae.decode(np.zeros((1, sae.d_code), np.float32)))
    rows = []
    for start in range(0, sae.d_code, block):
        n = min(block, sae.d_code - start)
        basis = np.zeros((n, sae.d_code), np.float32)  # rows start .. start + n of the identity
        basis[np.arange(n), start + np.arange(n)] = 1.0
        rows.append(np.asarray(sae.decode(basis)) - zero)
    return np.concatenate(rows)


def unit_rows(a: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    return a / np.where(norms > 0, norms, 1.0)


def match_true_features(
    directions: np.ndarray, true_vectors: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """For each latent, the true feature of largest cosine with its decoder direction, and that
    cosine: (indices [d_code], cosines [d_code])."""
    cos = unit_rows(directions) @ unit_rows(true_vectors).T
    best = cos.argmax(axis=1)
    return best, cos[np.arange(len(best)), best]


def output_token_ids(
    directions: np.ndarray, unembedding: np.ndarray, n: int = OUTPUT_TOKENS, block: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """The n tokens each direction raises most through the unembedding [vocab, d]: (ids, logit
    effects), each [d_code, n], computed on the device a block of latents at a time."""
    w_u = jnp.asarray(unembedding, jnp.float32)
    top = jax.jit(lambda d: jax.lax.top_k(d @ w_u.T, n))
    ids, values = [], []
    for start in tqdm(
        range(0, len(directions), block),
        desc="features: output tokens",
        disable=len(directions) <= block,
    ):
        v, i = top(jnp.asarray(directions[start : start + block], jnp.float32))
        ids.append(np.asarray(i))
        values.append(np.asarray(v))
    return np.concatenate(ids), np.concatenate(values)


# --- the model's tokenizer and unembedding --------------------------------------------------


def model_folder(name: str | None) -> Path | None:
    """A local folder of the model: ``name`` itself, or its copy in the Hugging Face cache
    (never downloaded: the browser works offline). None where neither exists."""
    if not name:
        return None
    if Path(name).is_dir():
        return Path(name)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # not in the cache, or not a repository name at all
        return None


def read_unembedding(folder: Path) -> np.ndarray | None:
    """[vocab, d_model] of the model's safetensors weights (``lm_head.weight``, or the tied input
    embedding); None where the folder holds neither."""
    from safetensors import safe_open

    for key in ("lm_head.weight", "model.embed_tokens.weight", "embed_tokens.weight"):
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(file, framework="flax") as weights:
                if key in weights.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    return np.asarray(weights.get_tensor(key), np.float32)
    return None


def token_texts(folder: Path | None, ids: np.ndarray) -> dict[int, str]:
    """Each distinct id in ``ids`` as text (the tokenizer's own decoding); ``#id`` without a
    tokenizer (a synthetic world)."""
    distinct = [int(i) for i in np.unique(ids) if i >= 0]
    if folder is not None and any(folder.glob("tokenizer*")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        return {i: tokenizer.decode([i]) for i in distinct}
    return {i: f"#{i}" for i in distinct}


# --- the page -----------------------------------------------------------------------------


def context_window(row: int, starts: np.ndarray) -> tuple[int, int]:
    """Rows [first, last) shown around ``row``: up to CONTEXT_BEFORE tokens before it and
    CONTEXT_AFTER after it, never crossing into another sequence (``starts``: True where a row
    begins a sequence, ``ActivationCache.sequence_starts``)."""
    first = row
    while first > max(0, row - CONTEXT_BEFORE) and not starts[first]:
        first -= 1
    last = row + 1
    while last < min(len(starts), row + CONTEXT_AFTER + 1) and not starts[last]:
        last += 1
    return first, last


def rate_histogram(rates: np.ndarray) -> dict[str, Any]:
    """Firing rates of the live latents on decade-aligned log10 bins, and the dead count."""
    live = rates[rates > 0]
    if live.size == 0:
        return {"edges": [], "counts": [], "dead": int(rates.size)}
    low, high = math.floor(np.log10(live.min())), math.ceil(np.log10(live.max()) + 1e-9)
    edges = np.linspace(low, max(high, low + 1), 4 * (max(high, low + 1) - low) + 1)
    counts, _ = np.histogram(np.log10(live), bins=edges)
    return {"edges": edges.tolist(), "counts": counts.tolist(), "dead": int((rates == 0).sum())}


def rounded(x: float) -> float:
    """Four significant digits: enough for a page, and the files stay small."""
    return float(f"{x:.4g}")


@dataclass
class Extras:
    """What the page shows beyond the pass over the cache, where it is available."""

    output_ids: np.ndarray | None = None
    output_values: np.ndarray | None = None
    match: np.ndarray | None = None
    match_cos: np.ndarray | None = None


def build_page_data(
    stats: LatentStats, starts: np.ndarray, tokens: Any, texts_of: Any, extras: Extras
) -> tuple[list[list], list[dict]]:
    """(one overview row per latent, one detail record per latent) for the page's files."""
    windows = []
    for latent in range(len(stats.fire_counts)):
        shown = []
        for row, value in zip(
            stats.top_rows[latent].tolist(), stats.top_values[latent].tolist(), strict=True
        ):
            if value <= 0:
                break
            first, last = context_window(row, starts)
            shown.append((np.asarray(tokens[first:last]), row - first, value))
        windows.append(shown)
    ids = [w[0] for shown in windows for w in shown]
    if extras.output_ids is not None:
        ids.append(extras.output_ids.ravel())
    texts = texts_of(np.concatenate(ids) if ids else np.zeros(0, np.int64))
    rates = stats.fire_counts / stats.n_tokens
    overview, details = [], []
    for latent, shown in enumerate(windows):
        fired = int(stats.fire_counts[latent])
        outputs = []
        if extras.output_ids is not None and extras.output_values is not None:
            outputs = [
                [texts[int(i)], rounded(float(v))]
                for i, v in zip(
                    extras.output_ids[latent], extras.output_values[latent], strict=True
                )
            ]
        top_tokens = " ".join(texts[int(w[0][w[1]])] for w in shown[:3])
        overview.append(
            [
                latent,
                rounded(float(rates[latent])),
                rounded(float(stats.act_sums[latent] / fired)) if fired else 0.0,
                rounded(float(stats.top_values[latent, 0])),
                top_tokens,
                " ".join(text for text, _ in outputs[:3]),
                None if extras.match is None else int(extras.match[latent]),
                None if extras.match_cos is None else rounded(float(extras.match_cos[latent])),
            ]
        )
        details.append(
            {
                "histogram": stats.histogram[latent].tolist(),
                "contexts": [[[texts[int(t)] for t in w[0]], w[1], rounded(w[2])] for w in shown],
                "outputs": outputs,
            }
        )
    return overview, details


def check_out(out: Path) -> None:
    """``out`` may take a page: new or empty, or a page this module wrote before (its files are
    replaced). Anything else is refused, never overwritten."""
    if out.exists() and not out.is_dir():
        raise FeaturesError(f"{out} is a file; pass --out a new folder")
    if out.is_dir() and any(out.iterdir()) and not (out / SUMMARY).is_file():
        raise FeaturesError(
            f"{out} holds files this browser did not write (no {SUMMARY}); pass --out a new folder"
        )


def prepare_out(out: Path) -> None:
    """``check_out``, then an empty ``data/`` (the latents files of an earlier page go). The
    folder is marked as this module's before anything is written in it, so that an interrupted
    write can be redone."""
    check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out / SUMMARY, b'{"complete": false}')
    if (out / "data").is_dir():
        shutil.rmtree(out / "data")
    (out / "data").mkdir(parents=True)


def js_assignment(target: str, value: Any) -> bytes:
    """A script that hands ``value`` to the page: files opened from disk cannot be fetched as
    JSON (browsers block file:// requests), but they can be loaded as scripts."""
    return f"{target}({json.dumps(value, separators=(',', ':'))});\n".encode()


def write_page(
    out: Path,
    meta: dict[str, Any],
    overview: list[list],
    details: list[dict],
    rates: np.ndarray,
    bin_edges: np.ndarray,
) -> Path:
    """The page's files: index.html, data/summary.js, data/latents_NNN.js, features.json."""
    prepare_out(out)
    summary = {
        "meta": meta,
        "rate_histogram": rate_histogram(rates),
        "bin_edges": [rounded(float(e)) for e in bin_edges],
        "latents_per_file": LATENTS_PER_FILE,
        "latents": overview,
    }
    write_bytes_atomic(out / "data" / "summary.js", js_assignment("showSummary", summary))
    for first in range(0, len(details), LATENTS_PER_FILE):
        chunk = {"first": first, "latents": details[first : first + LATENTS_PER_FILE]}
        name = f"latents_{first // LATENTS_PER_FILE:03d}.js"
        write_bytes_atomic(out / "data" / name, js_assignment("receiveLatents", chunk))
    page = resources.files("jax_sae").joinpath("assets", PAGE_ASSET).read_bytes()
    write_bytes_atomic(out / "index.html", page)
    columns = [
        "latent",
        "firing_rate",
        "mean_activation",
        "max_activation",
        "top_tokens",
        "output_tokens",
        "true_feature",
        "true_cosine",
    ]
    record = {"meta": meta, "columns": columns, "latents": overview}
    write_bytes_atomic(out / SUMMARY, json.dumps(record).encode())
    return out / "index.html"


# --- the command --------------------------------------------------------------------------


def open_cache(sae: SAE, cache_arg: Path | None) -> ActivationCache:
    """The cache to browse: ``--cache``, else the one the run trained on; checked to hold the
    run's layer at the run's width."""
    where = cache_arg or sae.config.get("cache")
    if where is None:
        raise FeaturesError(f"{sae.source} names no cache (a streamed run); pass --cache DIR")
    try:
        cache = ActivationCache(where)
    except CacheError as error:
        fix = "" if cache_arg else " (the cache the run trained on; pass --cache DIR for another)"
        raise FeaturesError(f"{error}{fix}") from None
    layer = sae.config.get("layer", cache.layers[0])
    if layer not in cache.layers or cache.d_model != sae.d_in:
        raise FeaturesError(
            f"{cache.path} holds layers {cache.layers} of width {cache.d_model}; the SAE reads "
            f"layer {layer} of width {sae.d_in}: pass --cache a cache of that layer"
        )
    return cache


def extras_for(
    sae: SAE, cache: ActivationCache, directions: np.ndarray, model: Path | None, notes: list[str]
) -> Extras:
    """Output tokens where the unembedding is found, true-feature matches on a synthetic world;
    a note for the page where either is missing."""
    extras = Extras()
    if (cache.path / GROUND_TRUTH).is_file():
        from safetensors.numpy import load_file

        truth = load_file(cache.path / GROUND_TRUTH)["feature_vectors"]
        extras.match, extras.match_cos = match_true_features(directions, truth)
        return extras
    unembedding = read_unembedding(model) if model is not None else None
    if unembedding is not None and unembedding.shape[1] == sae.d_in:
        extras.output_ids, extras.output_values = output_token_ids(directions, unembedding)
    else:
        notes.append(
            "output tokens: the model's unembedding was not found on this machine "
            "(pass --model DIR, a folder with its safetensors weights)"
        )
    return extras


def make_page(
    run: Path,
    out: Path | None = None,
    cache_arg: Path | None = None,
    tokens: int | None = None,
    top: int = TOP_CONTEXTS,
    model_arg: Path | None = None,
    progress: bool = True,
) -> Path:
    """Write the feature page of ``run`` (see the module docstring); returns index.html."""
    try:
        sae = SAE.load(run)
    except SAEError as error:
        raise FeaturesError(str(error)) from None
    out = Path(out) if out is not None else Path(run) / "features"
    check_out(out)  # refuse a foreign folder before the long pass
    cache = open_cache(sae, cache_arg)
    n_tokens = min(tokens or cache.n_tokens, cache.n_tokens)
    stats = collect(
        sae, cache.acts(sae.config.get("layer", cache.layers[0])), n_tokens, top, progress=progress
    )
    notes: list[str] = []
    model = model_arg or model_folder(cache.manifest.get("model"))
    extras = extras_for(sae, cache, decoder_directions(sae), model, notes)
    tokenizer = model_arg or model_folder(cache.manifest.get("tokenizer"))
    overview, details = build_page_data(
        stats,
        cache.sequence_starts()[:n_tokens],
        cache.tokens()[:n_tokens],  # read once: the contexts slice it thousands of times
        partial(token_texts, tokenizer),
        extras,
    )
    rates = stats.fire_counts / n_tokens
    meta = {
        "run": str(run),
        "variant": sae.variant.name,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "d_code": sae.d_code,
        "hook_name": sae.hook_name,
        "cache": str(cache.path),
        "model": cache.manifest.get("model"),
        "tokens": n_tokens,
        "top": top,
        "dead": int((stats.fire_counts == 0).sum()),
        "synthetic": extras.match is not None,
        "output_tokens": extras.output_ids is not None,
        "notes": notes,
        "status": sae.status or runs.FINISHED,
    }
    return write_page(out, meta, overview, details, rates, stats.bin_edges)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m jax_sae.features", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a run folder, sweep member or checkpoint step")
    parser.add_argument("--cache", type=Path, help="cache to browse (default: the run's own)")
    parser.add_argument("--out", type=Path, help="output folder (default: RUN/features)")
    parser.add_argument("--tokens", type=int, help="read only the first N tokens (default: all)")
    parser.add_argument("--top", type=int, default=TOP_CONTEXTS, help="contexts per latent")
    parser.add_argument(
        "--model",
        type=Path,
        help="model folder for the tokenizer and "
        "unembedding (default: the cache's model, if it is on this machine)",
    )
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    if args.top < 1 or (args.tokens is not None and args.tokens < 1):
        print("error: --top and --tokens must be at least 1", file=sys.stderr)
        return 2
    try:
        page = make_page(args.run, args.out, args.cache, args.tokens, args.top, args.model)
    except FeaturesError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {page}: open it in a browser (file://{page.resolve()})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
