"""A probabilistic ensemble MLP, vectorised over members (one batched matmul per layer, no member loop)."""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

# Rows per pass through the network on a CPU: 512 rows of 5 x 128 float32 activations (1.3 MB) stay in a
# core's cache; measured on this machine, 8,192 rows take 2.2x less time in chunks on one thread, 1.2x on two.
CHUNK_ROWS = 512
# Fewest rows per product: a matrix library may take other kernels (another order of summation) for the
# smallest batches (one row on Intel's MKL here, one to three on AMD EPYC), so fewer rows are padded to this.
MIN_ROWS = 4


class EnsembleLinear(nn.Module):
    """``E`` independent linear layers applied as one ``baddbmm``: ``[E, B, in] -> [E, B, out]``."""

    def __init__(self, members: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(members, in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(members, 1, out_features))
        bound = 1.0 / math.sqrt(in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class GaussianEnsemble(nn.Module):
    """``E`` MLPs each predicting a diagonal Gaussian (mean, log-std) over ``out_features``.

    The log-std is soft-bounded between learned limits (as in PETS) so that NLL training cannot
    drive it to -inf on points it fits well, nor to +inf on points it does not.
    """

    def __init__(self, members: int, in_features: int, out_features: int, hidden: int, layers: int):
        super().__init__()
        sizes = [in_features] + [hidden] * layers
        self.hidden = nn.ModuleList(EnsembleLinear(members, a, b) for a, b in itertools.pairwise(sizes))
        self.head = EnsembleLinear(members, sizes[-1], 2 * out_features)
        self.max_log_std = nn.Parameter(torch.full((1, 1, out_features), 0.5))
        self.min_log_std = nn.Parameter(torch.full((1, 1, out_features), -5.0))
        self.members, self.out_features = members, out_features

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x``: ``[E, B, in]`` (or ``[B, in]``, shared by all members) -> mean, log_std ``[E, B, out]``."""
        if x.dim() == 2:
            x = x.unsqueeze(0).expand(self.members, -1, -1)
        for layer in self.hidden:
            x = nn.functional.silu(layer(x))
        mean, log_std = self.head(x).chunk(2, dim=-1)
        return mean, self._bound(log_std)

    def infer(self, x: torch.Tensor, with_std: bool = True, dtype: torch.dtype = torch.float32
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``forward`` for inference (call under ``torch.inference_mode``): the same values, fewer ops and
        no module dispatch; the log-std is skipped unless ``with_std``. ``x``: ``[B, in]`` or ``[E, B, in]``.

        ``dtype=torch.bfloat16`` runs the products between hidden layers in bfloat16 (float32 accumulation);
        the first layer (the state's features) and the head (the predicted change) stay float32. On a CPU
        a batch of more than ``CHUNK_ROWS`` rows goes through the network in chunks of that many rows, so
        that a chunk's activations stay in a core's cache; a row's values do not depend on its chunk.
        """
        n = x.shape[-2]
        if x.device.type != "cpu":
            out = self._head_out(x, dtype)
        elif n < MIN_ROWS:            # padded with copies of the last row: the small-batch kernels give other bits
            out = self._head_out(torch.cat([x, x[..., -1:, :].expand(*x.shape[:-2], MIN_ROWS - n, -1)], dim=-2),
                                 dtype)[:, :n]
        elif n <= CHUNK_ROWS:
            out = self._head_out(x, dtype)
        else:
            bounds = list(range(0, n, CHUNK_ROWS))
            if n - bounds[-1] < MIN_ROWS:   # no chunk of fewer rows: it would take another kernel
                bounds.pop()
            out = torch.cat([self._head_out(x[..., lo:hi, :], dtype) for lo, hi in zip(bounds, bounds[1:] + [n])],
                            dim=1)
        mean, log_std = out.chunk(2, dim=-1)
        return mean, (self._bound(log_std) if with_std else None)

    def _head_out(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The head's output ``[E, B, 2 out]`` (means and raw log-stds) of ``x`` ``[B, in]`` or ``[E, B, in]``."""
        if x.dim() == 2:
            x = x.unsqueeze(0).expand(self.members, -1, -1)
        if dtype == torch.float32 or len(self.hidden) < 2:
            for layer in self.hidden:
                x = nn.functional.silu(torch.baddbmm(layer.bias, x, layer.weight), inplace=True)
        else:
            first, *rest = self.hidden
            x = nn.functional.silu(torch.baddbmm(first.bias, x, first.weight), inplace=True).to(dtype)
            for layer in rest:
                x = nn.functional.silu(torch.baddbmm(layer.bias.to(dtype), x, layer.weight.to(dtype)), inplace=True)
            x = x.float()
        return torch.baddbmm(self.head.bias, x, self.head.weight)

    def _bound(self, log_std: torch.Tensor) -> torch.Tensor:
        log_std = self.max_log_std - nn.functional.softplus(self.max_log_std - log_std)
        return self.min_log_std + nn.functional.softplus(log_std - self.min_log_std)

    def nll(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Gaussian NLL (up to a constant) averaged over members, batch and dims, plus the log-std bound penalty."""
        mean, log_std = self(x)
        nll = (0.5 * ((target - mean) * torch.exp(-log_std)) ** 2 + log_std).mean()
        return nll + 0.01 * (self.max_log_std.sum() - self.min_log_std.sum()) / self.out_features


def member_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over the leading (member) axis by elementwise adds in member order: each row's value does not
    depend on the batch it is in (``Tensor.mean(0)`` vectorises differently at the batch's tail)."""
    total = x[0]
    for e in range(1, len(x)):
        total = total + x[e]
    return total / len(x)
