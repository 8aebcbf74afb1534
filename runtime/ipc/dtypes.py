"""KServe v2 datatype table and the BYTES wire codec, shared by the front and the worker.

The wire strings (``FP32``...) are what ModelMetadata and ModelInfer use; the ``TYPE_*`` names are
Triton's model-config enum; ONNX element types are onnxruntime's ``tensor(float)`` strings.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

__all__ = [
    "DTYPES",
    "BytesDecodeError",
    "DType",
    "check_bytes_tensor",
    "decode_bytes_tensor",
    "encode_bytes_tensor",
]


@dataclass(frozen=True, slots=True)
class DType:
    wire: str  # KServe v2 datatype string
    config: str  # Triton model-config enum name
    onnx: str  # onnxruntime type string
    itemsize: int  # bytes per element on the wire; 0 = variable (BYTES)
    numpy: str  # numpy dtype string ("object" for BYTES)
    contents_field: str | None  # InferTensorContents field, None = raw only


DTYPES: dict[str, DType] = {
    d.wire: d
    for d in (
        DType("BOOL", "TYPE_BOOL", "tensor(bool)", 1, "bool", "bool_contents"),
        DType("UINT8", "TYPE_UINT8", "tensor(uint8)", 1, "uint8", "uint_contents"),
        DType("UINT16", "TYPE_UINT16", "tensor(uint16)", 2, "uint16", "uint_contents"),
        DType("UINT32", "TYPE_UINT32", "tensor(uint32)", 4, "uint32", "uint_contents"),
        DType("UINT64", "TYPE_UINT64", "tensor(uint64)", 8, "uint64", "uint64_contents"),
        DType("INT8", "TYPE_INT8", "tensor(int8)", 1, "int8", "int_contents"),
        DType("INT16", "TYPE_INT16", "tensor(int16)", 2, "int16", "int_contents"),
        DType("INT32", "TYPE_INT32", "tensor(int32)", 4, "int32", "int_contents"),
        DType("INT64", "TYPE_INT64", "tensor(int64)", 8, "int64", "int64_contents"),
        DType("FP16", "TYPE_FP16", "tensor(float16)", 2, "float16", None),
        DType("FP32", "TYPE_FP32", "tensor(float)", 4, "float32", "fp32_contents"),
        DType("FP64", "TYPE_FP64", "tensor(double)", 8, "float64", "fp64_contents"),
        DType("BYTES", "TYPE_STRING", "tensor(string)", 0, "object", "bytes_contents"),
    )
}
BY_ONNX: dict[str, DType] = {d.onnx: d for d in DTYPES.values()}
BY_CONFIG: dict[str, DType] = {d.config: d for d in DTYPES.values()}

_LEN = struct.Struct("<I")


class BytesDecodeError(ValueError):
    """A BYTES payload is not a well-formed sequence of 4-byte-length-prefixed elements."""


def decode_bytes_tensor(buf: bytes | memoryview, count: int) -> list[bytes]:
    """Split a KServe BYTES payload into exactly ``count`` elements, or raise BytesDecodeError."""
    view = memoryview(buf)
    out: list[bytes] = []
    pos, end = 0, len(view)
    while pos < end:
        if end - pos < 4:
            raise BytesDecodeError(f"truncated length prefix at byte {pos}")
        (n,) = _LEN.unpack_from(view, pos)
        pos += 4
        if n > end - pos:
            raise BytesDecodeError(f"element {len(out)} claims {n} bytes but {end - pos} remain")
        out.append(bytes(view[pos : pos + n]))
        pos += n
    if len(out) != count:
        raise BytesDecodeError(f"holds {len(out)} elements but the shape needs {count}")
    return out


# check_bytes_tensor walks the length prefixes of tensors of at most this many elements.
BYTES_WALKED_UP_TO = 65536


def check_bytes_tensor(
    buf: bytes | memoryview, count: int, walk_up_to: int = BYTES_WALKED_UP_TO
) -> None:
    """decode_bytes_tensor's checks, or BytesDecodeError, without building the elements; the
    length prefixes are walked only for tensors of at most `walk_up_to` elements (a larger one
    gets the size check alone). The front's event loop checks each request's BYTES inputs: a
    tensor of millions of elements walked there held every other request up for seconds (the
    worker decodes, and so checks, every tensor anyway)."""
    end = len(buf)
    if count > walk_up_to:
        if end < 4 * count:
            raise BytesDecodeError(f"{end} bytes cannot hold the {count} elements the shape needs")
        return
    view = memoryview(buf)
    unpack = _LEN.unpack_from
    pos = k = 0
    while pos < end:
        if end - pos < 4:
            raise BytesDecodeError(f"truncated length prefix at byte {pos}")
        (n,) = unpack(view, pos)
        pos += 4
        if n > end - pos:
            raise BytesDecodeError(f"element {k} claims {n} bytes but {end - pos} remain")
        pos += n
        k += 1
    if k != count:
        raise BytesDecodeError(f"holds {k} elements but the shape needs {count}")


def encode_bytes_tensor(items: list[bytes]) -> bytes:
    """Serialize elements as KServe BYTES: each a little-endian uint32 length, then the bytes."""
    parts: list[bytes] = []
    for item in items:
        parts.append(_LEN.pack(len(item)))
        parts.append(item)
    return b"".join(parts)


def numpy_dtype(wire: str) -> np.dtype[np.generic]:
    return np.dtype(DTYPES[wire].numpy)
