"""Ground-truth metrics SAELens's `eval_sae_on_synthetic_data` does not compute: absorption on
planted hierarchies, adjacent-token stability, firing-rate spread, and per-true-feature detection.

Pure NumPy/SciPy on boolean firing matrices ([tokens, features] `scipy.sparse` CSR, True where a
code is non-zero), so they run in either environment and are checked on hand-built cases.
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


def _column_counts(matrix: sp.csr_matrix) -> np.ndarray:
    return np.asarray(matrix.sum(axis=0), dtype=np.int64).ravel()


def absorption(
    true_fires: sp.csr_matrix,
    sae_fires: sp.csr_matrix,
    parent: np.ndarray,
    latent_of: np.ndarray,
    min_tokens: int = 5,
) -> dict:
    """Absorption rate over planted parent-child pairs.

    For a pair (P, C), on the tokens where C fires (so P fires too): the fraction where P's latent
    is silent while C's latent fires - the child's latent has taken over the parent's meaning.
    Averaged over pairs whose child fires on at least `min_tokens` tokens.
    """
    children = np.flatnonzero(parent >= 0)
    child_tokens = true_fires[:, children].tocsc()
    n_child = _column_counts(child_tokens)
    use = n_child >= min_tokens
    if not use.any():
        return {"mean": None, "n_pairs": 0, "per_pair": []}
    children, child_tokens, n_child = children[use], child_tokens[:, use], n_child[use]
    child_latent = sae_fires[:, latent_of[children]].tocsc()
    parent_latent = sae_fires[:, latent_of[parent[children]]].tocsc()
    child_hit = child_tokens.multiply(child_latent)
    both_hit = child_hit.multiply(parent_latent)
    absorbed = _column_counts(child_hit.tocsr()) - _column_counts(both_hit.tocsr())
    rates = absorbed / n_child
    return {
        "mean": float(rates.mean()),
        "n_pairs": int(len(children)),
        "per_pair": rates.tolist(),
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
    None when no two latents ever fire together."""
    counts = (fires.T.astype(np.float64) @ fires.astype(np.float64)).tocoo()
    off = counts.row != counts.col
    rows, cols, weight = counts.row[off], counts.col[off], counts.data[off]
    if weight.sum() == 0:
        return None
    unit = decoder / np.maximum(np.linalg.norm(decoder, axis=1, keepdims=True), 1e-12)
    cos = np.abs(np.einsum("pd,pd->p", unit[rows], unit[cols]))
    return float(np.sum(weight * cos) / weight.sum())
