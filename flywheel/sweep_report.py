"""A sweep's report: capability per lap per setting with 95% intervals over seeds, the compounding gain
(with world-model retraining minus without), and which differences are significant, in words.

Reads only the sweep directory (``sweep.json`` and each child's ``laps/*/metrics.json``), so
``flywheel report SWEEP_DIR`` rebuilds it. Written to ``<sweep>/report/`` and logged to the parent run.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from flywheel.report import format_sweep_table, load_history, plot_sweep, sweep_summary
from flywheel.stats import describe_difference, paired_difference

REPORT_METRICS = ("capability/success_rate", "capability/return", "capability/goal_time_fraction",
                  "world_model/open_loop_error", "exploitation/return_gap")
DREAM_NOTES = {"[dream]": "[dream]: PPO trained purely in the world model (fidelity 0), then evaluated in reality: "
                          "the World Models (2018) setup.",
               "[planner dream]": "[planner dream]: the planner acting in the world model only (fidelity 0)."}
PLOTTED = ("capability/success_rate", "capability/goal_time_fraction", "world_model/open_loop_error")


def children(sweep_dir: Path) -> list[dict]:
    """Every child run with its per-lap rows."""
    spec = json.loads((sweep_dir / "sweep.json").read_text())
    return [{**c, "label": c.get("label", c["setting"]), "variant": c.get("variant", "flywheel"),
             "group": c.get("group", c["setting"]), "rows": load_history(sweep_dir / c["dir"])}
            for c in spec["children"]]


def compounding(runs: list[dict], key: str = "capability/success_rate") -> list[dict]:
    """Per setting with a no-retrain twin, per lap: (gain since lap 0 with retraining) - (gain without),
    paired by seed, with its 95% bootstrap interval."""
    out = []
    for group in dict.fromkeys(r["group"] for r in runs if r["variant"] == "flywheel"):
        with_, without = ({r["seed"]: _series(r, key) for r in runs if r["group"] == group and r["variant"] == v}
                          for v in ("flywheel", "no_retrain"))
        if not without:
            continue
        laps = sorted({lap for s in with_.values() for lap in s} & {lap for s in without.values() for lap in s})
        rows = [{"lap": lap, **paired_difference(_gain(with_, laps[0], lap), _gain(without, laps[0], lap))}
                for lap in laps[1:]]
        out.append({"setting": group, "rows": rows})
    return out


def _gain(series_by_seed: dict[int, dict[int, float]], first: int, lap: int) -> dict[int, float]:
    return {seed: s[lap] - s[first] for seed, s in series_by_seed.items() if lap in s and first in s}


def _series(run: dict, key: str) -> dict[int, float]:
    return {row["lap"]: float(row.get(key, np.nan)) for row in run["rows"]}


def significance(runs: list[dict], key: str = "capability/success_rate") -> list[str]:
    """Sentences at the last lap every setting reached: each setting against its no-retrain twin and
    against PPO in reality, and the settings of the flywheel against each other."""
    summary = {s["setting"]: s for s in sweep_summary(runs, key)}
    variant = {r["setting"]: (r["variant"], r["group"]) for r in runs}
    last = min((s["laps"][-1] for s in summary.values() if s["laps"]), default=None)
    if last is None:
        return []
    at = lambda name: summary[name]["by_seed"][summary[name]["laps"].index(last)] if last in summary[name]["laps"] else {}
    flywheel = [n for n in summary if variant[n][0] == "flywheel"]
    pairs = []
    for name in flywheel:
        pairs += [(name, other) for other in summary if variant[other][0] == "no_retrain" and
                  variant[other][1] == variant[name][1]]
        pairs += [(name, other) for other in summary if variant[other][0] == "ppo_in_reality"]
    pairs += [(a, b) for i, a in enumerate(flywheel) for b in flywheel[i + 1:]]
    return [describe_difference(a, b, key, last, paired_difference(at(a), at(b))) for a, b in pairs]


def format_compounding(rows: list[dict]) -> str:
    lines = ["compounding: success gain since lap 0 with world-model retraining minus without (paired by seed)"]
    for c in rows:
        cells = [f"lap {r['lap']}: {r['mean']:+.3g} [{r['lo']:+.3g}, {r['hi']:+.3g}]{' *' if r['significant'] else ''}"
                 for r in c["rows"]]
        lines.append(f"  {c['setting']}: " + ("; ".join(cells) or "-"))
    lines.append("  (* the 95% interval excludes 0)")
    return "\n".join(lines)


def write_sweep_report(sweep_dir: str | Path, say: Callable[[str], None] = print) -> list[Path]:
    """Tables (mean [95% CI] per lap), compounding, significance sentences and the plot of a sweep directory."""
    sweep_dir = Path(sweep_dir)
    runs = children(sweep_dir)
    summaries = {key: sweep_summary(runs, key) for key in REPORT_METRICS}
    seeds = sorted({r["seed"] for r in runs})
    parts = [format_sweep_table(s, f"{key} per lap: mean [95% bootstrap CI] over seeds {seeds}")
             for key, s in summaries.items() if any(np.isfinite(x["mean"]).any() for x in s)]
    comp = compounding(runs)
    if comp:
        parts.append(format_compounding(comp))
    sentences = significance(runs)
    if sentences:
        parts.append("significance:\n" + "\n".join(f"  {x}" for x in sentences))
    notes = [note for tag, note in DREAM_NOTES.items() if any(tag in r["setting"] for r in runs)]
    if notes:
        parts.append("\n".join(notes))
    text = "\n\n".join(parts)
    out = sweep_dir / "report"
    out.mkdir(exist_ok=True)
    (out / "sweep_table.txt").write_text(text + "\n")
    png = plot_sweep({k: summaries[k] for k in PLOTTED if any(np.isfinite(x["mean"]).any() for x in summaries[k])},
                     out / "compounding.png", title=f"{sweep_dir.name}: capability per lap per setting (95% CI)")
    say(text)
    return [out / "sweep_table.txt", png]


def log_summary(parent, sweep_dir: Path) -> None:
    """Per-setting mean capability per lap on the parent run (``sweep/<setting>/<metric>``, step = lap); a sweep
    continued with more runs logs its new means over the old ones."""
    runs = children(sweep_dir)
    labels = {r["setting"]: r["label"] for r in runs}
    for key in PLOTTED[:1] + ("capability/return",):
        for s in sweep_summary(runs, key):
            name = f"sweep/{_slug(labels[s['setting']])}/{key.split('/')[-1]}"
            for lap, value in zip(s["laps"], s["mean"]):
                parent.log_metrics({name: float(value)}, step=int(lap), replace=True)
    for c in compounding(runs):
        for r in c["rows"]:
            parent.log_metrics({f"sweep/{_slug(c['setting'])}/compounding": float(r["mean"])}, step=int(r["lap"]),
                               replace=True)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)
