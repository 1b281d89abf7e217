"""Ground-truth metrics SAELens's `eval_sae_on_synthetic_data` does not compute: absorption on
planted hierarchies, adjacent-token stability, firing-rate spread, co-firing decoder overlap,
per-true-feature detection and feature recovery beside its chance line.

Pure NumPy/SciPy on boolean firing matrices ([tokens, features] `scipy.sparse` CSR, True where a
code is non-zero), so they run in either environment and are checked on hand-built cases. The
structure metrics have no "better" direction of their own: the true features have a value too, and
`anchored` reports the SAE's distance to it.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def heldout_codes(truth: dict[str, np.ndarray]) -> sp.csr_matrix:
    """The true codes [tokens, features] of a world's held-out tail, from the CSR arrays of its
    `ground_truth.safetensors` (they start at token `heldout_offset` of the cache)."""
    indptr = truth["heldout_indptr"]
    shape = (len(indptr) - 1, truth["feature_vectors"].shape[0])
    return sp.csr_matrix((truth["heldout_values"], truth["heldout_indices"], indptr), shape=shape)


def firing(codes: np.ndarray | sp.spmatrix) -> sp.csr_matrix:
    """Boolean CSR firing matrix of a code matrix (dense or sparse)."""
    matrix = sp.csr_matrix(codes)
    matrix.eliminate_zeros()
    return sp.csr_matrix(matrix != 0, dtype=bool)


def best_latents(decoder: np.ndarray, true_directions: np.ndarray) -> np.ndarray:
    """For each true feature, the SAE latent whose decoder row has the highest cosine with it.

    Cosine of directions (not best F1): it depends on the dictionary alone, so a latent that
    absorbed its parent still counts as the child's latent, and it matches SAELens's matching.
    """
    dec = decoder / np.maximum(np.linalg.norm(decoder, axis=1, keepdims=True), 1e-12)
    true = true_directions / np.maximum(
        np.linalg.norm(true_directions, axis=1, keepdims=True), 1e-12
    )
    return np.argmax(true @ dec.T, axis=1)


def _column_counts(matrix: sp.spmatrix) -> np.ndarray:
    return np.asarray(matrix.sum(axis=0), dtype=np.int64).ravel()


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Element-wise ratio, NaN where the denominator is 0 (an undefined rate, not a zero one)."""
    out = np.full(len(numerator), np.nan)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def _mean(values: np.ndarray) -> float | None:
    """Mean of the defined (non-NaN) values; None when there are none."""
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if len(defined) else None


def _listed(values: np.ndarray) -> list[float | None]:
    return [None if np.isnan(v) else float(v) for v in values]


def absorption(
    true_fires: sp.csr_matrix,
    sae_fires: sp.csr_matrix,
    parent: np.ndarray,
    latent_of: np.ndarray,
    min_tokens: int = 5,
) -> dict:
    """Absorption over planted parent-child pairs, measured where the child is detected.

    For a pair (P, C) whose child fires on at least `min_tokens` tokens, with m the matching:
    `child_recall`, the fraction of C's tokens where m(C) fires; `child_precision`, the fraction of
    m(C)'s firings that are on C's tokens; absorption, among C's tokens where m(C) fires, the
    fraction where m(P) is silent. Absorption needs the child detected: a pair whose m(C) never
    fires on C's tokens has no absorption rate (counted in `n_undetected`, left out of `rate`), so
    an SAE blind to children cannot score "no absorption". Each is averaged over the pairs where
    it is defined.
    """
    children = np.flatnonzero(parent >= 0)
    children = children[_column_counts(true_fires[:, children]) >= min_tokens]
    child_tokens = true_fires[:, children]
    child_latent = sae_fires[:, latent_of[children]]
    parent_latent = sae_fires[:, latent_of[parent[children]]]
    detected = child_tokens.multiply(child_latent)
    n_detected = _column_counts(detected)
    n_kept = _column_counts(detected.multiply(parent_latent))
    rate = _ratio(n_detected - n_kept, n_detected)
    recall = _ratio(n_detected, _column_counts(child_tokens))
    precision = _ratio(n_detected, _column_counts(child_latent))
    return {
        "rate": _mean(rate),
        "child_recall": _mean(recall),
        "child_precision": _mean(precision),
        "n_pairs": int(len(children)),
        "n_undetected": int(np.sum(n_detected == 0)),
        "per_pair": {
            "child": children.tolist(),
            "absorption": _listed(rate),
            "recall": _listed(recall),
            "precision": _listed(precision),
        },
    }


