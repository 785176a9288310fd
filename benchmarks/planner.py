"""The planner beside PPO: reality success per lap and compute per env step, on pendulum and cartpole.

    python -m benchmarks.planner                                # pendulum and cartpole, 3 laps x 3 seeds (long)
    python -m benchmarks.planner --tasks pendulum --seeds 2     # one task, fewer seeds
    python -m benchmarks.planner --quick                        # pendulum, 2 laps x 2 seeds, smoke budgets
    python -m benchmarks.planner --tasks cartpole self_play.iterations=1   # extra overrides go to every run
    python -m benchmarks.planner --replan 2000 8000     # the planner alone in reality: replan=window vs step

Per task, one ``flywheel sweep --grid agent.kind=ppo,planner`` (same seeds, same budgets: the planner
samples as many env steps per lap as PPO does). Printed per task, agent and lap: reality success and
return, mean [95% bootstrap CI] over seeds. Compute: the self-play wall-clock per served env step (the
served simulator with its grading, plus PPO's learning or the planner's planning) from the lap
metrics, and the acting cost alone measured here: the last lap's policy run on a batch of 16 reality
envs for one episode, one torch thread (PPO: an MLP forward; the planner: its search).
``--replan`` measures instead what committing to each imagination window (so that the plan is what is
graded) costs against replanning every step, with world models of a given amount of seed data.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flywheel.report import load_history
from flywheel.stats import bootstrap_ci
from flywheel.sweep import run_sweep

AGENTS = ("ppo", "planner")


def cell(values) -> str:
    mean, lo, hi = bootstrap_ci(values)
    if not np.isfinite(mean):
        return "-"
    return f"{mean:.2f} [{lo:.2f}, {hi:.2f}]" if hi - lo > 1e-12 else f"{mean:.2f}"


def acting_ms_per_step(policy_path: Path, task: str, envs: int = 16) -> float:
    """Milliseconds per env step of ``policy`` acting on ``envs`` reality envs for one episode (one torch thread)."""
    import torch

    from policies.loading import load_policy
    from simulators.reality import Reality

    torch.set_num_threads(1)
    policy = load_policy(policy_path)
    reality = Reality(task, engine="mujoco")
    s = reality.reset(0, envs)
    spent = 0.0
    for _ in range(reality.task.episode_length):
        t0 = time.perf_counter()
        a = policy(reality.task.observe(s).astype(np.float32))
        spent += time.perf_counter() - t0
        s = reality.step(s, np.asarray(a, np.float64))
    return 1000 * spent / (envs * reality.task.episode_length)


def replan_rows(task: str, transitions: int, episodes: int = 32) -> list[str]:
    """The planner alone in reality, committing to each window vs replanning every step, with a world model
    (the run's default architecture) fitted on ``transitions`` random reality transitions."""
    import torch

    from flywheel.config import load_config
    from policies.evaluate import evaluate
    from policies.planner import Planner, PlannerConfig
    from policies.planner_policy import PlannerPolicy
    from simulators.reality import Reality
    from simulators.world_model import WorldModel

    torch.set_num_threads(1)
    cfg = load_config([f"task={task}"])
    reality = Reality(task, engine="mujoco")
    data = reality.collect(None, n_steps=transitions, n_envs=16, seed=0)
    wm = WorldModel(task, reality.spec.state_size, reality.spec.action_size, cfg.world_model)
    fit = wm.fit(data)
    rows = []
    for replan in ("window", "step"):
        planner = Planner(wm, PlannerConfig.from_object({**vars(cfg.agent), "replan": replan}),
                          reality.spec.action_low, reality.spec.action_high)
        policy = PlannerPolicy(planner, cfg.simulator.horizon, reality.task.episode_length)
        ev = evaluate(policy, reality, episodes=episodes, seed=1)
        steps = ev["episodes"] * reality.task.episode_length
        rows.append(f"| {task} | {transitions:,} | {fit['holdout_mse']:.2g} | {replan} | {ev['success_rate']:.2f} | "
                    f"{ev['return_mean']:.1f} | {1000 * policy.plan_seconds / steps:.2f} |")
    return rows


def summarise(sweep_dir: Path, task: str) -> tuple[list[str], list[str]]:
    """Lines of the success table and of the compute table for one task's sweep."""
    import json

    spec = json.loads((sweep_dir / "sweep.json").read_text())
    runs = {a: [] for a in AGENTS}
    for child in spec["children"]:
        kind = next(o.split("=", 1)[1] for o in child["overrides"] if o.startswith("agent.kind="))
        runs[kind].append(sweep_dir / child["dir"])
    success, compute = [], []
    for kind in AGENTS:
        histories = [load_history(d) for d in runs[kind]]
        laps = sorted({r["lap"] for h in histories for r in h})
        for lap in laps:
            rows = [r for h in histories for r in h if r["lap"] == lap]
            success.append(f"| {task} | {kind} | {lap} | {cell([r['capability/success_rate'] for r in rows])} | "
                           f"{cell([r['capability/return'] for r in rows])} | {len(rows)} |")
        rows = [r for h in histories for r in h]
        per_step = [1000 * r["time/self_play"] / r["self_play/env_steps"] for r in rows if r.get("self_play/env_steps")]
        last = [d / "checkpoints" / f"policy_lap{max(laps):03d}.pt" for d in runs[kind]]
        acting = [acting_ms_per_step(p, task) for p in last if p.exists()]
        compute.append(f"| {task} | {kind} | {cell(per_step)} | {cell(acting)} | "
                       f"{int(np.mean([r['self_play/env_steps'] for r in rows]))} |")
    return success, compute


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="extra config overrides for every run (e.g. self_play.iterations=1)")
    p.add_argument("--tasks", nargs="+", default=["pendulum", "cartpole"])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--laps", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="pendulum, 2 laps x 2 seeds on the smoke budgets")
    p.add_argument("--run-dir", default=None, help="parent directory of the sweeps (existing ones are continued)")
    p.add_argument("--replan", nargs="*", type=int, metavar="TRANSITIONS",
                   help="instead of the sweeps: the planner alone in reality, replan=window vs step, with world models "
                        "fitted on these numbers of random transitions (default 4000 8000)")
    args = p.parse_args()
    if args.replan is not None:
        rows = ["| task | seed transitions | WM held-out MSE | replan | reality success | return | plan ms / env step |",
                "|---|---:|---:|---|---:|---:|---:|"]
        for task in args.tasks:
            for n in args.replan or [4000, 8000]:
                rows += replan_rows(task, n)
        print("\n".join(rows))
        return
    tasks, seeds, laps, extra = args.tasks, args.seeds, args.laps, list(args.overrides)
    if args.quick:
        tasks, seeds, laps, extra = ["pendulum"], 2, 2, ["preset=smoke", *extra]
    root = Path(args.run_dir or ROOT / "runs" / f"bench-planner-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    success = ["| task | agent | lap | reality success | reality return | seeds |", "|---|---|---:|---|---|---:|"]
    compute = ["| task | agent | self-play ms / env step | acting ms / env step (batch 16) | env steps / lap |",
               "|---|---|---|---|---:|"]
    t0 = time.time()
    for task in tasks:
        overrides = [f"task={task}", f"laps={laps}", "engine.name=mujoco", "reality.engine=mujoco", *extra]
        sweep_dir = run_sweep(overrides, {"agent.kind": list(AGENTS)}, seeds, root / task)
        s, c = summarise(sweep_dir, task)
        success += s
        compute += c
    print("\nReality success and return per lap: mean [95% bootstrap CI] over seeds")
    print("\n".join(success))
    print("\nCompute per env step: mean [95% bootstrap CI] over laps x seeds (self-play) and seeds (acting)")
    print("\n".join(compute))
    print(f"\nthe benchmark took {(time.time() - t0) / 60:.1f} min; sweeps in {root}")


if __name__ == "__main__":
    main()
