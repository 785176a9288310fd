"""Every engine against a plain ``mujoco.mj_step`` loop: the largest state error after 1 and 10 control steps.

For every registered task x engine, 8 envs from the task's initial states under uniformly random and under
bang-bang actions in bounds (``simulators.physics.compliance``, the contract suite's own check); the targets
are 1e-5 after one control step and 1e-4 after ten. An engine that refuses a task is listed with its reason.

    python -m benchmarks.agreement [--engines mujoco mjx brax] [--tasks ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import simulators
from simulators.physics import ENGINES, UnsupportedTask
from simulators.physics.agreement import TARGET_ONE_STEP, TARGET_TEN_STEPS
from simulators.physics.compliance import agreement_error
from simulators.tasks import TASKS


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engines", nargs="+", default=[e for e in ENGINES if e != "auto"])
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    args = p.parse_args(argv)
    print(f"| task | engine | random, 1 step | random, 10 steps | bang-bang, 1 step | bang-bang, 10 steps |"
          f"  (targets {TARGET_ONE_STEP:.0e} / {TARGET_TEN_STEPS:.0e})")
    print("|---|---|---:|---:|---:|---:|")
    for task in args.tasks:
        for name in args.engines:
            try:
                engine = simulators.make_engine(name, task)
            except UnsupportedTask as exc:
                print(f"| {task} | {name} | refuses the task: {str(exc).splitlines()[0][:90]} | | | |", flush=True)
                continue
            cells = []
            for bang in (False, True):
                err = agreement_error(engine, steps=10, bang=bang)
                cells += [f"{err[0]:.1e}", f"{err.max():.1e}"]
            print(f"| {task} | {name} | " + " | ".join(cells) + " |", flush=True)
            if hasattr(engine, "close"):
                engine.close()


if __name__ == "__main__":
    main()
