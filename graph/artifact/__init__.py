"""Save a GraphModule as one safe, really compressed file, and load it back.

>>> fxpress.save(res.module, "model.fxp")                     # doctest: +SKIP
>>> gm = fxpress.load("model.fxp")                            # doctest: +SKIP

File layout: a 56-byte prefix (magic, version, flags, header length and sha256), the
zlib-compressed JSON header, then a safetensors payload (the table is in :mod:`.format`).

One file, not a directory: a single ``os.replace`` makes the write atomic (a directory
cannot be swapped atomically), one sha256 chain covers everything, and a file is what
people copy, upload and attach. The payload is plain safetensors, so
``safetensors.torch.load(data[header["payload"]["offset"]:])`` reads the streams anywhere.

The header holds data only: nodes with their op, target *name* and arguments (tagged
JSON for tuples, slices, dtypes, devices, ...), the module tree (torch.nn modules by class
name plus their attributes, runtime modules by :meth:`RuntimeModule.config`), export
graphs' pytree specs (``treespec_dumps``, JSON), and one entry per tensor: dtype, shape,
encoding, streams. The full sha256 of the header and of the payload guard the file; a
one-byte CRC per stream (``crc8``) names the stream a damaged payload breaks. Fields the
reader derives are left out of the stored header (format versions 2 and 3, :mod:`.compact`).

Tensors are stored in the smallest of four encodings, chosen per tensor:

* ``dense``: the bytes as they are (packed integer buffers are already at their bit width);
* ``bitmap``: one bit per element (is it non-zero?) plus the non-zero values;
* ``relidx``: Deep Compression's relative indices: for each non-zero, the gap since the
  previous one in ``bits`` bits (1..8, the best width is searched), with a zero "filler"
  entry when a gap does not fit, plus the values;
* ``bitidx`` (uint8 tensors that are bit sets, such as a codebook layer's packed 1-bit
  mask of non-zeros): relative indices of the set *bits*, in ``bits`` bits each, code
  ``2**bits - 1`` being a filler step of ``2**bits - 1`` positions; no values stream (every
  listed bit is 1). A 10%-dense mask costs about 0.5 bits per position instead of 1.

"Zero" means all bits zero, so ``-0.0`` stays dense and decoding is bit-exact.
With ``entropy=True`` the bitmap, index and 8-bit integer streams (values included) are further compressed
with the standard-library codec that makes each one smallest (zlib, bz2 or lzma).

Loading never unpickles and never evaluates text: the header is checked whole against a
closed schema (reviewed ops, reviewed torch.nn classes and their constructor fields, the
runtime module classes handed in, plain-data values) within :class:`Limits`, before any
tensor is decoded or module built; a bad file raises an
:class:`~fxpress.errors.ArtifactFormatError` subclass and leaves nothing behind (README,
"Threat model"; SECURITY.md).

The package, one concern per module:

* :mod:`.format`: the prefix, flags, header packing, checksums;
* :mod:`.limits`: the load's bounds (:class:`Limits`), overridable per call;
* :mod:`.ops`: the reviewed list of callable ops; :mod:`.allowlist`: names -> objects;
* :mod:`.modules`: the torch.nn classes and fields, and runtime module configs, a file may hold;
* :mod:`.specs`: export graphs' input/output structures (pytree specs);
* :mod:`.schema`: the closed schema a header is checked against before anything is built;
* :mod:`.values`: tagged JSON values (node arguments, module attributes);
* :mod:`.tensors`: the tensor codecs (dense, bitmap, relative and bit indices, entropy coding);
* :mod:`.write`: the writer, the stream stores, atomic saves;
* :mod:`.read`: the loader, building the modules and the graph;
* :mod:`.calls`: a loaded graph's calls (arity checked at load, typed errors at a call);
* :mod:`.header_dict`: the preset dictionary the header is compressed from;
* :mod:`.compact`: the fields a version 2 or 3 header leaves out and the reader derives;
* :mod:`.breakdown`: where an artifact's bytes go (prefix, header sections, streams by kind).
"""
from fxpress.graph.artifact.compact import fill, minimize
from fxpress.graph.artifact.format import (BLOB_KEY, BLOB_STREAM_BYTES, EXPANSION_LIMIT, MAGIC,
                                           MAX_HEADER_BYTES, MIN_DECODED_LIMIT, PREFIX_SIZE,
                                           READ_VERSIONS, VERSION, _PREFIX, _pack_header, _sha, _sha64,
                                           _split_prefix, pack_artifact, read_header)
from fxpress.graph.artifact.limits import DEFAULT_LIMITS, Limits
from fxpress.graph.artifact.read import _blob_streams, _unblob, load, loads
from fxpress.graph.artifact.schema import Allowlist, class_name
from fxpress.graph.artifact.tensors import (CODECS, SPARSE_MIN_NUMEL, _as_ints, _fillers, _gaps,
                                            decode_tensor, encode_tensor, plan_encoding)
from fxpress.graph.artifact.values import dtype_name
from fxpress.graph.artifact.write import (artifact_header, artifact_size, dumps, save,
                                          write_atomic)

__all__ = ["save", "load", "dumps", "loads", "read_header", "artifact_size", "artifact_header",
           "write_atomic",
           "Allowlist", "pack_artifact", "encode_tensor", "decode_tensor", "plan_encoding", "MAGIC", "VERSION",
           "PREFIX_SIZE", "CODECS", "Limits", "DEFAULT_LIMITS"]
