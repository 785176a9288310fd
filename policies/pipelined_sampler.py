"""Pipelined sampling: an EnvRunner computes one lane's actions while the server steps another lane.

RLlib's ``SingleAgentEnvRunner._sample`` alternates strictly: the policy's forward pass, then the env
step, then the episode bookkeeping; with a served env the runner waits for the server, and the
server waits for the runner. With the runner's envs split into lanes (``services.lanes``, one session
each), ``sample_lanes`` sends lane 0's actions, then does lane 1's forward pass and bookkeeping while
lane 0 is being stepped, and so on round the lanes::

    runner (policy)  | fwd 0 | send 0 | fwd 1 | send 1 | wait 0, record 0, fwd 0 | send 0 | wait 1, ...
    server (physics) |       | step 0 ..................| step 1 ..........................| step 0 ...

Each lane is sampled exactly as RLlib samples a vector env (the same connectors with that lane's
episodes, the same episode objects, callbacks and metrics), so the learner gets the same kind of data;
only the order in which envs are stepped changes. A sample ends with no step in flight: a lane whose
step was sent is waited for and recorded (so a sample holds fewer than ``num_envs`` steps more than asked,
the bound RLlib's own loop has). A lane step that fails is handled as RLlib
handles a failed env step (``restart_failed_sub_environments``: re-make the env and reset; else raise).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ray.rllib.core.columns import Columns
from ray.rllib.env.env_runner import ENV_STEP_FAILURE, NUM_ENV_STEP_FAILURES_LIFETIME
from ray.rllib.utils.metrics import (
    ENV_STEP_TIMER,
    ENV_TO_MODULE_CONNECTOR,
    MODULE_TO_ENV_CONNECTOR,
    RLMODULE_INFERENCE_TIMER,
    WEIGHTS_SEQ_NO,
)
from ray.rllib.utils.spaces.space_utils import unbatch

log = logging.getLogger(__name__)


@dataclass
class Lane:
    """One lane's sampling state: its envs ``lo:hi`` of the runner's, connector data, the next forward input."""

    lo: int
    hi: int
    shared_data: dict = field(default_factory=dict)
    to_module: object = None          # the env-to-module output for the lane's next forward pass
    to_env: dict | None = None        # the module-to-env output of the step in flight (its extra model outputs)
    actions: object = None            # the (module) actions of the step in flight


def lanes_of(runner) -> list | None:
    """The lane envs of ``runner``'s env (``LanedVectorEnv.lanes``), or None when it has one lane or none."""
    env = getattr(runner, "env", None)
    lanes = getattr(getattr(env, "unwrapped", None), "lanes", None)
    return lanes if lanes is not None and len(lanes) > 1 else None


def sample_lanes(runner, *, num_timesteps: int, explore: bool, force_reset: bool = False) -> list:
    """``SingleAgentEnvRunner._sample(num_timesteps=...)`` with the runner's lanes stepped in turn."""
    ts = 0
    done_episodes = []
    if force_reset or runner._needs_initial_reset or getattr(runner, "_flywheel_lanes", None) is None:
        _reset(runner, explore)
    lanes: list[Lane] = runner._flywheel_lanes
    in_flight: list[int] = []
    if num_timesteps > 0:
        for k in range(len(lanes)):
            _act_and_send(runner, k, explore, ts)
            in_flight.append(k)
    while in_flight:
        k = in_flight.pop(0)
        results = _wait(runner, k)
        if results is ENV_STEP_FAILURE:          # the env was re-made: start over from a reset, as RLlib does
            ts, in_flight = 0, []
            _reset(runner, explore)
            lanes = runner._flywheel_lanes
            for j in range(len(lanes)):
                _act_and_send(runner, j, explore, ts)
                in_flight.append(j)
            continue
        ts += _record(runner, k, results, explore, done_episodes)
        if ts < num_timesteps:
            _act_and_send(runner, k, explore, ts)
            in_flight.append(k)
    return _finish(runner, ts, done_episodes)


def _reset(runner, explore: bool) -> None:
    """RLlib's ``_reset_envs_and_episodes`` with one env-to-module pass per lane."""
    runner._ongoing_episodes = [None] * runner.num_envs
    runner._shared_data = {}
    for i in range(runner.num_envs):
        runner._new_episode(i, runner._ongoing_episodes)
    runner._ongoing_episodes_for_metrics.clear()
    observations, infos = runner._try_env_reset(seed=runner._seed if runner._needs_initial_reset else None,
                                                options=None)
    observations = unbatch(observations)
    episodes = runner._ongoing_episodes
    for i in range(runner.num_envs):
        episodes[i].add_env_reset(observation=observations[i], infos=infos[i])
    runner._cached_to_module = None
    lanes = [Lane(lo, hi) for lo, hi in runner.env.unwrapped.bounds]
    for lane in lanes:
        if runner.module is not None:
            lane.to_module = runner._env_to_module(
                rl_module=runner.module, episodes=episodes[lane.lo:lane.hi], explore=explore,
                shared_data=lane.shared_data, metrics=runner.metrics, metrics_prefix_key=(ENV_TO_MODULE_CONNECTOR,),
                **{Columns.OBS: observations[lane.lo:lane.hi], Columns.INFOS: infos[lane.lo:lane.hi]})
    for i in range(runner.num_envs):
        runner._make_on_episode_callback("on_episode_start", i, episodes)
    runner._flywheel_lanes = lanes
    runner._needs_initial_reset = False


