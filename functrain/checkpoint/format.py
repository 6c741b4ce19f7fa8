"""The checkpoint wire format: a fixed 128-byte header, then one canonical msgpack body.

The body is plain msgpack that ``flax.serialization.msgpack_restore`` and numpy can read:
tensors are msgpack ext type 1 holding ``msgpack((shape, dtype_name, C-order bytes))``,
arrays over ``MAX_CHUNK_BYTES`` are split the way flax splits them, and dict keys are
written in canonical order, so the same tree always gives the same bytes. The header
holds a magic, the format version, the library version, the body size and the sha256 of
the body; :func:`tree_digest` is that sha256, so it never depends on the library version.
The full byte layout is in ``docs/checkpoints.md``.

Bodies are encoded and decoded as streams: :func:`encode` hands the writer each array's
bytes straight from the tensor's memory, and :class:`Decoder` reads each array into its
own buffer, so no step holds a second copy of the whole state.

Example:
    >>> import torch
    >>> from functrain.checkpoint.format import to_bytes, from_bytes, tree_digest
    >>> state = {"w": torch.arange(3.0), "step": 7}
    >>> data = to_bytes(state)
    >>> from_bytes(data, target=state)["w"].tolist()
    [0.0, 1.0, 2.0]
    >>> tree_digest(state) == tree_digest(from_bytes(data))
    True
"""

from __future__ import annotations

import hashlib
import io
import math
import struct as _struct
import sys
import warnings
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

import msgpack
import torch

from functrain.checkpoint.errors import CheckpointError, PartialLoadWarning
from functrain.checkpoint.tree import CHUNKED_ARRAY_KEY, format_path, node_of, restore_into

__all__ = [
    "MAGIC", "FORMAT_VERSION", "HEADER_SIZE", "MAX_CHUNK_BYTES", "Header", "ArrayInfo", "HashingWriter",
    "encode", "pack_header", "parse_header", "Decoder", "to_bytes", "from_bytes", "tree_digest",
    "decode_msgpack", "tensor_bytes", "DTYPES",
]

MAGIC = b"\x89FTCKPT\n"
FORMAT_VERSION = 1
HEADER_SIZE = 128
MAX_CHUNK_BYTES = 2**30
"""Arrays of more bytes than this are written as flax-style chunked maps (flax's MAX_CHUNK_SIZE)."""

ARRAY_EXT = 1
_MAX_DEPTH = 256
_COPY_BLOCK = 16 << 20

DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float64, torch.float32, torch.float16, torch.bfloat16,
        torch.int8, torch.int16, torch.int32, torch.int64,
        torch.uint8, torch.uint16, torch.uint32, torch.uint64,
        torch.bool, torch.complex64, torch.complex128,
        torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz,
    )
}
"""Wire dtype name -> torch dtype: numpy's names, and ml_dtypes' for bfloat16 and float8."""
_NAME_OF = {d: n for n, d in DTYPES.items()}

if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
    raise ImportError("functrain checkpoints are little-endian; this host is big-endian")


def _library_version() -> str:
    return getattr(sys.modules.get("functrain"), "__version__", None) or "0+unknown"


# ----------------------------------------------------------------------------- header


class Header(NamedTuple):
    """The fixed-size header of a checkpoint file (see ``docs/checkpoints.md``)."""

    format_version: int
    library_version: str
    body_size: int
    digest: str  # hex sha256 of the body == tree_digest of the tree


_LAYOUT = _struct.Struct("<8sIIQ32s32s36x")  # magic, version, header size, body size, sha256, library version
assert _LAYOUT.size == HEADER_SIZE - 4  # the last 4 bytes: crc32 of the first 124


def pack_header(body_size: int, body_sha256: bytes, library_version: str | None = None) -> bytes:
    """The 128 header bytes for a body of ``body_size`` bytes with the given sha256."""
    version = (library_version or _library_version()).encode("ascii", "replace")[:32]
    head = _LAYOUT.pack(MAGIC, FORMAT_VERSION, HEADER_SIZE, body_size, body_sha256, version)
    return head + _struct.pack("<I", zlib.crc32(head))


