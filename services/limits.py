"""The work one request may ask of a server: batch B, horizon H and B*H*S elements, checked before any work.

    check_work(config, "Imagine", b=len(states), h=horizon, s=state_size)   # RESOURCE_EXHAUSTED naming the limit
    for lo, hi in chunks(total, per_chunk):                                  # long work in slices ...
        ensure_active(context, "Imagine")                                    # ... that stop when the caller left
"""

from __future__ import annotations

from collections.abc import Iterator

from services.codec import CodecError
from services.proto.flywheel.simulator.v1 import simulator_pb2 as pb
from services.session import ServiceError

CHUNK_ELEMENTS = 1 << 16        # a slice of Imagine/Verify work between two checks that the caller is still there
CHUNK_STEPS = 64                # and at most this many sequential world-model steps


def header_shape(msg: pb.Tensor, name: str) -> tuple[int, ...]:
    """A tensor's declared shape, checked non-negative, without decoding its data."""
    shape = tuple(int(d) for d in msg.shape)
    if any(d < 0 for d in shape):
        raise CodecError(f"{name}: negative dimension in shape {shape}")
    return shape


def check_work(config, what: str, b: int, h: int = 1, s: int = 1) -> None:
    """Refuse (RESOURCE_EXHAUSTED) a request whose B, H or B*H*S is over the server's ``max_batch``,
    ``max_horizon`` or ``max_elements``."""
    if b > config.max_batch:
        raise ServiceError("RESOURCE_EXHAUSTED", f"{what}: batch B={b} is over the server's max_batch "
                           f"{config.max_batch}; split it into batches of at most {config.max_batch}")
    if h > config.max_horizon:
        raise ServiceError("RESOURCE_EXHAUSTED", f"{what}: horizon H={h} is over the server's max_horizon "
                           f"{config.max_horizon}; ask for at most {config.max_horizon} steps")
    if b * h * s > config.max_elements:
        raise ServiceError("RESOURCE_EXHAUSTED", f"{what}: B*H*S = {b}*{h}*{s} = {b * h * s} elements is over the "
                           f"server's max_elements {config.max_elements}; use a smaller batch or horizon")


def chunks(total: int, per_chunk: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` slices of ``range(total)`` of at most ``per_chunk`` (>= 1) each."""
    step = max(1, int(per_chunk))
    for lo in range(0, total, step):
        yield lo, min(lo + step, total)


def ensure_active(context, what: str) -> None:
    """Stop working on a call whose client has gone (deadline passed, cancelled, disconnected)."""
    if context is not None and not context.is_active():
        raise ServiceError("CANCELLED", f"{what}: the caller went away (deadline passed or cancelled); "
                           "the server stopped working on it")
