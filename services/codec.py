"""numpy <-> ``Tensor`` messages: raw little-endian bytes with a dtype name and a shape.

Used by both sides of the wire; imports only numpy and the generated messages.
"""

from __future__ import annotations

import math
import sys

import numpy as np

from services.proto.flywheel.simulator.v1 import simulator_pb2 as pb

DTYPES = ("float32", "float64", "int32", "int64", "uint8", "bool")


class CodecError(ValueError):
    """A tensor message that does not decode, or does not match what was expected."""


_NAMES = {np.dtype(n): n for n in DTYPES}   # native dtypes: a dict lookup instead of building a name per call
_WIRE = {n: (np.dtype(n).newbyteorder("<"), np.dtype(n)) for n in DTYPES}   # name -> (little-endian, native) dtype
_NATIVE_LITTLE = sys.byteorder == "little"


def encode(array: np.ndarray, dtype: str | None = None) -> pb.Tensor:
    """Encode an array (cast to ``dtype`` when given) as a little-endian ``Tensor``."""
    a = np.asarray(array) if dtype is None else np.asarray(array, dtype=dtype)
    name = _NAMES.get(a.dtype) or a.dtype.name
    if name not in DTYPES:
        raise CodecError(f"cannot encode dtype {name}; allowed: {', '.join(DTYPES)}")
    order = a.dtype.byteorder
    if not (a.flags.c_contiguous and (order in "<|" or (order == "=" and _NATIVE_LITTLE))):
        a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
    return pb.Tensor(dtype=name, shape=a.shape, data=a.tobytes())


def decode(msg: pb.Tensor, name: str = "tensor") -> np.ndarray:
    """Decode a ``Tensor`` to a (read-only view of a) numpy array; malformed input raises ``CodecError``."""
    wire = _WIRE.get(msg.dtype)
    if wire is None:
        raise CodecError(f"{name}: dtype {msg.dtype!r} is not supported; allowed: {', '.join(DTYPES)}")
    dtype, native = wire
    shape = tuple(msg.shape)
    if min(shape, default=0) < 0:
        raise CodecError(f"{name}: negative dimension in shape {shape}")
    count = math.prod(shape)                     # exact: a huge claimed shape cannot wrap around to match the bytes
    data = msg.data
    if len(data) != count * dtype.itemsize:
        raise CodecError(f"{name}: {len(data)} bytes do not hold shape {shape} of {msg.dtype} "
                         f"({count * dtype.itemsize} bytes expected)")
    return np.frombuffer(data, dtype=dtype, count=count).reshape(shape).astype(native, copy=False)


def decode_float(msg: pb.Tensor, name: str, shape: tuple[int | None, ...], finite: bool = True) -> np.ndarray:
    """Decode a float32/float64 tensor, check its shape (None = any size) and finiteness; float64 out."""
    if msg.dtype not in ("float32", "float64"):
        raise CodecError(f"{name}: dtype {msg.dtype or '(unset)'} is not allowed; expected float32 or float64")
    a = decode(msg, name)
    if a.ndim != len(shape) or any(e is not None and d != e for d, e in zip(a.shape, shape)):
        want = "(" + ", ".join("*" if e is None else str(e) for e in shape) + ")"
        raise CodecError(f"{name}: shape {tuple(a.shape)} does not match the expected {want}")
    if finite and not np.isfinite(a).all():
        rows = np.flatnonzero(~np.isfinite(a.reshape(len(a), -1)).all(axis=1))[:10].tolist() if a.ndim else []
        raise CodecError(f"{name}: non-finite values (NaN or inf) in row(s) {rows}; values must be finite")
    return a.astype(np.float64, copy=False)


def decode_mask(msg: pb.Tensor, name: str, size: int) -> np.ndarray:
    """Decode a ``[size]`` bool tensor (an unset tensor is all False)."""
    if not msg.dtype and not msg.shape and not msg.data:
        return np.zeros(size, bool)
    if msg.dtype != "bool":
        raise CodecError(f"{name}: dtype {msg.dtype or '(unset)'} is not allowed; expected bool")
    a = decode(msg, name)
    if a.shape != (size,):
        raise CodecError(f"{name}: shape {tuple(a.shape)} does not match the expected ({size},)")
    return a
