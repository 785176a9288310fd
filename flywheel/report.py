"""Reports: capability per lap so far, one imagined-vs-real trajectory, the sweep's compounding plot, tables.

Plots are matplotlib PNGs (Agg backend, no display); tables are plain text for the terminal.
Everything reads what a run directory already holds (``laps/lap_NNN/metrics.json`` and
``trajectory.npz``), so ``flywheel report RUN_DIR`` rebuilds a finished run's report.
"""

from __future__ import annotations

import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np

from flywheel.lap import finite_or_nan, read_json

CAPABILITY = (("capability/success_rate", "success rate (reality)"), ("capability/return", "return (reality)"),
              ("world_model/open_loop_error", "WM open-loop error"), ("imagination/accuracy", "imagination accuracy"),
              ("physics/violation_rate", "physics-violation rate"), ("data/selected_trajectories", "selected episodes"))
RATES = {"capability/success_rate", "imagination/accuracy", "physics/violation_rate"}   # in [0, 1]
TABLE_COLUMNS = (("lap", "lap", "{:d}"), ("capability/success_rate", "success", "{:.2f}"),
                 ("capability/return", "return", "{:.1f}"), ("world_model/one_step_error", "wm 1-step", "{:.2e}"),
                 ("world_model/open_loop_error", "wm open-loop", "{:.2e}"), ("imagination/accuracy", "imag acc", "{:.2f}"),
                 ("physics/violation_rate", "phys viol", "{:.2f}"), ("data/selected_trajectories", "selected", "{:.0f}"),
                 ("data/total_transitions", "transitions", "{:.0f}"), ("lap/seconds", "seconds", "{:.0f}"))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def load_history(run_dir: str | Path) -> list[dict]:
    """Per-lap metric dicts (with ``lap``) of every logged lap of a run, in lap order."""
    rows = []
    for path in sorted(Path(run_dir).glob("laps/lap_*/metrics.json")):
        data = read_json(path, "lap record")
        if data.get("logged"):
            rows.append({"lap": int(data["lap"]), **finite_or_nan(data["metrics"])})
    return rows


def format_table(rows: list[dict], columns=TABLE_COLUMNS) -> str:
    """A fixed-width text table; missing values print as '-'."""
    head = [c[1] for c in columns]
    body = []
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            v = row.get(key)
            cells.append("-" if v is None or (isinstance(v, float) and not np.isfinite(v)) else fmt.format(v))
        body.append(cells)
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])


def _log_scale_for_errors(ax, key: str) -> None:
    """World-model errors span orders of magnitude over a run: plot them on a log axis."""
    if key.endswith("_error") and all(np.all(np.asarray(line.get_ydata(), float) > 0) for line in ax.get_lines()):
        ax.set_yscale("log")


def plot_capability(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """One panel per capability metric, lap on the x axis."""
    plt = _plt()
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5))
    laps = [r["lap"] for r in rows]
    for ax, (key, label) in zip(axes.ravel(), CAPABILITY):
        ax.plot(laps, [r.get(key, np.nan) for r in rows], "o-")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("lap")
        ax.xaxis.get_major_locator().set_params(integer=True)
        _log_scale_for_errors(ax, key)
        if key in RATES:                  # a rate is drawn on its own range: an all-zero line is not centred on 0
            ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        if laps:
            ax.set_xticks(laps)
    fig.suptitle(title or "capability per lap")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


def plot_trajectory(real: np.ndarray, imagined: np.ndarray, dt: float, path: str | Path, horizon: int,
                    labels: list[str] | None = None, title: str = "") -> Path:
    """Each state dimension over time: reality (solid) vs the world model's imagination (dashed, re-anchored every H)."""
    plt = _plt()
    real, imagined = np.asarray(real), np.asarray(imagined)
    dims = real.shape[1]
    fig, axes = plt.subplots(dims, 1, figsize=(9, 2.0 * dims + 0.8), sharex=True, squeeze=False)
    t = np.arange(len(real)) * dt
    for d, ax in enumerate(axes[:, 0]):
        ax.plot(t, real[:, d], "k-", lw=1.5, label="reality")
        ax.plot(t[: len(imagined)], imagined[:, d], "C1--", lw=1.2, label=f"imagined (open loop, H={horizon})")
        ax.set_ylabel(labels[d] if labels else f"s[{d}]")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel("time (s)")
    fig.suptitle(title or "imagined vs real trajectory")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