def _row_top(matrix: sp.csr_matrix, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of `matrix`, the column of its stored entry with the largest `values` (one value per
    stored entry) and that value; column -1 and value -inf for an empty row."""
    counts = np.diff(matrix.indptr)
    order = np.lexsort((-values, np.repeat(np.arange(matrix.shape[0]), counts)))
    has = counts > 0
    first = order[matrix.indptr[:-1][has]]
    column = np.full(matrix.shape[0], -1)
    best = np.full(matrix.shape[0], -np.inf)
    column[has], best[has] = matrix.indices[first], values[first]
    return column, best


def saebench_absorption(
    true_codes: sp.spmatrix,
    sae_codes: sp.spmatrix,
    decoder: np.ndarray,
    true_directions: np.ndarray,
    parent: np.ndarray,
    latent_of: np.ndarray,
    min_tokens: int = 5,
    cos_threshold: float = 0.025,
    projection_threshold: float = 0.4,
) -> dict:
    """SAEBench's full-absorption rate with the ground truth in place of its probe.

    SAEBench counts, among a concept's true positives, the tokens where the concept's main latents
    are silent and the latent projecting most onto the probe direction is aligned with it (cosine
    >= 0.025) and carries >= 40% of the activation's projection. Here the concept is a parent P
    (a feature with children), the probe its true direction d_P, the main latent m(P), and the
    projection to explain P's true magnitude c_P: a token where P fires counts when m(P) is silent
    and the active latent j with the largest a_j * (W_dec[j] . d_P) has
    cos(W_dec[j], d_P) >= `cos_threshold` and a_j * (W_dec[j] . d_P) >= `projection_threshold` c_P.
    Rate per parent over all of P's tokens, averaged over parents firing on >= `min_tokens`.
    """
    codes = sp.csc_matrix(true_codes)
    codes.eliminate_zeros()
    acts = sp.csr_matrix(sae_codes)
    parents = np.unique(parent[parent >= 0])
    unit_true = true_directions / np.linalg.norm(true_directions, axis=1, keepdims=True)
    along = decoder @ unit_true[parents].T  # [latents, parents]: W_dec[j] . d_P
    cos = along / np.maximum(np.linalg.norm(decoder, axis=1, keepdims=True), 1e-12)
    rates = []
    for k, p in enumerate(parents):
        column = codes[:, p]
        if column.nnz < min_tokens:
            continue
        rows = acts[column.indices]
        missed = np.flatnonzero(rows[:, latent_of[p]].toarray().ravel() == 0)
        rows = rows[missed]
        top, projection = _row_top(rows, rows.data * along[rows.indices, k])
        absorbed = projection >= projection_threshold * column.data[missed]
        absorbed[absorbed] = cos[top[absorbed], k] >= cos_threshold
        rates.append(absorbed.sum() / column.nnz)
    return {
        "rate": float(np.mean(rates)) if rates else None,
        "n_parents": len(rates),
        "cos_threshold": cos_threshold,
        "projection_threshold": projection_threshold,
    }


def adjacent_jaccard(fires: sp.csr_matrix, positions: np.ndarray) -> float | None:
    """Mean Jaccard |A_t & A_t+1| / |A_t | A_t+1| of the active sets of adjacent tokens of one
    sequence (positions counting up by one); pairs where both sets are empty are skipped."""
    same_sequence = np.flatnonzero(positions[1:] == positions[:-1] + 1)
    if len(same_sequence) == 0:
        return None
    now, after = fires[same_sequence], fires[same_sequence + 1]
    inter = np.asarray(now.multiply(after).sum(axis=1)).ravel()
    union = np.diff(now.indptr) + np.diff(after.indptr) - inter
    has = union > 0
    return float(np.mean(inter[has] / union[has])) if has.any() else None


def firing_rate_spread(fires: sp.csr_matrix) -> dict:
    """Spread of live features' firing rates: std of log10 rate, the fraction above 10x the
    median rate, and the live count (a frequency regulariser narrows a heavy-tailed spread)."""
    rates = _column_counts(fires) / max(fires.shape[0], 1)
    live = rates[rates > 0]
    if len(live) == 0:
        return {"std_log10_rate": None, "frac_above_10x_median": None, "n_live": 0}
    return {
        "std_log10_rate": float(np.std(np.log10(live))),
        "frac_above_10x_median": float(np.mean(live > 10 * np.median(live))),
        "n_live": int(len(live)),
    }


def detection(true_fires: sp.csr_matrix, sae_fires: sp.csr_matrix, latent_of: np.ndarray) -> dict:
    """Precision, recall and F1 of each true feature's best latent as its detector, averaged over
    the true features that fire in the data."""
    matched = sae_fires[:, latent_of]
    tp = _column_counts(true_fires.multiply(matched).tocsr())
    n_true, n_sae = _column_counts(true_fires), _column_counts(matched)
    live = n_true > 0
    precision = np.divide(tp, n_sae, out=np.zeros(len(tp)), where=n_sae > 0)
    recall = np.divide(tp, n_true, out=np.zeros(len(tp)), where=n_true > 0)
    total = precision + recall
    f1 = np.divide(2 * precision * recall, total, out=np.zeros(len(tp)), where=total > 0)
    return {
        "precision": float(precision[live].mean()) if live.any() else None,
        "recall": float(recall[live].mean()) if live.any() else None,
        "f1": float(f1[live].mean()) if live.any() else None,
        "n_features": int(live.sum()),
    }


def cofiring_decoder_cos(fires: sp.csr_matrix, decoder: np.ndarray) -> float | None:
    """Mean |cos(d_i, d_j)| over pairs of distinct latents, weighted by how often they fire
    together: the overlap that the orthogonality regularisers (hier_ortho, pair_ortho) penalise.
    On the true codes with the true directions it is the world's own overlap, the anchor.
    None when no two latents ever fire together."""
    counts = (fires.T.astype(np.float64) @ fires.astype(np.float64)).tocoo()
    off = counts.row != counts.col
    rows, cols, weight = counts.row[off], counts.col[off], counts.data[off]
    if weight.sum() == 0:
        return None
    unit = decoder / np.maximum(np.linalg.norm(decoder, axis=1, keepdims=True), 1e-12)
    total = 0.0
    for start in range(0, len(rows), PAIR_CHUNK):  # SynthSAEBench-16k: 31M pairs, 90 GB at once
        part = slice(start, start + PAIR_CHUNK)
        cos = np.abs(np.einsum("pd,pd->p", unit[rows[part]], unit[cols[part]]))
        total += float(np.sum(weight[part] * cos))
    return total / float(weight.sum())


PAIR_CHUNK = 131072
"""Co-firing pairs whose cosines are computed at once (2 x 131072 x d floats)."""


def anchored(sae: float | None, truth: float | None) -> dict[str, float | None]:
    """A structure metric beside the true features' own value. The distance is what is scored:
    the truth is neither 0 nor 1 (true features co-fire, persist and spread too), so "lower is
    better" would reward an SAE for being less like the world it models."""
    distance = None if sae is None or truth is None else abs(sae - truth)
    return {"sae": sae, "ground_truth": truth, "distance": distance}


def random_unit_decoder(width: int, d: int, seed: int = 0) -> np.ndarray:
    """The chance-line dictionary: `width` directions uniform on the unit sphere of R^d (rows of
    `default_rng(seed).standard_normal((width, d))`, normalised). Many random directions match
    some true direction fairly well in small d, so scores are read against this one."""
    rows = np.random.default_rng(seed).standard_normal((width, d))
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def recovered_fraction(
    decoder: np.ndarray, true_directions: np.ndarray, threshold: float = 0.9, chunk: int = 4096
) -> float:
    """Fraction of true features whose best-matching decoder row has |cos| > `threshold`: unlike
    MCC, a random dictionary scores ~0 at 0.9 (chunked over true features to bound memory)."""
    dec = decoder / np.maximum(np.linalg.norm(decoder, axis=1, keepdims=True), 1e-12)
    true = true_directions / np.maximum(
        np.linalg.norm(true_directions, axis=1, keepdims=True), 1e-12
    )
    best = np.concatenate(
        [np.abs(true[i : i + chunk] @ dec.T).max(axis=1) for i in range(0, len(true), chunk)]
    )
    return float(np.mean(best > threshold))
