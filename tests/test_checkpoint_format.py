"""The wire format: round trips of every dtype and container, canonical bytes, flax/numpy readability, safety."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import textwrap
from typing import NamedTuple

import msgpack
import numpy as np
import pytest
import torch

from functrain.checkpoint import format as fmt
from functrain.checkpoint.errors import CheckpointError, PartialLoadWarning, TargetMismatchError
from functrain.checkpoint.format import HEADER_SIZE, from_bytes, parse_header, to_bytes, tree_digest
from functrain.core import struct
from functrain.core.state import LossScale, Tracker, TrainState
from functrain.testing import assert_trees_equal

ALL_DTYPES = [
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.int16, torch.int32, torch.int64,
    torch.uint8, torch.uint16, torch.uint32, torch.uint64, torch.bool, torch.complex64, torch.complex128,
]


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Arbitrary bit patterns of ``dtype`` (NaNs and infinities included), 0/1 for bool."""
    g = torch.Generator().manual_seed(seed)
    n = int(np.prod(shape)) if shape else 1
    if dtype == torch.bool:
        return torch.randint(0, 2, (n,), generator=g, dtype=torch.uint8).view(torch.bool).reshape(shape)
    raw = torch.randint(0, 256, (n * dtype.itemsize,), generator=g, dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


class Moments(NamedTuple):
    mu: dict
    nu: dict
    count: torch.Tensor


@struct.dataclass
class WithStatic:
    x: torch.Tensor
    name: str = struct.field(static=True, default="unset")


def full_state() -> TrainState:
    params = {"encoder.0.weight": random_tensor((4, 3), torch.float32, 1), "encoder.0.bias": torch.zeros(4)}
    opt = (Moments({k: torch.zeros_like(v) for k, v in params.items()},
                   {k: torch.ones_like(v) for k, v in params.items()}, torch.tensor(3)), ())
    return TrainState(
        step=torch.tensor(12), micro_step=torch.tensor(24), epoch=torch.tensor(1), data_index=torch.tensor(96),
        params=params, buffers={"bn.running_mean": torch.zeros(4, dtype=torch.float64)}, opt_state=opt,
        rng=torch.tensor([123, 4]), metrics={"loss": torch.tensor(0.5)}, eval_metrics={},
        tracker=Tracker.create(), loss_scale=LossScale.create(),
    )


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (2, 0, 3), (5,), (3, 4)], ids=str)
def test_every_dtype_and_shape_round_trips_bitwise(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    t = random_tensor(shape, dtype)
    with_target = from_bytes(to_bytes({"t": t}), target={"t": torch.empty(shape, dtype=dtype)})["t"]
    without = from_bytes(to_bytes({"t": t}))["t"]
    assert bits_equal(with_target, t) and bits_equal(without, t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.complex64, torch.bool], ids=str)
def test_non_contiguous_conjugate_and_grad_tensors_are_written_as_their_values(dtype: torch.dtype) -> None:
    base = random_tensor((4, 6), dtype)
    views = {"transposed": base.t(), "strided": base[:, ::2], "expanded": base[:1].expand(3, 6)}
    if dtype.is_complex:
        views["conj"] = base.conj()
    if dtype.is_floating_point:
        views["grad"] = base.clone().requires_grad_(True) * 1
    out = from_bytes(to_bytes(views))
    for name, v in views.items():
        assert bits_equal(out[name], v.detach().resolve_conj().contiguous()), name


def test_containers_round_trip_into_target_types() -> None:
    tree = {
        "scalars": [None, True, False, 0, -1, 2**63 - 1, -(2**63), 2**64 - 1, 1.5, float("-inf"), "tëxt", ""],
        "tuple": (torch.ones(2), (1, 2)),
        "int_keys": {3: "c", 1: "a", 20: "b"},
        "moments": Moments({"w": torch.ones(2)}, {"w": torch.zeros(2)}, torch.tensor(5)),
        "struct": WithStatic(torch.arange(3), name="kept"),
        "state": full_state(),
    }
    target = {**tree, "struct": WithStatic(torch.zeros(3, dtype=torch.int64), name="kept")}
    restored = from_bytes(to_bytes(tree), target=target)
    assert_trees_equal(restored, tree)
    assert type(restored["state"]) is TrainState and type(restored["state"].opt_state[0]) is Moments
    assert restored["struct"].name == "kept" and list(restored["int_keys"]) == [3, 1, 20]


def test_without_target_gives_plain_containers() -> None:
    plain = from_bytes(to_bytes({"m": Moments({}, {}, torch.tensor(1)), "t": (1, [2]), 7: None,
                                 "s": WithStatic(torch.ones(1))}))
    assert plain["m"] == {"count": plain["m"]["count"], "mu": {}, "nu": {}}
    assert plain["t"] == [1, [2]] and plain[7] is None and list(plain["s"]) == ["x"]
    assert type(plain["m"]["count"]) is torch.Tensor