def write_run_report(run_dir: str | Path) -> list[Path]:
    """Rebuild ``report/capability.png`` and ``report/trajectory_lapNNN.png`` of the latest lap; returns the files."""
    run_dir = Path(run_dir)
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows = load_history(run_dir)
    files = [plot_capability(rows, out / "capability.png", title=f"{run_dir.name}: capability per lap")]
    if rows:
        lap = rows[-1]["lap"]
        traj = run_dir / "laps" / f"lap_{lap:03d}" / "trajectory.npz"
        if traj.exists():
            try:
                with np.load(traj) as z:
                    real, imagined, dt, horizon = z["real"], z["imagined"], float(z["dt"]), int(z["horizon"])
                    labels = [str(x) for x in z["labels"]] if "labels" in z.files else None
            except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError) as exc:
                # the plot is not the lap's data: the rest of the report is still made, and the damage is named
                print(f"report: no trajectory plot for lap {lap}: {traj} cannot be read ({exc})", file=sys.stderr)
            else:
                files.append(plot_trajectory(real, imagined, dt, out / f"trajectory_lap{lap:03d}.png", horizon,
                                             labels=labels, title=f"lap {lap}: imagined vs real (reality episode 0)"))
    (out / "table.txt").write_text(format_table(rows) + "\n")
    files.append(out / "table.txt")
    return files


# -- sweeps ------------------------------------------------------------------------------------
def sweep_summary(runs: list[dict], key: str = "capability/success_rate") -> list[dict]:
    """Group child runs (``{"setting", "seed", "rows"}``) by setting: per lap the mean over seeds, its 95%
    bootstrap interval (``lo``, ``hi``), std, min, max, and ``by_seed`` (lap index -> {seed: value})."""
    from flywheel.stats import bootstrap_ci

    out = []
    for setting in dict.fromkeys(r["setting"] for r in runs):
        members = [r for r in runs if r["setting"] == setting]
        laps = sorted({row["lap"] for r in members for row in r["rows"]})
        values = np.full((len(members), len(laps)), np.nan)
        for i, r in enumerate(members):
            for row in r["rows"]:
                values[i, laps.index(row["lap"])] = row.get(key, np.nan)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)   # a lap no seed reached yet is all-NaN
            std, low, high = np.nanstd(values, axis=0), np.nanmin(values, axis=0), np.nanmax(values, axis=0)
        ci = np.array([bootstrap_ci(values[:, j]) for j in range(len(laps))]).reshape(len(laps), 3)
        out.append({"setting": setting, "seeds": len(members), "laps": laps, "mean": ci[:, 0], "lo": ci[:, 1],
                    "hi": ci[:, 2], "std": std, "min": low, "max": high,
                    "by_seed": [{r["seed"]: values[i, j] for i, r in enumerate(members)} for j in range(len(laps))]})
    return out


def format_sweep_table(summary: list[dict], title: str) -> str:
    """Per setting and lap: ``mean [95% CI]`` over seeds."""
    laps = sorted({lap for s in summary for lap in s["laps"]})
    head = ["setting", "seeds", *[f"lap {lap}" for lap in laps]]
    body = []
    for s in summary:
        cells = [s["setting"], str(s["seeds"])]
        for lap in laps:
            if lap in s["laps"] and np.isfinite(s["mean"][s["laps"].index(lap)]):
                i = s["laps"].index(lap)
                cells.append(f"{s['mean'][i]:.3g} [{s['lo'][i]:.3g}, {s['hi'][i]:.3g}]")
            else:
                cells.append("-")
        body.append(cells)
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))
    return "\n".join([title, line(head), line(["-" * w for w in widths]), *map(line, body)])


def plot_sweep(summaries: dict[str, list[dict]], path: str | Path, title: str = "") -> Path:
    """The compounding plot: one panel per metric, one line per setting (mean over seeds, band: 95% CI)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(summaries), figsize=(6 * len(summaries), 4.2), squeeze=False)
    for ax, (key, summary) in zip(axes[0], summaries.items()):
        for s in summary:
            laps = np.asarray(s["laps"])
            ax.plot(laps, s["mean"], "o-", label=s["setting"])
            ax.fill_between(laps, s["lo"], s["hi"], alpha=0.12)        # 95% bootstrap CI over seeds
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("lap")
        ax.xaxis.get_major_locator().set_params(integer=True)
        _log_scale_for_errors(ax, key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or "compounding gain per setting")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)
