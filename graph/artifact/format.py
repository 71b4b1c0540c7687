"""The container: a fixed prefix, a zlib-compressed JSON header, a safetensors payload.

File layout (all integers little-endian)::

    offset  size  field
    0       8     magic  b"\\x89FXPRESS"  (the high byte catches 7-bit and text-mode damage)
    8       4     u32 format version (1)
    12      4     u32 flags: bit 0 = header is zlib-compressed (always set by this version)
    16      8     u64 header length H (as stored)
    24      32    sha256 of the H stored header bytes
    56      H     header: UTF-8 JSON (graph, module tree, tensor table, metadata), zlib
    56+H    P     payload: a standard safetensors blob holding every stream

This module packs and unpacks the prefix and the header and computes the checksums; what
the header may say is :mod:`.schema`'s business.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from fxpress.errors import ArtifactError, ArtifactFormatError, ArtifactIntegrityError
from fxpress.graph.artifact.header_dict import HEADER_ZDICT

MAGIC = b"\x89FXPRESS"
VERSION = 1
_PREFIX = struct.Struct("<8sIIQ32s")
_FLAG_ZLIB_HEADER = 1
#: The header is zlib-compressed from the preset dictionary of graph/artifact/header_dict.py (what
#: save writes; flag 1 alone is what fxpress wrote before, and still loads).
_FLAG_ZDICT_HEADER = 2
#: Streams smaller than BLOB_STREAM_BYTES share one safetensors tensor, BLOB_KEY, in the
#: order of the header's tensor table (see _unblob): safetensors' own JSON index costs
#: ~65 bytes a tensor, most of a small stream's worth.
_FLAG_BLOB_STREAMS = 4
_KNOWN_FLAGS = _FLAG_ZLIB_HEADER | _FLAG_ZDICT_HEADER | _FLAG_BLOB_STREAMS
BLOB_KEY = "blob"
BLOB_STREAM_BYTES = 1 << 16
PREFIX_SIZE = _PREFIX.size  # 56
#: A header larger than this is refused before it is read.
MAX_HEADER_BYTES = 256 << 20
#: Decoded tensors may total at most max(this, EXPANSION x file size) unless load() is told more.
MIN_DECODED_LIMIT = 1 << 30
EXPANSION_LIMIT = 10_000


def _sha(data: bytes | memoryview | np.ndarray) -> str:
    if isinstance(data, np.ndarray):
        data = np.ascontiguousarray(data).view(np.uint8).reshape(-1).data
    return hashlib.sha256(data).hexdigest()


def _sha64(data) -> str:
    """The first 64 bits of a sha256, for streams and tensors: the full sha256 of the header
    (in the prefix) and of the payload (in the header) already guard the whole file; these
    name the damaged tensor and cost 16 characters each instead of 64, which matters in
    small artifacts."""
    return _sha(data)[:16]


def _pack_header(header: dict) -> bytes:
    """Prefix + header. The header is zlib-compressed from a preset dictionary of typical
    header text (flags 1 and 2; see graph/artifact/header_dict.py): its JSON is repetitive, and on
    small models it would otherwise outweigh the tensors."""
    z = zlib.compressobj(9, zdict=HEADER_ZDICT)
    head = z.compress(json.dumps(header, separators=(",", ":"), allow_nan=False).encode()) + z.flush()
    flags = _FLAG_ZLIB_HEADER | _FLAG_ZDICT_HEADER | (_FLAG_BLOB_STREAMS if "blob" in header else 0)
    prefix = _PREFIX.pack(MAGIC, VERSION, flags, len(head), hashlib.sha256(head).digest())
    return prefix + head


def pack_artifact(header: dict, payload: bytes) -> bytes:
    """Prefix + header + payload (the header's "payload" entry must describe ``payload``)."""
    return _pack_header(header) + payload


def _split_prefix(data: bytes | memoryview, where: str, file_size: int | None = None
                  ) -> tuple[dict, memoryview, bytes]:
    view = memoryview(data)
    file_size = len(view) if file_size is None else file_size
    if len(view) < PREFIX_SIZE:
        raise ArtifactFormatError(f"{where}: {len(view)} bytes is too short for an fxpress "
                                  "artifact (truncated?)")
    magic, version, flags, hlen, hsha = _PREFIX.unpack(view[:PREFIX_SIZE])
    if magic != MAGIC:
        raise ArtifactFormatError(f"{where}: not an fxpress artifact (bad magic bytes)")
    if version != VERSION:
        raise ArtifactFormatError(f"{where}: format version {version}; this fxpress reads version "
                                  f"{VERSION}. Upgrade fxpress or save the model again.")
    if hlen > MAX_HEADER_BYTES or PREFIX_SIZE + hlen > len(view):
        raise ArtifactFormatError(f"{where}: header claims {hlen} bytes but the file holds "
                                  f"{file_size - PREFIX_SIZE} after its prefix (limit "
                                  f"{MAX_HEADER_BYTES}): truncated or tampered")
    head = bytes(view[PREFIX_SIZE:PREFIX_SIZE + hlen])
    if hashlib.sha256(head).digest() != hsha:
        raise ArtifactIntegrityError(f"{where}: header fails its sha256 check; the file is "
                                     "corrupted or was edited")
    if flags & ~_KNOWN_FLAGS or flags & _FLAG_ZDICT_HEADER and not flags & _FLAG_ZLIB_HEADER:
        raise ArtifactFormatError(f"{where}: unknown flags {flags:#x}; a newer fxpress wrote it")
    if flags & _FLAG_ZLIB_HEADER:
        d = zlib.decompressobj(zdict=HEADER_ZDICT) if flags & _FLAG_ZDICT_HEADER else zlib.decompressobj()
        try:
            head = d.decompress(head, MAX_HEADER_BYTES)
        except zlib.error as e:
            raise ArtifactFormatError(f"{where}: header does not decompress: {e}") from None
        if not d.eof:
            raise ArtifactFormatError(f"{where}: header decompresses past {MAX_HEADER_BYTES} bytes")
    try:
        header = json.loads(head)
    except ValueError as e:
        raise ArtifactFormatError(f"{where}: header is not valid JSON: {e}") from None
    if not isinstance(header, dict) or header.get("format") != "fxpress" \
            or header.get("version") != VERSION:
        raise ArtifactFormatError(f"{where}: header does not describe an fxpress v{VERSION} artifact")
    if bool(flags & _FLAG_BLOB_STREAMS) != ("blob" in header):
        raise ArtifactFormatError(f"{where}: the prefix and the header disagree on the blob")
    return header, view[PREFIX_SIZE + hlen:], head


def read_header(path: str | os.PathLike) -> dict:
    """The verified header of an artifact (graph, modules, tensor table), without its tensors.

    >>> read_header("mlp.fxp")["tensors"]["layers.0.weight"]["encoding"]   # doctest: +SKIP
    'relidx'
    """
    p = Path(path)
    try:
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            data = f.read(PREFIX_SIZE)
            if len(data) == PREFIX_SIZE:
                hlen = _PREFIX.unpack(data)[3]
                if hlen <= MAX_HEADER_BYTES and PREFIX_SIZE + hlen <= size:
                    data += f.read(hlen)
    except OSError as e:
        raise ArtifactError(f"cannot read artifact {p}: {e.strerror or e}") from None
    header, _, _ = _split_prefix(data, str(p), file_size=size)
    header["file_bytes"] = size
    return header