def test_bytes_do_not_depend_on_dict_insertion_order_or_library_version(monkeypatch: pytest.MonkeyPatch) -> None:
    a = {"b": torch.ones(2), "a": {2: 1, 1: 2, "z": 0, "y": 1}}
    b = {"a": {"y": 1, "z": 0, 1: 2, 2: 1}, "b": torch.ones(2)}
    assert to_bytes(a) == to_bytes(b)
    data = to_bytes(a)
    monkeypatch.setattr(fmt, "_library_version", lambda: "999.0")
    other = to_bytes(a)
    assert other != data and other[HEADER_SIZE:] == data[HEADER_SIZE:]
    assert parse_header(other).library_version == "999.0"
    assert parse_header(data).digest == tree_digest(a) == tree_digest(b)


def test_digest_changes_with_any_bit() -> None:
    t = torch.zeros(4)
    flipped = t.clone()
    flipped.view(torch.int32)[2] ^= 1
    assert tree_digest({"t": t}) != tree_digest({"t": flipped})
    assert tree_digest({"t": torch.tensor(0.0)}) != tree_digest({"t": torch.tensor(-0.0)})
    assert tree_digest({"t": t}) != tree_digest({"t": t.double()})


DIGEST_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, sys.argv[1])
    from tests.test_checkpoint_format import full_state
    from functrain.checkpoint.format import tree_digest
    print(tree_digest(full_state()))
