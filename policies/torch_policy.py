"""A plain torch MLP policy: the actor of a trained PPO module, deterministic, no RLlib needed to act.

    policy = trainer.policy()                  # or TorchPolicy.load(path)
    actions = policy(observations)             # numpy [B, O] -> numpy [B, A] (the Gaussian's mean)
    reality.rollout(policy, n_envs=32)         # a TorchPolicy is a Reality policy callable

The network maps observations to the mean of the action distribution in the normalised space
[-1, 1]; actions are un-squashed to the bounds and clipped there, as RLlib does before stepping
(tests/test_policies_carry_over.py checks this against RLlib's own runner, bit for bit). Saved files
carry a sha256 digest (``policies.checkpoint``); a damaged file is a ``CheckpointError`` naming it.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from torch import nn

from policies.checkpoint import CheckpointError, read_verified, write_verified

_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "silu": nn.SiLU, "elu": nn.ELU}
_ENCODER = re.compile(r"^encoder\.actor_encoder\.net\.mlp\.(\d+)\.(weight|bias)$")
_HEAD = re.compile(r"^pi\.net\.mlp\.(\d+)\.(weight|bias)$")
MAGIC = b"FLYWHEEL-PI\x00"
FORMAT = 1


class TorchPolicy(nn.Module):
    """Deterministic actor: MLP encoder -> linear head -> mean -> un-squash to [low, high]."""

    def __init__(self, observation_size: int, action_low: np.ndarray, action_high: np.ndarray,
                 hidden_sizes: list[int], activation: str = "tanh"):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(_ACTIVATIONS)}, got {activation!r}")
        low, high = np.array(action_low, np.float32).ravel(), np.array(action_high, np.float32).ravel()
        if low.shape != high.shape or not (low < high).all():
            raise ValueError(f"action bounds must be same-shaped with low < high, got {low} and {high}")
        self.observation_size, self.action_size = int(observation_size), len(low)
        self.hidden_sizes, self.activation = [int(h) for h in hidden_sizes], activation
        layers: list[nn.Module] = []
        size = self.observation_size
        for h in self.hidden_sizes:
            layers += [nn.Linear(size, h), _ACTIVATIONS[activation]()]
            size = h
        self.encoder = nn.Sequential(*layers)
        self.head = nn.Linear(size, 2 * self.action_size)   # mean and log-std, as RLlib's Gaussian head
        self.register_buffer("action_low", torch.as_tensor(low))
        self.register_buffer("action_high", torch.as_tensor(high))
        self.eval()

    # -- acting --------------------------------------------------------------------------------
    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """Observations ``[B, O]`` -> actions ``[B, A]`` within the bounds."""
        mean = self.head(self.encoder(obs))[..., : self.action_size]
        a = self.action_low + (mean + 1.0) * (self.action_high - self.action_low) / 2.0
        return torch.clamp(a, self.action_low, self.action_high)

    @torch.no_grad()
    def __call__(self, obs):
        """numpy in -> numpy out (float32); torch in -> torch out."""
        if isinstance(obs, torch.Tensor):
            return self.forward(obs.to(self.action_low.dtype))
        x = np.array(obs, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.observation_size:
            raise ValueError(f"observations have shape {x.shape}, expected (batch, {self.observation_size})")
        return self.forward(torch.from_numpy(x)).numpy()

    # -- from RLlib's module weights -----------------------------------------------------------
    def load_module_weights(self, weights: dict) -> TorchPolicy:
        """Copy the actor's weights from a PPO module's state dict (numpy arrays or tensors)."""
        def ordered(pattern: re.Pattern) -> list[str]:  # weight before bias, layer by layer
            found = [(int(m[1]), m[2] == "bias", k) for k in weights if (m := pattern.match(k))]
            return [k for *_, k in sorted(found)]

        ours = [m for m in self.encoder if isinstance(m, nn.Linear)] + [self.head]
        theirs = ordered(_ENCODER) + ordered(_HEAD)
        if len(theirs) != 2 * len(ours):
            raise ValueError(f"module weights have {len(theirs) // 2} actor layers, this policy has {len(ours)} "
                             f"(hidden_sizes={self.hidden_sizes}); keys: {sorted(weights)[:8]}...")
        with torch.no_grad():
            for layer, (kw, kb) in zip(ours, zip(theirs[0::2], theirs[1::2])):
                if not (kw.endswith("weight") and kb.endswith("bias")):
                    raise ValueError(f"unexpected module weight layout at {kw}, {kb}")
                w, b = torch.as_tensor(np.asarray(weights[kw])), torch.as_tensor(np.asarray(weights[kb]))
                if w.shape != layer.weight.shape:
                    raise ValueError(f"{kw} has shape {tuple(w.shape)}, this policy expects {tuple(layer.weight.shape)}")
                layer.weight.copy_(w)
                layer.bias.copy_(b)
        return self

    # -- persistence ---------------------------------------------------------------------------
    def config(self) -> dict:
        return {"observation_size": self.observation_size, "action_low": self.action_low.tolist(),
                "action_high": self.action_high.tolist(), "hidden_sizes": self.hidden_sizes,
                "activation": self.activation}

    def save(self, path: str) -> None:
        """Atomic save (temp file, fsync, rename) of the weights and the architecture, with a sha256 digest."""
        write_verified(path, {"format": FORMAT, "config": self.config(), "state_dict": self.state_dict()}, MAGIC)

    @classmethod
    def load(cls, path: str) -> TorchPolicy:
        """Load a file written by ``save``; ``CheckpointError`` naming the file if it is missing, truncated or altered."""
        blob = read_verified(path, MAGIC, "policy file")
        if blob.get("format") != FORMAT or not {"config", "state_dict"} <= set(blob):
            raise CheckpointError(f"policy file {path} has format {blob.get('format')!r}, expected {FORMAT} "
                                  f"with 'config' and 'state_dict'")
        try:
            policy = cls(**blob["config"])
            policy.load_state_dict(blob["state_dict"])
        except (TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"policy file {path} does not describe a TorchPolicy: {exc}") from exc
        return policy