def _sniff(prefix: bytes) -> str:
    if not prefix:
        return "the file is empty"
    if prefix.startswith(b"PK\x03\x04"):
        return ("it is a zip archive, as torch.save writes (with a pickle inside); functrain never unpickles. "
                "Load it in trusted code with torch.load(path, weights_only=True) and save it with functrain.save")
    if prefix[0] == 0x80 and len(prefix) > 1 and 2 <= prefix[1] <= 5:
        return ("it is a pickle stream (torch.save's legacy format or pickle.dump); functrain never unpickles. "
                "Load it in trusted code with torch.load(path, weights_only=True) and save it with functrain.save")
    return ("it has no functrain header (magic bytes missing); if it is a bare msgpack file such as "
            "flax.serialization.to_bytes writes, read it with functrain.checkpoint.decode_msgpack")


def parse_header(data: bytes, source: str = "checkpoint") -> Header:
    """Validate and parse the first ``HEADER_SIZE`` bytes of a file; raise :class:`CheckpointError`."""
    data = bytes(data[:HEADER_SIZE])
    if len(data) < HEADER_SIZE or not data.startswith(MAGIC):
        if data.startswith(MAGIC):
            raise CheckpointError(f"{source}: truncated: the file ends inside its {HEADER_SIZE}-byte header")
        raise CheckpointError(f"{source}: not a functrain checkpoint: {_sniff(data[:16])}")
    head = data
    magic, version, header_size, body_size, sha, lib = _LAYOUT.unpack(head[:-4])
    (crc,) = _struct.unpack("<I", head[-4:])
    if zlib.crc32(head[:-4]) != crc:
        raise CheckpointError(f"{source}: corrupt header (its crc32 does not match); the file is damaged")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{source}: written in checkpoint format version {version}, this functrain reads up to "
            f"{FORMAT_VERSION}; upgrade functrain"
        )
    if header_size != HEADER_SIZE:
        raise CheckpointError(f"{source}: corrupt header (header size {header_size}, expected {HEADER_SIZE})")
    return Header(version, lib.rstrip(b"\0").decode("ascii", "replace"), body_size, sha.hex())


# ----------------------------------------------------------------------------- encoding


