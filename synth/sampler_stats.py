"""Whether two samplers draw the same world: statistics of their true codes, and the comparison.

NumPy only, so both sides use it: SAELens's sampler in the evaluation environment
(``python -m synth.synthsaebench --stats``) and the JAX sampler of ``jax_sae.data.synthetic`` in
the training one. Compared (``differences``), each at ``Z`` standard errors of the two estimates:

* each feature's firing rate, where both samples expect at least 30 firings (below that the
  normal approximation of a count is too loose: with 16k features, a Poisson count of mean 7
  reaching 19 happens about once);
* each feature's mean magnitude and mean squared magnitude where it fires (where both saw it fire
  at least 30 times): the spread catches what leaves the mean alone (a child's scaling by its
  parent's magnitude over the parent's mean has mean about 1);
* the co-firing rate of the most correlated feature pairs (``PAIRS``);
* the mean L0.

The hierarchy constraints hold exactly or not at all: a child active without its parent, or two
active members of a mutually exclusive group, are counted (``violations``) and must be 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

Z = 5.0
"""Standard errors allowed: with ~2k compared quantities, a false alarm is ~1e-3 likely."""
PAIRS = 64
MIN_FIRINGS = 30


def correlated_pairs(factor: np.ndarray, parent: np.ndarray, n: int = PAIRS) -> np.ndarray:
    """[n, 2] feature pairs outside the hierarchy with the largest correlation of their firing
    copula (F F^T off the diagonal): where co-firing differs from independence most."""
    free = np.flatnonzero(parent < 0)
    sub = factor[free] @ factor[free].T
    np.fill_diagonal(sub, -np.inf)
    upper = np.triu_indices(len(free), 1)
    order = np.argsort(-sub[upper])[:n]
    return np.stack([free[upper[0][order]], free[upper[1][order]]], axis=1)


@dataclass
class CodeStats:
    """Running sums over batches of true codes [B, N]."""

    pairs: np.ndarray
    parent: np.ndarray
    group_members: np.ndarray
    n: int = 0
    fires: np.ndarray | None = None
    sums: np.ndarray | None = None
    squares: np.ndarray | None = None
    fourths: np.ndarray | None = None
    cofires: np.ndarray | None = None
    l0_sum: float = 0.0
    l0_squares: float = 0.0
    violations: dict[str, int] = field(default_factory=lambda: {"child": 0, "exclusive": 0})

    def add(self, codes: np.ndarray) -> None:
        codes = np.asarray(codes, np.float64)
        active = codes > 0
        if self.fires is None:
            width = codes.shape[1]
            self.fires, self.sums, self.squares, self.fourths = (np.zeros(width) for _ in range(4))
            self.cofires = np.zeros(len(self.pairs))
        assert self.sums is not None and self.squares is not None and self.cofires is not None
        assert self.fourths is not None
        self.n += len(codes)
        self.fires += active.sum(0)
        self.sums += codes.sum(0)
        self.squares += (codes * codes).sum(0)
        self.fourths += (codes**4).sum(0)
        self.cofires += (active[:, self.pairs[:, 0]] & active[:, self.pairs[:, 1]]).sum(0)
        l0 = active.sum(1)
        self.l0_sum += float(l0.sum())
        self.l0_squares += float((l0 * l0).sum())
        child = np.flatnonzero(self.parent >= 0)
        self.violations["child"] += int((active[:, child] & ~active[:, self.parent[child]]).sum())
        members = np.where(self.group_members >= 0, self.group_members, 0)
        in_group = active[:, members] & (self.group_members >= 0)
        self.violations["exclusive"] += int((in_group.sum(2) > 1).sum())

    def arrays(self) -> dict[str, np.ndarray]:
        assert self.fires is not None and self.sums is not None and self.squares is not None
        return {
            "n": np.array(self.n),
            "fires": self.fires,
            "sums": self.sums,
            "squares": self.squares,
            "fourths": np.asarray(self.fourths),
            "cofires": np.asarray(self.cofires),
            "l0": np.array([self.l0_sum, self.l0_squares]),
            "violations": np.array([self.violations["child"], self.violations["exclusive"]]),
        }


def _rate_gap(a: np.ndarray, b: np.ndarray, n_a: int, n_b: int) -> np.ndarray:
    """|rate_a - rate_b| in standard errors (pooled rate; a floor of one event each way)."""
    pa, pb = a / n_a, b / n_b
    pooled = np.clip((a + b) / (n_a + n_b), 1.0 / (n_a + n_b), None)
    se = np.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    return np.abs(pa - pb) / se


def _moment_gap(a: dict, b: dict, seen: np.ndarray, first: str, second: str) -> np.ndarray:
    """|E_a[m] - E_b[m]| over firing tokens in standard errors, for the moment m summed in
    ``first`` whose square is summed in ``second``."""
    n_a, n_b = a["fires"][seen], b["fires"][seen]
    mean_a, mean_b = a[first][seen] / n_a, b[first][seen] / n_b
    var_a = a[second][seen] / n_a - mean_a**2
    var_b = b[second][seen] / n_b - mean_b**2
    return np.abs(mean_a - mean_b) / (np.sqrt(var_a / n_a + var_b / n_b) + 1e-9)


def differences(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> list[str]:
    """What differs beyond ``Z`` standard errors between two ``CodeStats.arrays()``; [] when
    the two samplers agree."""
    na, nb = int(a["n"]), int(b["n"])
    found = []
    pooled = (a["fires"] + b["fires"]) / (na + nb)
    counted = pooled * min(na, nb) >= MIN_FIRINGS
    gap = np.where(counted, _rate_gap(a["fires"], b["fires"], na, nb), 0.0)
    if (gap > Z).any():
        worst = int(np.argmax(gap))
        found.append(
            f"{int((gap > Z).sum())} firing rates differ (feature {worst}: "
            f"{a['fires'][worst] / na:.4g} vs {b['fires'][worst] / nb:.4g})"
        )
    seen = (a["fires"] >= MIN_FIRINGS) & (b["fires"] >= MIN_FIRINGS)
    for (low, high), what in (
        (("sums", "squares"), "mean magnitudes"),
        (("squares", "fourths"), "mean squared magnitudes"),
    ):
        gap = _moment_gap(a, b, seen, low, high)
        if (gap > Z).any():
            worst = int(np.flatnonzero(seen)[np.argmax(gap)])
            found.append(f"{int((gap > Z).sum())} {what} differ (feature {worst})")
    cofire_gap = _rate_gap(a["cofires"], b["cofires"], na, nb)
    if (cofire_gap > Z).any():
        found.append(f"{int((cofire_gap > Z).sum())} co-firing rates of correlated pairs differ")
    l0_a, l0_b = a["l0"][0] / na, b["l0"][0] / nb
    l0_var = (a["l0"][1] / na - l0_a**2) / na + (b["l0"][1] / nb - l0_b**2) / nb
    if abs(l0_a - l0_b) > Z * np.sqrt(l0_var):
        found.append(f"mean L0 differs: {l0_a:.4g} vs {l0_b:.4g}")
    for name, stats in (("first", a), ("second", b)):
        child, exclusive = (int(v) for v in stats["violations"])
        if child or exclusive:
            found.append(
                f"the {name} sampler breaks the hierarchy: {child} children active "
                f"without their parent, {exclusive} exclusive groups with 2+ members"
            )
    return found
