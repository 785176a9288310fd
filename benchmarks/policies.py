"""RLlib sampling throughput through the gRPC service vs an in-process VectorEnv; PPO wall-clock to a return.

    python -m benchmarks.policies [--task pendulum] [--steps 4096] [--envs 8 32] [--threshold 80]

Sampling: each EnvRunner samples ``--steps`` env steps with the current (random-init) policy, all runners
in parallel; env steps/s = total / wall time. Servers use the MuJoCo engine at fidelity 1.
"""

from __future__ import annotations

import argparse
import time

import ray

from policies import EnvConfig, PolicyTrainer, evaluate, ppo_config_for
from services.config import ServerConfig
from services.server import ServerProcess
from simulators.reality import Reality


def sample_rate(trainer: PolicyTrainer, steps: int) -> float:
    group = trainer.algo.env_runner_group
    group.foreach_env_runner(lambda r: len(r.sample(num_timesteps=256)), local_env_runner=False)   # warm up
    t0 = time.perf_counter()
    group.foreach_env_runner(lambda r: len(r.sample(num_timesteps=steps)), local_env_runner=False)
    return steps * group.num_healthy_remote_env_runners() / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="pendulum")
    p.add_argument("--steps", type=int, default=4096, help="env steps sampled per runner")
    p.add_argument("--runners", type=int, nargs="+", default=[1, 2])
    p.add_argument("--envs", type=int, nargs="+", default=[8, 32])
    p.add_argument("--threshold", type=float, default=80.0, help="return in reality that PPO must reach")
    p.add_argument("--max-iterations", type=int, default=20)
    args = p.parse_args()

    servers = [ServerProcess(ServerConfig(task=args.task, engine="mujoco")).start() for _ in range(max(args.runners))]
    rows = []
    try:
        for runners in args.runners:
            for envs in args.envs:
                rate = {}
                for kind, addresses in (("grpc", [s.address for s in servers[:runners]]), ("local", ["local"])):
                    ppo = ppo_config_for(args.task, num_env_runners=runners, num_envs_per_runner=envs,
                                         num_cpus_per_runner=0.5)
                    trainer = PolicyTrainer(ppo, EnvConfig(task=args.task, addresses=addresses, local_engine="mujoco"))
                    rate[kind] = sample_rate(trainer, args.steps)
                    trainer.stop()
                rows.append((runners, envs, rate["grpc"], rate["local"]))
        print(f"\nRLlib sampling, {args.task}, env steps/s ({args.steps} steps per runner)")
        print(f"{'runners':>8} {'envs/runner':>12} {'gRPC':>10} {'in-process':>11} {'gRPC/in-process':>16}")
        for r, e, g, loc in rows:
            print(f"{r:>8} {e:>12} {g:>10.0f} {loc:>11.0f} {g / loc:>16.2f}")

        reality = Reality(args.task, engine="mujoco")
        trainer = PolicyTrainer(ppo_config_for(args.task), EnvConfig(task=args.task, addresses=[servers[0].address]))
        t0, reached = time.perf_counter(), None
        for _ in range(args.max_iterations):
            m = trainer.train(1)[-1]
            ret = evaluate(trainer.policy(), reality, episodes=32, seed=0)["return_mean"]
            print(f"  iter {m['iteration']:>3}  env steps {m['env_steps']:>7}  return in reality {ret:6.1f}  "
                  f"{time.perf_counter() - t0:6.1f} s", flush=True)
            if ret >= args.threshold:
                reached = (m["iteration"], m["env_steps"], time.perf_counter() - t0)
                break
        trainer.stop()
        random = evaluate(None, reality, episodes=32, seed=0)["return_mean"]
        if reached:
            print(f"PPO reached return {args.threshold} in reality (random: {random:.1f}) after {reached[0]} iterations, "
                  f"{reached[1]} env steps, {reached[2]:.0f} s wall-clock (incl. evaluation)")
        else:
            print(f"PPO did not reach return {args.threshold} in {args.max_iterations} iterations (random: {random:.1f})")
    finally:
        for s in servers:
            s.stop()
        ray.shutdown()


if __name__ == "__main__":
    main()
