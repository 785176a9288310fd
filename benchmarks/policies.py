"""RLlib sampling throughput through the gRPC service vs RLlib's own sampler; PPO wall-clock to a return.

    python -m benchmarks.policies [--task pendulum] [--steps 4096] [--runners 1] [--envs 16 64 256] [--threshold 80]

Sampling: each EnvRunner samples ``--steps`` env steps with the current (random-init) policy, all runners
in parallel, after a warm-up; env steps/s = total / wall time. Three samplers with the same runners, envs
per runner and policy network, measured in one run:

- ``gRPC``: Flywheel's EnvRunner stepping a simulator server (MuJoCo engine, fidelity 1) over gRPC: unary
  ``Step`` calls or a ``StreamStep`` stream, one session per runner or ``--lanes`` sessions stepped in turn
  (the pipelined sampler, ``policies.pipelined_sampler``);
- ``in-process``: the same EnvRunner on ``LocalVectorEnv`` (the same corrected simulator, no wire);
- ``RLlib default``: RLlib's own ``SingleAgentEnvRunner`` on gymnasium's ``Pendulum-v1`` (``--gym-env``), with
  RLlib's defaults (its per-env action unsquash included; Flywheel's served env maps its whole batch itself).

The ratio gRPC / RLlib default is the one the service is judged by.
"""

from __future__ import annotations

import argparse
import time

import ray

from policies import EnvConfig, PolicyTrainer, evaluate, ppo_config_for
from services.config import ServerConfig
from services.server import ServerProcess
from simulators.reality import Reality


def sample_rate(algo, steps: int) -> float:
    group = algo.env_runner_group
    group.foreach_env_runner(lambda r: len(r.sample(num_timesteps=256)), local_env_runner=False)   # warm up
    t0 = time.perf_counter()
    group.foreach_env_runner(lambda r: len(r.sample(num_timesteps=steps)), local_env_runner=False)
    return steps * group.num_healthy_remote_env_runners() / (time.perf_counter() - t0)


def samplers(served: list[str], lanes: int) -> dict[str, tuple[list[str], int, bool]]:
    """Flywheel's samplers measured: name -> (addresses, lanes, streaming)."""
    return {"unary": (served, 1, False), "stream": (served, 1, True), f"{lanes} lanes": (served, lanes, False),
            f"{lanes} lanes, stream": (served, lanes, True), "in-process": (["local"], 1, False)}


def rllib_default_algo(env_id: str, ppo, runners: int, envs: int):
    """RLlib's PPO with its default EnvRunner on a gymnasium env: the same runners, envs and network as ours."""
    from ray.rllib.algorithms.ppo import PPOConfig as RLlibPPOConfig

    config = (RLlibPPOConfig().framework("torch").environment(env_id)
              .env_runners(num_env_runners=runners, num_envs_per_env_runner=envs, num_cpus_per_env_runner=0.5)
              .learners(num_learners=0)
              .rl_module(model_config={"fcnet_hiddens": list(ppo.hidden_sizes), "fcnet_activation": ppo.activation,
                                       "head_fcnet_hiddens": [], "vf_share_layers": False})
              .debugging(seed=ppo.seed, log_level="ERROR"))
    return config.build_algo()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="pendulum")
    p.add_argument("--steps", type=int, default=4096, help="env steps sampled per runner")
    p.add_argument("--runners", type=int, nargs="+", default=[1])
    p.add_argument("--envs", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--lanes", type=int, default=2, help="sessions per runner stepped in turn (the pipelined sampler)")
    p.add_argument("--gym-env", default="Pendulum-v1", help="RLlib's default sampler runs this gymnasium env")
    p.add_argument("--no-ppo", action="store_true", help="sampling only, no PPO run to --threshold")
    p.add_argument("--threshold", type=float, default=80.0, help="return in reality that PPO must reach")
    p.add_argument("--max-iterations", type=int, default=20)
    p.add_argument("--server-threads", type=int, default=0, help="the servers' torch threads (0: torch's default)")
    args = p.parse_args()

    servers = [ServerProcess(ServerConfig(task=args.task, engine="mujoco", torch_threads=args.server_threads)).start()
               for _ in range(max(args.runners))]
    rows = []
    try:
        for runners in args.runners:
            for envs in args.envs:
                rate = {}
                ppo = ppo_config_for(args.task, num_env_runners=runners, num_envs_per_runner=envs,
                                     num_cpus_per_runner=0.5)
                served = [s.address for s in servers[:runners]]
                for kind, (addresses, lanes, streaming) in samplers(served, args.lanes).items():
                    trainer = PolicyTrainer(ppo, EnvConfig(task=args.task, addresses=addresses, local_engine="mujoco",
                                                           lanes=lanes, streaming=streaming))
                    rate[kind] = sample_rate(trainer.algo, args.steps)
                    trainer.stop()
                algo = rllib_default_algo(args.gym_env, ppo, runners, envs)
                rate["default"] = sample_rate(algo, args.steps)
                algo.stop()
                rows.append((runners, envs, rate))
                print(f"  {runners} runner(s) x {envs} envs: " + ", ".join(f"{k} {v:.0f}" for k, v in rate.items())
                      + " env steps/s", flush=True)
        print(f"\nRLlib sampling, env steps/s ({args.steps} steps per runner; {args.task} served vs {args.gym_env}; "
              f"server torch threads {args.server_threads or 'default'})")
        served = [k for k in rows[0][2] if k not in ("in-process", "default")]
        print(f"| runners | envs/runner | {' | '.join(f'service, {k}' for k in served)} | in-process | RLlib default, "
              f"{args.gym_env} | {' | '.join(f'{k} / default' for k in served)} | best service / in-process |")
        print("|---:" * (4 + 2 * len(served) + 1) + "|")
        for r, e, rate in rows:
            best, default = max(rate[k] for k in served), rate["default"]
            print(f"| {r} | {e} | {' | '.join(f'{rate[k]:,.0f}' for k in served)} | {rate['in-process']:,.0f} | "
                  f"{default:,.0f} | {' | '.join(f'{rate[k] / default:.2f}' for k in served)} | "
                  f"{best / rate['in-process']:.2f} |")
        if args.no_ppo:
            return

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
