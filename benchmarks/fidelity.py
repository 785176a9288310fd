"""The fidelity experiment: reality success rate and WM open-loop error per lap, per fidelity, over seeds.

    python benchmarks/fidelity.py preset=fidelity                   # 5 fidelities x 5 laps x 3 seeds (long)
    python benchmarks/fidelity.py --fidelities 0,1 --laps 3 --seeds 1 preset=smoke    # a quick look

Runs ``flywheel sweep`` (one parent MLflow run, a child per fidelity and seed), prints the
compounding tables (mean ± std over seeds) and the lap wall-clock per stage on this machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flywheel.report import load_history
from flywheel.sweep import parse_grid, run_sweep

STAGES = ("seed", "serve", "self_play", "select", "retrain", "evaluate", "log")


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
    p.add_argument("--fidelities", default="0,0.25,0.5,0.75,1")
    p.add_argument("--laps", type=int, default=5)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--run-dir", default=None, help="sweep directory (an existing one is continued)")
    args = p.parse_args()
    sweep_dir = run_sweep([f"laps={args.laps}", *args.overrides],
                          parse_grid([f"simulator.fidelity={args.fidelities}"]), args.seeds, args.run_dir)
    print()
    print(stage_table(sweep_dir))


if __name__ == "__main__":
    main()
