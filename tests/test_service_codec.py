"""Codec, generated-code freshness and import hygiene of the simulator service (no server needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from services.codec import CodecError, decode, decode_float, encode
from services.proto import generate
from services.proto.flywheel.simulator.v1 import simulator_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("dtype", ["float32", "float64", "int32", "int64", "uint8", "bool"])
def test_round_trip_is_exact_and_little_endian(dtype):
    a = (np.arange(24).reshape(2, 3, 4) % 7).astype(dtype)
    msg = encode(a)
    assert msg.dtype == dtype and list(msg.shape) == [2, 3, 4]
    assert msg.data == a.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    b = decode(msg)
    assert b.dtype == a.dtype and np.array_equal(a, b)


def test_strided_views_travel_as_their_values():
    a = np.arange(60, dtype=np.float64).reshape(3, 4, 5)
    for view in (a.T, a[:, ::2], a[1], np.asfortranarray(a)):
        msg = encode(view)
        assert list(msg.shape) == list(view.shape)
        assert np.array_equal(decode(msg), view)


def test_big_endian_input_travels_little_endian():
    a = np.array([1.5, -2.0], dtype=">f8")
    msg = encode(a)
    assert msg.data == np.array([1.5, -2.0], "<f8").tobytes()
    assert np.array_equal(decode(msg), [1.5, -2.0])


def test_bytes_not_repeated_floats():
    msg = encode(np.zeros((64, 376), np.float32))
    assert len(msg.SerializeToString()) < 64 * 376 * 4 + 64


def test_malformed_tensors_raise_with_reason():
    with pytest.raises(CodecError, match="bytes do not hold shape"):
        decode(pb.Tensor(dtype="float32", shape=[3], data=b"\0" * 8))
    with pytest.raises(CodecError, match="dtype 'complex64' is not supported"):
        decode(pb.Tensor(dtype="complex64", shape=[1], data=b"\0" * 8))
    with pytest.raises(CodecError, match="cannot encode dtype"):
        encode(np.zeros(2, np.complex64))
    with pytest.raises(CodecError, match="negative dimension"):
        decode(pb.Tensor(dtype="float32", shape=[-2, -2], data=b"\0" * 16))
    # 2**32 x 2**32 wraps to 0 in 64-bit arithmetic: an empty payload must not pass as that shape
    with pytest.raises(CodecError, match=r"0 bytes do not hold shape \(4294967296, 4294967296\)"):
        decode(pb.Tensor(dtype="uint8", shape=[2**32, 2**32], data=b""))


def test_decode_float_checks_dtype_shape_and_finiteness():
    ok = decode_float(encode(np.ones((4, 2), np.float32)), "actions", (4, 2))
    assert ok.dtype == np.float64 and ok.shape == (4, 2)
    with pytest.raises(CodecError, match=r"actions: shape \(4, 3\) does not match the expected \(4, 2\)"):
        decode_float(encode(np.ones((4, 3), np.float32)), "actions", (4, 2))
    with pytest.raises(CodecError, match="dtype int32 is not allowed; expected float32 or float64"):
        decode_float(encode(np.ones((4, 2), np.int32)), "actions", (4, 2))
    bad = np.ones((4, 2))
    bad[2, 1] = np.nan
    with pytest.raises(CodecError, match=r"non-finite values .* row\(s\) \[2\]"):
        decode_float(encode(bad), "actions", (4, 2))
    assert decode_float(encode(np.ones((3, 5, 2))), "x", (3, None, 2)).shape == (3, 5, 2)


def test_committed_generated_code_is_fresh():
    assert generate.stale_files() == [], "generated gRPC code is stale: run `make proto`"


def test_staleness_is_detected(tmp_path, monkeypatch):
    target = tmp_path / generate.PACKAGE_DIR
    target.mkdir(parents=True)
    for name in generate.OUTPUTS:
        (target / name).write_text((generate.ROOT / generate.PACKAGE_DIR / name).read_text())
    (target / "simulator_pb2.py").write_text((target / "simulator_pb2.py").read_text() + "\n# edited\n")
    (tmp_path / generate.PROTO).write_text((generate.ROOT / generate.PROTO).read_text())
    monkeypatch.setattr(generate, "ROOT", tmp_path)   # a copy of the tree whose pb2 was edited by hand
    assert generate.stale_files() == ["simulator_pb2.py"]


def test_client_side_imports_no_jax_no_physics():
    code = ("import sys, services, services.client, services.vector_env, services.codec\n"
            "bad = sorted({m.split('.')[0] for m in sys.modules} & {'jax', 'jaxlib', 'mujoco', 'simulators', "
            "'rewards', 'brax', 'torch'})\n"
            "print(','.join(bad))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"client-side import pulled in {out.stdout.strip()}"
