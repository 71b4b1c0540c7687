import pytest
import torch

from fxpress.graph.packing import pack_bits, packed_size, unpack_bits


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1000, 4097])
def test_round_trip_at_every_width(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 1 << bits, (n,), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_size(n, bits)
    assert torch.equal(unpack_bits(packed, bits, n), codes)


def test_bad_codes_and_widths_are_refused():
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        pack_bits(torch.tensor([4]), 2)
    with pytest.raises(ValueError, match="1..8"):
        pack_bits(torch.tensor([1]), 9)
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_bits(torch.zeros(1, dtype=torch.uint8), 4, 3)


def test_packing_piece_by_piece_writes_the_same_bytes(monkeypatch):
    import fxpress.graph.packing as packing

    g = torch.Generator().manual_seed(3)
    cases = {(b, n): torch.randint(0, 1 << b, (n,), generator=g) for b in range(1, 9) for n in (9, 1000, 4099)}
    whole = {k: pack_bits(c, k[0]) for k, c in cases.items()}
    for chunk in (8, 64, 1024):
        monkeypatch.setattr(packing, "CHUNK", chunk)
        for (bits, n), c in cases.items():
            for codes in (c, c.to(torch.uint8)):  # the int64 route and the uint8 one
                packed = pack_bits(codes, bits)
                assert torch.equal(packed, whole[bits, n]), (chunk, bits, n, codes.dtype)
                assert torch.equal(unpack_bits(packed, bits, n), c.to(torch.uint8))
    monkeypatch.setattr(packing, "CHUNK", 8)
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        pack_bits(torch.tensor([1] * 20 + [4]), 2)  # a bad code in a later piece
