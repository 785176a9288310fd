"""Statistics over seeds: bootstrap means with 95% intervals, paired differences, and what they mean in words.

    mean, lo, hi = bootstrap_ci([0.9, 1.0, 0.7, 0.95, 1.0])
    diff = paired_difference(a_by_seed, b_by_seed)      # {"mean", "lo", "hi", "n", "significant"}

A difference is called significant when its 95% bootstrap interval excludes 0; with few seeds the
interval is wide and the report says so rather than claiming a difference.
"""

from __future__ import annotations

import numpy as np

N_BOOT = 4000
LEVEL = 0.95


def bootstrap_ci(values, n_boot: int = N_BOOT, level: float = LEVEL, seed: int = 0) -> tuple[float, float, float]:
    """Mean and the percentile bootstrap interval of the mean over the finite ``values`` (NaN if none)."""
    x = np.asarray(values, np.float64)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return np.nan, np.nan, np.nan
    if len(x) == 1:
        return float(x[0]), float(x[0]), float(x[0])
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    alpha = (1.0 - level) / 2
    return float(x.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def paired_difference(a: dict[int, float], b: dict[int, float], **kw) -> dict:
    """``a - b`` over the seeds both have (paired by seed), with its bootstrap interval."""
    seeds = sorted(s for s in a if s in b and np.isfinite(a[s]) and np.isfinite(b[s]))
    diffs = [a[s] - b[s] for s in seeds]
    mean, lo, hi = bootstrap_ci(diffs, **kw)
    return {"mean": mean, "lo": lo, "hi": hi, "n": len(seeds),
            "significant": bool(len(seeds) >= 2 and np.isfinite(lo) and (lo > 0 or hi < 0))}


def describe_difference(name_a: str, name_b: str, metric: str, lap: int, d: dict) -> str:
    """One sentence: which is higher, by how much, its interval, and whether that is significant."""
    if d["n"] < 2:
        return f"lap {lap}, {metric}: {name_a} vs {name_b}: fewer than 2 paired seeds, no claim."
    verdict = "significant at 95%" if d["significant"] else "not significant (the interval includes 0)"
    if d["mean"] == 0 and d["lo"] == d["hi"] == 0:
        return f"lap {lap}, {metric}: {name_a} and {name_b} are equal on all {d['n']} seeds."
    higher = name_a if d["mean"] >= 0 else name_b
    return (f"lap {lap}, {metric}: {higher} is higher by {abs(d['mean']):.3g} "
            f"(95% CI of {name_a} - {name_b}: [{d['lo']:.3g}, {d['hi']:.3g}], {d['n']} seeds): {verdict}.")