""")


def test_digest_is_equal_in_another_process() -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": root}
    out = subprocess.run([sys.executable, "-c", DIGEST_SCRIPT, root], capture_output=True, text=True, env=env,
                         check=True)
    assert out.stdout.strip() == tree_digest(full_state())


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 8, 60, 300, 20000], ids=str)
def test_arrays_are_byte_identical_to_flax_encoding(n: int) -> None:
    t = random_tensor((n,), torch.uint8)
    flax_style = msgpack.packb(
        {"t": msgpack.ExtType(1, msgpack.packb(((n,), "uint8", t.numpy().tobytes("C")), use_bin_type=True))},
        use_bin_type=True,
    )
    assert to_bytes({"t": t})[HEADER_SIZE:] == flax_style


def numpy_ext_hook(code: int, data: bytes) -> np.ndarray:
    shape, name, buf = msgpack.unpackb(data)
    return np.frombuffer(buf, dtype=np.dtype(name)).reshape(shape)


def test_body_is_readable_with_msgpack_and_numpy_alone() -> None:
    tree = {"f32": random_tensor((3, 2), torch.float32), "i64": torch.arange(5), "c": random_tensor((2,),
            torch.complex128), "u16": random_tensor((4,), torch.uint16), "b": torch.tensor([True, False]),
            "bf": torch.tensor([1.5, -2.0], dtype=torch.bfloat16), "n": 3}
    body = to_bytes(tree)[HEADER_SIZE:]
    bf = msgpack.unpackb(msgpack.unpackb(body)["bf"].data)
    assert bf[1] == "bfloat16"  # numpy cannot hold bfloat16: the name follows ml_dtypes/flax
    del tree["bf"]
    raw = msgpack.unpackb(msgpack.packb({k: v for k, v in msgpack.unpackb(body).items() if k != "bf"}),
                          ext_hook=numpy_ext_hook)
    for key, value in tree.items():
        if isinstance(value, torch.Tensor):
            np.testing.assert_array_equal(raw[key], value.numpy())
            assert raw[key].dtype == value.numpy().dtype
        else:
            assert raw[key] == value


def test_large_arrays_are_chunked_like_flax(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fmt, "MAX_CHUNK_BYTES", 64)  # flax's limit is 2**30; same layout
    t = random_tensor((5, 7), torch.float32)  # 140 bytes -> chunks of 16 floats: 16, 16, 3
    body = to_bytes({"t": t})[HEADER_SIZE:]
    raw = msgpack.unpackb(body, ext_hook=numpy_ext_hook)["t"]
    assert raw["__msgpack_chunked_array__"] is True and [len(c) for c in raw["chunks"].values()] == [16, 16, 3]
    flat = np.concatenate([raw["chunks"][str(i)] for i in range(len(raw["chunks"]))])  # flax's _unchunk
    np.testing.assert_array_equal(flat.reshape([raw["shape"][str(i)] for i in range(2)]), t.numpy())
    assert bits_equal(from_bytes(to_bytes({"t": t}), target={"t": torch.zeros(5, 7)})["t"], t)


def test_strict_restore_names_the_exact_path_of_each_mismatch() -> None:
    saved = {"params": {"encoder.0.weight": torch.zeros(64, 32), "b": torch.zeros(3), "extra": 1}, "n": 1}
    target = {"params": {"encoder.0.weight": torch.zeros(64, 16), "b": torch.zeros(3, dtype=torch.float16),
                         "gone": torch.zeros(1)}, "n": 1.0}
    with pytest.raises(TargetMismatchError) as err:
        from_bytes(to_bytes(saved), target=target)
    msg = str(err.value)
    assert "params/encoder.0.weight: shape (64, 32) in file, (64, 16) expected" in msg
    assert "params/b: dtype float32 in file, float16 expected" in msg
    assert "params/gone: missing in file" in msg and "params/extra: in file, not in the target" in msg
    assert "n: a int in file, a float expected" in msg


def test_non_strict_restore_keeps_target_values_and_reports_skips() -> None:
    saved = {"w": torch.ones(2), "head": torch.ones(5), "new_in_file": torch.ones(1)}
    target = {"w": torch.zeros(2), "head": torch.zeros(3), "only_target": torch.full((1,), 7.0)}
    with pytest.warns(PartialLoadWarning) as caught:
        out = from_bytes(to_bytes(saved), target=target, strict=False)
    report = caught[0].message.report
    assert report.missing == ["only_target"] and report.unexpected == ["new_in_file"]
    assert report.mismatched == ["head: shape (5,) in file, (3,) expected"]
    assert out["w"].tolist() == [1.0, 1.0] and out["head"].tolist() == [0.0] * 3 and out["only_target"].item() == 7


def test_unsupported_values_fail_naming_the_path() -> None:
    with pytest.raises(TypeError, match=r"a/0: a builtins.object cannot be saved"):
        to_bytes({"a": [object()]})
    with pytest.raises(TypeError, match=r"x: dict key True"):
        to_bytes({"x": {True: 1}})
    with pytest.raises(TypeError, match=r"big: .*cannot be saved"):
        to_bytes({"big": 2**64})


def reheader(body: bytes) -> bytes:
    """A file with a valid header (right size and checksum) around an arbitrary body."""
    import hashlib

    return fmt.pack_header(len(body), hashlib.sha256(body).digest()) + body


def flip(data: bytes, index: int) -> bytes:
    b = bytearray(data)
    b[index] ^= 0x10
    return bytes(b)


GOOD = to_bytes({"w": torch.arange(100.0), "step": 3})


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (GOOD[:-1], "truncated"),
        (GOOD[:HEADER_SIZE + 10], "truncated"),
        (GOOD[:50], "truncated"),
        (GOOD + b"\0", "trailing"),
        (flip(GOOD, HEADER_SIZE + 200), "checksum mismatch"),
        (flip(GOOD, 30), "corrupt header"),
        (b"", "empty"),
        (os.urandom(300), "not a functrain checkpoint"),
        (msgpack.packb({"a": 1}), "no functrain header"),
        (GOOD[HEADER_SIZE:], "no functrain header"),  # a bare flax-style msgpack body
        (pickle.dumps({"a": 1}, protocol=2), "pickle"),
        (reheader(b"\xc1"), "not a msgpack type"),
        (reheader(b"\xdd\xff\xff\xff\xff"), "runs past the end"),
        (reheader(b"\xc9\xff\xff\xff\xf0\x01"), "runs past the end"),
        (reheader(msgpack.packb(msgpack.ExtType(7, b"x"))), "extension type 7"),
        (reheader(msgpack.packb(msgpack.ExtType(1, msgpack.packb(((3,), "float32", b"abc"))))), "holds 3 bytes"),
        (reheader(msgpack.packb(msgpack.ExtType(1, msgpack.packb(((1,), "object", b"x"))))), "unknown array dtype"),
        (reheader(msgpack.packb({"a": 1}) + b"\x01"), "follow the end"),
        (reheader(b"\x91" * 1000 + b"\x90"), "nesting deeper"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_bad_bytes_fail_with_a_clear_checkpoint_error(data: bytes, reason: str) -> None:
    with pytest.raises(CheckpointError, match=reason):
        from_bytes(data)


def test_torch_save_files_are_refused_without_unpickling() -> None:
    for legacy in (False, True):
        buf = io.BytesIO()
        torch.save({"w": torch.ones(2)}, buf, _use_new_zipfile_serialization=not legacy)
        with pytest.raises(CheckpointError, match="never unpickles"):
            from_bytes(buf.getvalue())


def test_decode_msgpack_reads_bare_flax_style_bytes() -> None:
    tree = {"w": torch.arange(4.0), "k": [1, "a"]}
    assert_trees_equal(fmt.decode_msgpack(to_bytes(tree)[HEADER_SIZE:]), {"k": [1, "a"], "w": torch.arange(4.0)})