def _act_and_send(runner, k: int, explore: bool, ts: int) -> None:
    """Lane ``k``'s forward pass and module-to-env connectors, then its actions on the wire."""
    lane = runner._flywheel_lanes[k]
    to_module, lane.to_module = lane.to_module, None
    if explore:
        runners = runner.config.num_env_runners or 1
        t = (runner.num_env_steps_sampled_lifetime // runners + ts) * runners
        with runner.metrics.log_time(RLMODULE_INFERENCE_TIMER):
            to_env = runner.module.forward_exploration(to_module, t=t)
    else:
        with runner.metrics.log_time(RLMODULE_INFERENCE_TIMER):
            to_env = runner.module.forward_inference(to_module)
    to_env = runner._module_to_env(rl_module=runner.module, batch=to_env,
                                   episodes=runner._ongoing_episodes[lane.lo:lane.hi], explore=explore,
                                   shared_data=lane.shared_data, metrics=runner.metrics,
                                   metrics_prefix_key=(MODULE_TO_ENV_CONNECTOR,))
    lane.actions = to_env.pop(Columns.ACTIONS)
    actions_for_env = to_env.pop(Columns.ACTIONS_FOR_ENV, lane.actions)
    lane.to_env = to_env
    runner.env.unwrapped.lanes[k].step_async(actions_for_env)


def _wait(runner, k: int):
    """Lane ``k``'s step result with its infos as one dict per env, or ``ENV_STEP_FAILURE`` (RLlib's
    ``_try_env_step`` policy: the env is re-made when ``restart_failed_sub_environments``, else raise)."""
    try:
        with runner.metrics.log_time(ENV_STEP_TIMER):
            obs, rewards, terminateds, truncateds, info = runner.env.unwrapped.lanes[k].step_wait()
        runner._log_env_steps(metric=runner._metrics_num_try_env_step, num_steps=1)
    except Exception as exc:
        runner.metrics.log_value(NUM_ENV_STEP_FAILURES_LIFETIME, 1, reduce="lifetime_sum")
        if runner.config.restart_failed_sub_environments:
            log.exception("lane %d of EnvRunner %s failed to step; re-making its env and resetting: %s", k,
                          runner.worker_index, exc)
            runner.make_env()
            runner._flywheel_lanes = None
            return ENV_STEP_FAILURE
        raise RuntimeError(f"lane {k} of EnvRunner {runner.worker_index} failed to step and "
                           f"restart_failed_sub_environments is off: {exc}") from exc
    return obs, rewards, terminateds, truncateds, infos_per_env(info, len(rewards))


def _record(runner, k: int, results, explore: bool, done_episodes: list) -> int:
    """RLlib's per-step bookkeeping for lane ``k``; returns the env steps it added."""
    lane = runner._flywheel_lanes[k]
    observations, rewards, terminateds, truncateds, infos = results
    observations, actions = unbatch(observations), unbatch(lane.actions)
    episodes = runner._ongoing_episodes
    started, ts = set(), 0
    for j in range(lane.hi - lane.lo):
        i = lane.lo + j
        if not episodes[i].is_reset:
            episodes[i].add_env_reset(observation=observations[j], infos=infos[j])
            started.add(i)
        else:
            ts += 1
            extra = {key: value[j] for key, value in lane.to_env.items()}
            extra[WEIGHTS_SEQ_NO] = runner._weights_seq_no
            episodes[i].add_env_step(observation=observations[j], action=actions[j], reward=rewards[j],
                                     infos=infos[j], terminated=terminateds[j], truncated=truncateds[j],
                                     extra_model_outputs=extra)
    if runner.module is not None:
        lane.to_module = runner._env_to_module(
            episodes=episodes[lane.lo:lane.hi], batch={}, explore=explore, rl_module=runner.module,
            shared_data=lane.shared_data, metrics=runner.metrics, metrics_prefix_key=(ENV_TO_MODULE_CONNECTOR,),
            **{Columns.OBS: observations, Columns.ACTIONS: actions, Columns.REWARDS: rewards, Columns.INFOS: infos,
               Columns.TERMINATEDS: terminateds, Columns.TRUNCATEDS: truncateds})
    lane.to_env, lane.actions = None, None
    for i in range(lane.lo, lane.hi):
        runner._make_on_episode_callback("on_episode_start" if i in started else "on_episode_step", i, episodes)
        if episodes[i].is_done:
            runner._make_on_episode_callback("on_episode_end", i, episodes)
            done_episodes.append(episodes[i].to_numpy() if runner.episodes_to_numpy else episodes[i])
            runner._new_episode(i, episodes)
    return ts


def _finish(runner, ts: int, done_episodes: list) -> list:
    """RLlib's end of a timestep sample: cut the ongoing episodes, count the steps, return the chunks."""
    runner._done_episodes_for_metrics.extend(done_episodes)
    continuations = [e.cut(len_lookback_buffer=runner.config.episode_lookback_horizon)
                     for e in runner._ongoing_episodes]
    ongoing = []
    for e in runner._ongoing_episodes:
        if e.t == 0:
            continue
        e.validate()
        runner._ongoing_episodes_for_metrics[e.id_].append(e)
        ongoing.append(e.to_numpy() if runner.episodes_to_numpy else e)
    runner._ongoing_episodes = continuations
    runner._log_env_steps(metric=runner._metrics_num_env_steps_sampled, num_steps=ts)
    runner._increase_sampled_metrics(ts, len(done_episodes))
    return done_episodes + ongoing


def infos_per_env(info: dict, n: int) -> list[dict]:
    """A vector env's info dict as gymnasium's ``DictInfoToList`` gives it: one dict per env, each key where
    its ``_key`` mask is set (keys without a mask: every env)."""
    out = [{} for _ in range(n)]
    for key, value in info.items():
        if key.startswith("_"):
            continue
        mask = info.get(f"_{key}")
        for i in range(n):
            if mask is None or mask[i]:
                out[i][key] = value[i]
    return out