class HashingWriter:
    """Passes bytes to ``write`` while counting them and hashing them with sha256."""

    def __init__(self, write: Callable[[Any], Any]):
        self._write = write
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: Any) -> None:
        self.sha256.update(data)
        self.size += len(data) if isinstance(data, bytes) else memoryview(data).nbytes
        self._write(data)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The C-order bytes of ``t`` as a flat memoryview, from a host copy when ``t`` is not on the CPU.

    One copy at most (device -> host, or strided -> contiguous); none for a contiguous CPU tensor.
    """
    t = t.detach()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    t = t.to("cpu", memory_format=torch.contiguous_format) if t.device.type != "cpu" else t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _exact(x: Any) -> Any:
    """``x`` as an exact None/bool/int/float/str (an IntEnum becomes its int), so bytes depend on value only."""
    for kind in (bool, int, float, str):
        if isinstance(x, kind):
            return kind(x) if type(x) is not kind else x
    return x


def _ext_header(code: int, n: int) -> bytes:
    fixed = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}
    if n in fixed:
        return bytes((fixed[n], code))
    if n < 1 << 8:
        return _struct.pack(">BBb", 0xC7, n, code)
    if n < 1 << 16:
        return _struct.pack(">BHb", 0xC8, n, code)
    return _struct.pack(">BIb", 0xC9, n, code)


def _bin_header(n: int) -> bytes:
    if n < 1 << 8:
        return _struct.pack(">BB", 0xC4, n)
    if n < 1 << 16:
        return _struct.pack(">BH", 0xC5, n)
    return _struct.pack(">BI", 0xC6, n)


class _Encoder:
    def __init__(self, write: Callable[[Any], Any]):
        self.write = write
        self.packer = msgpack.Packer(use_bin_type=True, use_single_float=False, strict_types=True)

    def value(self, x: Any, path: tuple[Any, ...]) -> None:
        kind, content = node_of(x, path)
        if kind == "scalar":
            try:
                self.write(self.packer.pack(_exact(content)))
            except (OverflowError, ValueError) as e:
                raise TypeError(f"{format_path(path)}: {content!r} cannot be saved: {e}") from None
        elif kind == "seq":
            self.write(self.packer.pack_array_header(len(content)))
            for i, item in enumerate(content):
                self.value(item, path + (i,))
        elif kind == "map":
            self.write(self.packer.pack_map_header(len(content)))
            for key, item in content:
                self.write(self.packer.pack(_exact(key)))
                self.value(item, path + (key,))
        else:
            self.tensor(content, path)

    def tensor(self, t: torch.Tensor, path: tuple[Any, ...]) -> None:
        name = _NAME_OF.get(t.dtype)
        if name is None or t.layout != torch.strided or t.device.type == "meta":
            raise TypeError(
                f"{format_path(path)}: a {t.dtype} tensor with layout {t.layout} on {t.device} cannot be saved; "
                f"checkpoints hold dense tensors with data of dtype {', '.join(DTYPES)}"
            )
        shape = tuple(t.shape)
        nbytes = t.numel() * t.element_size()
        if nbytes > MAX_CHUNK_BYTES:
            self.chunked(t, name, shape)
        else:
            self.array(tensor_bytes(t), name, shape)

    def array(self, data: memoryview, name: str, shape: tuple[int, ...]) -> None:
        head = (self.packer.pack_array_header(3) + self.packer.pack(list(shape)) + self.packer.pack(name)
                + _bin_header(data.nbytes))
        self.write(_ext_header(ARRAY_EXT, len(head) + data.nbytes) + head)
        if data.nbytes:
            self.write(data)

    def chunked(self, t: torch.Tensor, name: str, shape: tuple[int, ...]) -> None:
        # flax's layout: {"__msgpack_chunked_array__": True, "chunks": {"0": flat, ...}, "shape": {"0": d0, ...}}
        per_chunk = max(1, MAX_CHUNK_BYTES // t.element_size())
        flat = t.detach().reshape(-1)
        starts = range(0, flat.numel(), per_chunk)
        pack = self.packer.pack
        self.write(self.packer.pack_map_header(3) + pack(CHUNKED_ARRAY_KEY) + pack(True) + pack("chunks"))
        self.write(self.packer.pack_map_header(len(starts)))
        for i, start in enumerate(starts):
            piece = flat[start:start + per_chunk]
            self.write(pack(str(i)))
            self.array(tensor_bytes(piece), name, (piece.numel(),))
        self.write(pack("shape") + self.packer.pack_map_header(len(shape)))
        for i, d in enumerate(shape):
            self.write(pack(str(i)) + pack(d))


def encode(tree: Any, write: Callable[[Any], Any]) -> None:
    """Stream the canonical msgpack body of ``tree`` to ``write`` (called with bytes or memoryviews)."""
    _Encoder(write).value(tree, ())


def to_bytes(tree: Any) -> bytes:
    """The checkpoint bytes (header and body) of ``tree``; the same tree always gives the same bytes."""
    body = io.BytesIO()
    sink = HashingWriter(body.write)
    encode(tree, sink.write)
    return pack_header(sink.size, sink.sha256.digest()) + body.getbuffer()


def tree_digest(tree: Any) -> str:
    """Hex sha256 of the canonical body bytes of ``tree``: equal digests mean bitwise-equal trees.

    It equals the digest in the header of a file saved from the tree, and never depends on
    the library version. Computed without building the body in memory.
    """
    sink = HashingWriter(lambda _: None)
    encode(tree, sink.write)
    return sink.sha256.hexdigest()


# ----------------------------------------------------------------------------- decoding


class ArrayInfo(NamedTuple):
    """An array's description without its data (what ``Decoder(arrays="info")`` returns)."""

    shape: tuple[int, ...]
    dtype: str
    nbytes: int


