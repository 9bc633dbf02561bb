"""CTranslate2 ``model.bin`` files read with plain numpy (no ``ctranslate2`` dependency).

CTranslate2 binary layout (little endian), as found in spec-version-6 files::

    uint32 binary_version
    uint16 length + bytes   spec name (NUL terminated, e.g. "WhisperSpec")
    uint32 spec_revision
    uint32 num_variables
      uint16 length + bytes name (NUL terminated)
      uint8  rank, then rank x uint32 dims
      uint8  dtype id, uint32 num_bytes, then the raw data (no padding)
    uint32 num_aliases
      string alias, string target
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

SUPPORTED_BINARY_VERSIONS = (6,)

# CTranslate2 DataType enum ids. bfloat16 has no numpy dtype; it is widened to float32 when read.
_CT2_DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
    5: np.dtype("<u2"),
}
_CT2_BFLOAT16 = 5


class _Reader:
    """Cursor over the bytes of a CTranslate2 file."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0

    def unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from("<" + fmt, self.data, self.offset)
        self.offset += struct.calcsize("<" + fmt)
        return values

    def string(self) -> str:
        (length,) = self.unpack("H")
        raw = self.data[self.offset : self.offset + length]
        self.offset += length
        return raw.rstrip(b"\0").decode("utf-8")

    def take(self, num_bytes: int) -> memoryview:
        if self.offset + num_bytes > len(self.data):
            raise ValueError("CTranslate2 file is truncated")
        view = memoryview(self.data)[self.offset : self.offset + num_bytes]
        self.offset += num_bytes
        return view


def _read_header(reader: _Reader, path: Path) -> tuple[int, str, int]:
    (version,) = reader.unpack("I")
    if version not in SUPPORTED_BINARY_VERSIONS:
        raise ValueError(
            f"{path}: CTranslate2 binary version {version} is not supported (known: {SUPPORTED_BINARY_VERSIONS})"
        )
    spec_name = reader.string()
    (revision,) = reader.unpack("I")
    return version, spec_name, revision


def read_ctranslate2_header(path: str | Path) -> tuple[int, str, int]:
    """Return ``(binary_version, spec_name, spec_revision)`` of a CTranslate2 ``model.bin`` without loading weights."""
    path = Path(path)
    with path.open("rb") as handle:
        head = handle.read(4096)  # the spec name is short, so the header always fits here
    return _read_header(_Reader(head), path)


def read_ctranslate2_model(path: str | Path) -> dict[str, np.ndarray]:
    """Parse a CTranslate2 ``model.bin`` into ``{variable name: array}``.

    Arrays keep the stored dtype (float16 stays float16), except bfloat16 which is widened to float32. Scalars
    (attributes such as ``decoder/num_heads``) come back as 0-d arrays. Aliases (for example a projection tied to the
    embeddings) map to the same array object as their target.
    """
    path = Path(path)
    reader = _Reader(path.read_bytes())
    _read_header(reader, path)
    (num_variables,) = reader.unpack("I")
    variables: dict[str, np.ndarray] = {}
    for _ in range(num_variables):
        name = reader.string()
        (rank,) = reader.unpack("B")
        shape = reader.unpack(f"{rank}I") if rank else ()
        dtype_id, num_bytes = reader.unpack("BI")
        if dtype_id not in _CT2_DTYPES:
            raise ValueError(f"{path}: variable {name!r} has unknown dtype id {dtype_id}")
        dtype = _CT2_DTYPES[dtype_id]
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if num_bytes != expected:
            raise ValueError(f"{path}: variable {name!r} holds {num_bytes} bytes, shape {shape} needs {expected}")
        # Copy so the arrays do not pin the whole file buffer in memory.
        array = np.frombuffer(reader.take(num_bytes), dtype=dtype).reshape(shape).copy()
        if dtype_id == _CT2_BFLOAT16:
            array = (array.astype(np.uint32) << 16).view(np.float32)
        variables[name] = array
    (num_aliases,) = reader.unpack("I")
    for _ in range(num_aliases):
        alias, target = reader.string(), reader.string()
        variables[alias] = variables[target]
    if reader.offset != len(reader.data):
        raise ValueError(f"{path}: {len(reader.data) - reader.offset} unexpected trailing bytes")
    return variables
