"""Load any agent's policy file: a PPO ``TorchPolicy`` or a ``PlannerPolicy``, told apart by the file's header.

    policy = load_policy("checkpoints/policy_lap003.pt")      # observations [B, O] -> actions [B, A]
    reality.rollout(policy, n_envs=16)
"""

from __future__ import annotations

from pathlib import Path

from policies.checkpoint import CheckpointError


def load_policy(path: str | Path):
    """The policy in ``path`` (verified); ``CheckpointError`` naming the file if it is neither kind or damaged."""
    from policies import planner_policy, torch_policy

    try:
        with open(path, "rb") as f:
            head = f.read(32)
    except OSError as exc:
        raise CheckpointError(f"cannot read policy file {path}: {exc.strerror or exc}") from exc
    if head.startswith(planner_policy.MAGIC):
        return planner_policy.PlannerPolicy.load(path)
    if head.startswith(torch_policy.MAGIC):
        return torch_policy.TorchPolicy.load(str(path))
    raise CheckpointError(f"{path} is not a policy file (bad header: expected {torch_policy.MAGIC!r} for a PPO "
                          f"policy or {planner_policy.MAGIC!r} for a planner); "
                          f"{'the file is empty' if not head else 'it is truncated or another kind of file'}")