class Decoder:
    """Decodes one msgpack body from a binary stream, safely: never runs code, checks every length.

    ``size`` is the number of body bytes (no length in the file may exceed what is left);
    ``arrays="load"`` gives tensors, ``"info"`` gives :class:`ArrayInfo` (skipping data);
    ``hash=True`` hashes every byte so :meth:`check_digest` can compare with the header;
    ``keep_small``: in ``"info"`` mode, arrays of at most this many bytes are loaded anyway.
    """

    def __init__(self, stream: Any, size: int, source: str, *, arrays: str = "load", hash: bool = True,
                 keep_small: int = 0):
        self.keep_small = keep_small
        self.stream = stream
        self.left = size
        self.size = size
        self.source = source
        self.arrays = arrays
        self.sha256 = hashlib.sha256() if hash else None

    # -- raw reads
    def fail(self, reason: str) -> CheckpointError:
        at = self.size - self.left
        return CheckpointError(f"{self.source}: corrupt or truncated checkpoint body at byte {at}: {reason}")

    def need(self, n: int) -> None:
        if n > self.left:
            raise self.fail(f"a length of {n} bytes runs past the end of the body ({self.left} bytes left)")

    def read(self, n: int) -> bytes:
        self.need(n)
        data = self.stream.read(n)
        if len(data) != n:
            raise self.fail("the file ended early")
        self.left -= n
        if self.sha256 is not None:
            self.sha256.update(data)
        return data

    def read_tensor(self, n: int) -> torch.Tensor:
        """The next ``n`` bytes, read straight into a new uint8 tensor (no zero-fill, no extra copy)."""
        self.need(n)
        buf = torch.empty(n, dtype=torch.uint8)
        view, got = memoryview(buf.numpy()), 0
        while got < n:
            k = self.stream.readinto(view[got:])
            if not k:
                raise self.fail("the file ended early")
            got += k
        self.left -= n
        if self.sha256 is not None:
            self.sha256.update(view)
        return buf

    def skip(self, n: int) -> None:
        if self.sha256 is None and self.stream.seekable():
            self.need(n)
            self.stream.seek(n, io.SEEK_CUR)
            self.left -= n
            return
        while n:
            k = min(n, _COPY_BLOCK)
            self.read(k)
            n -= k

    def unpack(self, fmt: str) -> Any:
        return _struct.unpack(fmt, self.read(_struct.calcsize(fmt)))[0]

    # -- values
    def value(self, depth: int = 0) -> Any:
        if depth > _MAX_DEPTH:
            raise self.fail(f"nesting deeper than {_MAX_DEPTH} levels")
        b = self.read(1)[0]
        if b <= 0x7F:
            return b
        if b >= 0xE0:
            return b - 0x100
        if 0x80 <= b <= 0x8F:
            return self.map(b & 0x0F, depth)
        if 0x90 <= b <= 0x9F:
            return self.list(b & 0x0F, depth)
        if 0xA0 <= b <= 0xBF:
            return self.str(b & 0x1F)
        simple = {0xC0: None, 0xC2: False, 0xC3: True}
        if b in simple:
            return simple[b]
        sized = {0xC4: ">B", 0xC5: ">H", 0xC6: ">I", 0xC7: ">B", 0xC8: ">H", 0xC9: ">I", 0xD9: ">B", 0xDA: ">H",
                 0xDB: ">I", 0xDC: ">H", 0xDD: ">I", 0xDE: ">H", 0xDF: ">I"}
        numbers = {0xCA: ">f", 0xCB: ">d", 0xCC: ">B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q",
                   0xD0: ">b", 0xD1: ">h", 0xD2: ">i", 0xD3: ">q"}
        if b in numbers:
            return self.unpack(numbers[b])
        if 0xD4 <= b <= 0xD8:
            return self.ext(1 << (b - 0xD4))
        if b not in sized:
            raise self.fail(f"byte 0x{b:02x} is not a msgpack type")
        n = self.unpack(sized[b])
        if b <= 0xC6:
            return self.read(n)
        if b <= 0xC9:
            return self.ext(n)
        if b <= 0xDB:
            return self.str(n)
        if b <= 0xDD:
            return self.list(n, depth)
        return self.map(n, depth)

    def str(self, n: int) -> str:
        try:
            return self.read(n).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail("a string is not valid UTF-8") from None

    def list(self, n: int, depth: int) -> list[Any]:
        self.need(n)  # every element takes at least one byte
        return [self.value(depth + 1) for _ in range(n)]

    def map(self, n: int, depth: int) -> Any:
        self.need(2 * n)
        out: dict[Any, Any] = {}
        for _ in range(n):
            key = self.value(depth + 1)
            if isinstance(key, bool) or not isinstance(key, (str, int)):
                raise self.fail(f"a map key is a {type(key).__name__}; checkpoint keys are str or int")
            if key in out:
                raise self.fail(f"the map key {key!r} appears twice")
            out[key] = self.value(depth + 1)
        if out.get(CHUNKED_ARRAY_KEY) is True:
            return self.unchunk(out)
        return out

    def ext(self, n: int) -> Any:
        code = _struct.unpack(">b", self.read(1))[0]
        if code != ARRAY_EXT:
            raise self.fail(f"msgpack extension type {code} is not an array (type {ARRAY_EXT}); not a functrain tree")
        end = self.left - n
        if self.read(1) != b"\x93":
            raise self.fail("an array is not (shape, dtype, bytes)")
        shape, name = self.value(_MAX_DEPTH - 1), self.value(_MAX_DEPTH)
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise self.fail(f"an array shape is {shape!r}, not a list of sizes")
        if name not in DTYPES:
            raise self.fail(f"unknown array dtype {name!r}; known: {', '.join(DTYPES)}")
        tag = self.read(1)[0]
        if tag not in (0xC4, 0xC5, 0xC6):
            raise self.fail("array data is not msgpack bin")
        nbytes = self.unpack({0xC4: ">B", 0xC5: ">H", 0xC6: ">I"}[tag])
        dtype = DTYPES[name]
        expected = math.prod(shape) * dtype.itemsize
        if nbytes != expected or self.left - nbytes != end:
            raise self.fail(f"an array of shape {tuple(shape)} and dtype {name} holds {nbytes} bytes, not {expected}")
        if self.arrays == "info" and nbytes > self.keep_small:
            self.skip(nbytes)
            return ArrayInfo(tuple(shape), name, nbytes)
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        return self.read_tensor(nbytes).view(dtype).reshape(shape)

    def unchunk(self, m: dict[Any, Any]) -> Any:
        chunks, shape = m.get("chunks"), m.get("shape")
        if set(m) != {CHUNKED_ARRAY_KEY, "chunks", "shape"} or not isinstance(chunks, dict) or not isinstance(
                shape, dict):
            raise self.fail("a chunked array map is not {__msgpack_chunked_array__, chunks, shape}")
        try:
            dims = tuple(shape[str(i)] for i in range(len(shape)))
            parts = [chunks[str(i)] for i in range(len(chunks))]
        except KeyError:
            raise self.fail("a chunked array's keys are not 0..n-1") from None
        if self.arrays == "info":
            parts = [p if isinstance(p, ArrayInfo) else ArrayInfo(tuple(p.shape), _NAME_OF[p.dtype], p.nbytes)
                     for p in parts]
            if not parts or len({p.dtype for p in parts}) != 1:
                raise self.fail("a chunked array has no chunks or mixed dtypes")
            return ArrayInfo(dims, parts[0].dtype, sum(p.nbytes for p in parts))
        if not all(isinstance(p, torch.Tensor) and p.dim() == 1 for p in parts) or len({p.dtype for p in parts}) != 1:
            raise self.fail("a chunked array's chunks are not flat arrays of one dtype")
        flat = torch.cat(parts)
        if flat.numel() != math.prod(dims):
            raise self.fail(f"a chunked array has {flat.numel()} elements, its shape {dims} needs {math.prod(dims)}")
        return flat.reshape(dims)

    def body(self) -> Any:
        """Decode the whole body; the bytes must end exactly where the value does."""
        try:
            tree = self.value()
        except RecursionError:
            raise self.fail("nesting too deep") from None
        if self.left:
            raise self.fail(f"{self.left} bytes follow the end of the tree")
        return tree

    def check_digest(self, expected_hex: str) -> None:
        if self.sha256 is None or self.sha256.hexdigest() != expected_hex:
            raise CheckpointError(
                f"{self.source}: checksum mismatch: the body's sha256 is not the one in the header; "
                "the file is corrupt (bit flip, partial copy); use another checkpoint"
            )


