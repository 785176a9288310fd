"""The fidelity experiment: capability per lap per fidelity over seeds, beside its ablations.

    python -m benchmarks.fidelity                 # full: configs/sweep/fidelity.yaml (3 fidelities x 5 laps x 5 seeds,
                                                  # with the no-retrain and PPO-in-reality ablations; long)
    python -m benchmarks.fidelity --quick         # a check: fidelities 0,1 x 3 laps x 2 seeds, smoke budgets

Runs ``flywheel sweep`` (one parent MLflow run, a child per setting and seed), prints the report
(mean [95% bootstrap CI] per lap, the compounding gain, significance in words) and the lap
wall-clock per stage on this machine, and how long the whole experiment took.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flywheel.report import load_history
from flywheel.sweep import load_spec, parse_grid, parse_seeds, run_sweep

STAGES = ("seed", "serve", "self_play", "reality", "select", "retrain", "evaluate", "log")


def stage_table(sweep_dir: Path) -> str:
    """Mean seconds per stage per lap over every child run (lap 0 includes the seed stage)."""
    spec = json.loads((sweep_dir / "sweep.json").read_text())
    rows = [r for c in spec["children"] for r in load_history(sweep_dir / c["dir"])]
    lines = ["lap wall-clock per stage (s, mean over runs)",
             "  ".join(f"{h:>9}" for h in ("lap", *STAGES, "total"))]
    for lap in sorted({r["lap"] for r in rows}):
        sel = [r for r in rows if r["lap"] == lap]
        cells = [np.mean(v) if (v := [r[f"time/{s}"] for r in sel if f"time/{s}" in r]) else np.nan for s in STAGES]
        total = np.nanmean([r.get("lap/seconds", np.nan) for r in sel])
        lines.append("  ".join([f"{lap:>9d}", *(f"{v:>9.1f}" if np.isfinite(v) else f"{'-':>9}" for v in (*cells, total))]))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="extra config overrides (e.g. task=cartpole)")
    p.add_argument("--quick", action="store_true", help="fidelities 0,1 x 3 laps x 2 seeds on the smoke budgets, "
                   "with the ablations")
    p.add_argument("--spec", default=str(ROOT / "configs" / "sweep" / "fidelity.yaml"))
    p.add_argument("--run-dir", default=None, help="sweep directory (an existing one is continued)")
    p.add_argument("--seeds", default=None, help="a count or a comma-separated list, instead of the spec's seeds")
    args = p.parse_args()
    overrides, grid, seeds, ablations = load_spec(args.spec)
    if args.quick:
        overrides, grid, seeds = ["preset=smoke", "laps=3"], parse_grid(["simulator.fidelity=0,1"]), 2
    if args.seeds:
        try:
            seeds = parse_seeds(args.seeds)
        except ValueError as exc:      # ConfigError: one line and exit 2, as the CLI answers
            p.error(str(exc))
    t0 = time.time()
    sweep_dir = run_sweep([*overrides, *args.overrides], grid, seeds, args.run_dir, ablations=ablations)
    print()
    print(stage_table(sweep_dir))
    print(f"\nthe experiment took {(time.time() - t0) / 60:.1f} min ({'quick' if args.quick else 'full'} mode)")


if __name__ == "__main__":
    main()
