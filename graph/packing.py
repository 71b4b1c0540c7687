"""Pack small unsigned integer codes into bytes at their real bit width, and back.

Every runtime module that stores sub-byte codes (4-bit and lower quantised weights,
codebook indices, 1-bit signs, ternary and power-of-two codes) uses these two functions,
so a ``bits``-bit code costs ``bits`` bits in the state_dict and on disk.

>>> codes = torch.tensor([1, 0, 3, 2, 3], dtype=torch.uint8)
>>> packed = pack_bits(codes, 2)
>>> packed.numel()                      # 5 codes x 2 bits = 10 bits -> 2 bytes
2
>>> unpack_bits(packed, 2, 5).tolist()
[1, 0, 3, 2, 3]
"""
from __future__ import annotations

import torch


def packed_size(numel: int, bits: int) -> int:
    """Bytes needed for ``numel`` codes of ``bits`` bits."""
    return (numel * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in 1..8, got {bits!r}")


#: Codes per piece when packing or unpacking: a multiple of 8 (each piece ends on a byte),
#: so the int64 temporaries stay a few MB whatever the tensor's size.
CHUNK = 1 << 20


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (each < 2**bits) into a flat uint8 tensor, little-endian bit order.

    Widths that divide 8 (1, 2, 4, 8) pack whole codes per byte; others (3, 5, 6, 7) pack
    each group of 8 codes into ``bits`` bytes. Vectorised, :data:`CHUNK` codes at a time
    (the int64 route costs 24 bytes per code at once: 0.9x a 38M-entry fp32 table's bytes
    for its 5-bit relative indices).
    """
    _check_bits(bits)
    flat = codes.reshape(-1)
    if flat.numel() <= CHUNK:
        return _pack_piece(flat, bits)
    return torch.cat([_pack_piece(flat[i:i + CHUNK], bits) for i in range(0, flat.numel(), CHUNK)])


def _pack_piece(flat: torch.Tensor, bits: int) -> torch.Tensor:
    if flat.dtype in (torch.uint8, torch.bool) and 8 % bits == 0 and bits < 8:
        return _pack_bytes(flat.to(torch.uint8), bits)
    flat = flat.to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= (1 << bits)):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing")
    if bits == 8:
        return flat.to(torch.uint8)
    n = flat.numel()
    if 8 % bits == 0:
        per = 8 // bits
        pad = (-n) % per
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad)])
        shifts = torch.arange(per, dtype=torch.int64) * bits
        return (flat.view(-1, per) << shifts).sum(1).to(torch.uint8)
    # general widths: 8 codes fill exactly ``bits`` bytes; build that group as one 64-bit
    # word (8 x bits <= 56 bits) and cut it into bytes: the same little-endian bit stream
    # as expanding every bit, at a fraction of the memory
    pad = (-n) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    words = (flat.view(-1, 8) << (torch.arange(8, dtype=torch.int64) * bits)).sum(1)
    out = (words.unsqueeze(1) >> (torch.arange(bits, dtype=torch.int64) * 8)) & 0xFF
    return out.reshape(-1)[:packed_size(n, bits)].to(torch.uint8)


def _pack_bytes(flat: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`pack_bits` of uint8 codes at 1, 2 or 4 bits, in uint8 throughout (the int64
    route costs 8 bytes per code)."""
    if flat.numel() and int(flat.max()) >= (1 << bits):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing")
    per = 8 // bits
    pad = (-flat.numel()) % per
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    v = flat.view(-1, per)
    out = v[:, 0].clone()
    for i in range(1, per):
        out.bitwise_or_(v[:, i] << (bits * i))
    return out


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``numel`` codes, as a flat uint8 tensor
    (:data:`CHUNK` codes at a time)."""
    _check_bits(bits)
    p = packed.reshape(-1)
    if p.numel() < packed_size(numel, bits):
        raise ValueError(f"{p.numel()} bytes cannot hold {numel} codes of {bits} bits")
    if numel <= CHUNK:
        return _unpack_piece(p, bits, numel)
    step = CHUNK * bits // 8  # bytes per piece: CHUNK is a multiple of 8, so pieces end on bytes
    return torch.cat([_unpack_piece(p[j * step:(j + 1) * step], bits, min(CHUNK, numel - j * CHUNK))
                      for j in range(-(-numel // CHUNK))])


def _unpack_piece(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    p = packed[:packed_size(numel, bits)].to(torch.int64)
    if bits == 8:
        return p[:numel].to(torch.uint8)
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        per = 8 // bits
        shifts = torch.arange(per, dtype=torch.int64) * bits
        return ((p.unsqueeze(1) >> shifts) & mask).reshape(-1)[:numel].to(torch.uint8)
    groups = (numel + 7) // 8
    pad = groups * bits - p.numel()
    if pad:
        p = torch.cat([p, p.new_zeros(pad)])
    words = (p.view(groups, bits) << (torch.arange(bits, dtype=torch.int64) * 8)).sum(1)
    codes = (words.unsqueeze(1) >> (torch.arange(8, dtype=torch.int64) * bits)) & mask
    return codes.reshape(-1)[:numel].to(torch.uint8)


def unpack_rows(packed: torch.Tensor, bits: int, row_len: int, rows: torch.Tensor) -> torch.Tensor:
    """Codes of some rows of a packed ``[num_rows, row_len]`` matrix, unpacking only those.

    For embedding lookups: a batch of token ids touches a few rows of a large table.
    Needs ``row_len * bits % 8 == 0`` so that every row starts on a byte (see
    :func:`rows_byte_aligned`). Returns uint8 codes shaped ``[*rows.shape, row_len]``.

    >>> codes = torch.arange(12, dtype=torch.uint8).view(3, 4) % 4
    >>> unpack_rows(pack_bits(codes, 2), 2, 4, torch.tensor([2, 0])).tolist()
    [[0, 1, 2, 3], [0, 1, 2, 3]]
    """
    if not rows_byte_aligned(row_len, bits):
        raise ValueError(f"rows of {row_len} codes x {bits} bits do not start on a byte")
    # indexed with ``rows`` as they are, the (contiguous) result flattened: flattening the
    # indices first would make torch.compile specialise a batch of 1 (an expanded tensor,
    # such as BERT's token types, is reshaped by a copy only when no size is 1)
    chunks = packed.reshape(-1, row_len * bits // 8)[rows.to(torch.int64)]
    return unpack_bits(chunks.reshape(-1), bits, rows.numel() * row_len).view(*rows.shape, row_len)


def rows_byte_aligned(row_len: int, bits: int) -> bool:
    """True when rows of ``row_len`` codes at ``bits`` bits each fill whole bytes."""
    return row_len > 0 and (row_len * bits) % 8 == 0


__all__ = ["pack_bits", "unpack_bits", "unpack_rows", "rows_byte_aligned", "packed_size"]