def decode_file_body(stream: Any, header: Header, source: str, arrays: str = "load", keep_small: int = 0) -> Any:
    """Decode and checksum the body that follows ``header`` in ``stream``."""
    decoder = Decoder(stream, header.body_size, source, arrays=arrays, hash=True, keep_small=keep_small)
    try:
        tree = decoder.body()
    except CheckpointError as e:
        try:  # a checksum mismatch is the root cause to report if there is one
            decoder.skip(decoder.left)
            decoder.check_digest(header.digest)
        except CheckpointError as corrupt:
            raise CheckpointError(f"{corrupt} (decoding stopped: {e})") from e
        raise
    decoder.check_digest(header.digest)
    return tree


def finish_restore(plain: Any, target: Any, strict: bool, source: str) -> Any:
    """Restore ``plain`` into ``target`` (if any); warn with a :class:`PartialLoadWarning` if non-strict skipped."""
    if target is None:
        return plain
    tree, report = restore_into(target, plain, strict=strict, source=source)
    if report:
        warnings.warn(PartialLoadWarning(f"{source}: partial load: {report.describe()}", report), stacklevel=3)
    return tree


def from_bytes(data: bytes | bytearray | memoryview, target: Any = None, strict: bool = True) -> Any:
    """The tree in ``data`` (bytes from :func:`to_bytes`), as plain containers or as ``target``'s types.

    Without a target: dicts, lists, tensors and Python scalars. With a target: a tree of the
    target's types; ``strict`` checks keys, shapes and dtypes (:class:`TargetMismatchError`
    naming each path); ``strict=False`` keeps the target's value wherever the file has none
    usable and warns with a :class:`PartialLoadWarning` whose ``.report`` lists the paths.
    """
    view = memoryview(data).cast("B")
    header = parse_header(view[:HEADER_SIZE], "bytes")
    if len(view) != HEADER_SIZE + header.body_size:
        raise CheckpointError(
            f"bytes: {len(view) - HEADER_SIZE} body bytes, the header says {header.body_size}; the data is truncated "
            "or has trailing garbage"
        )
    plain = decode_file_body(io.BytesIO(view[HEADER_SIZE:]), header, "bytes")
    return finish_restore(plain, target, strict, "bytes")


def decode_msgpack(data: bytes | bytearray | memoryview, source: str = "msgpack") -> Any:
    """Decode bare msgpack with flax-style arrays (e.g. ``flax.serialization.to_bytes`` output), no header.

    Safe like every functrain reader, but there is no checksum to verify.
    """
    view = memoryview(data).cast("B")
    return Decoder(io.BytesIO(view), len(view), source, hash=False).body()
