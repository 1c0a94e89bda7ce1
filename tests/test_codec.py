"""Exact round trips of the GPTQ packing functions."""

import pytest
import torch

from peft_lota.formats import gptq, packing


@pytest.mark.parametrize("bits", packing.SUPPORTED_BITS)
def test_pack_unpack_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (64, 96), generator=g, dtype=torch.uint8)
    for dim in (0, 1):
        packed = packing.pack_codes(codes, bits, dim=dim)
        assert packed.dtype == torch.int32
        assert packed.shape[dim] == codes.shape[dim] * bits // 32
        assert torch.equal(packing.unpack_codes(packed, bits, dim=dim), codes)


@pytest.mark.parametrize("bits", packing.SUPPORTED_BITS)
def test_every_word_pattern_round_trips(bits):
    # All 2**32 patterns are valid packings (32 codes fill `bits` words exactly), sign bit included.
    words = torch.randint(-(2**31), 2**31 - 1, (96, 7), dtype=torch.int32)
    words[0, 0], words[1, 0] = -1, -(2**31)
    assert torch.equal(packing.pack_codes(packing.unpack_codes(words, bits), bits), words)


def test_gptq_packs_4_and_3_bit_codes_where_every_loader_reads_them():
    # 4-bit: code i of a word sits at bits 4*i (the layout every GPTQ loader reads).
    codes = torch.arange(8, dtype=torch.uint8).view(8, 1)
    assert int(gptq.pack_qweight(codes, 4)) == 0x76543210
    # 3-bit: code 10 straddles words 0 and 1 (bits 30-31 of word 0, bit 0 of word 1).
    codes = torch.zeros(32, 1, dtype=torch.uint8)
    codes[10] = 0b111
    words = gptq.pack_qweight(codes, 3)[:, 0].tolist()
    assert words == [-(2**31) + 2**30, 1, 0]


def test_zero_format_conversions():
    z = torch.tensor([[1, 15, 7, 3, 2, 9, 4, 8]], dtype=torch.uint8)
    v2 = gptq.pack_qzeros(z, 4)
    v1 = gptq.zeros_v2_to_v1(v2, 4)
    assert torch.equal(gptq.unpack_qzeros(v1, 4), z - 1)
    assert torch.equal(gptq.zeros_v1_to_v2(v1, 4), v2)
    with pytest.raises(ValueError, match="gptq_v2"):
        gptq.zeros_v2_to_v1(gptq.pack_qzeros(torch.zeros(1, 8, dtype=torch.uint8), 4), 4)
    with pytest.raises(ValueError, match="does not fit"):
        gptq.zeros_v1_to_v2(gptq.pack_qzeros(torch.full((1, 8), 15, dtype=torch.uint8), 4), 4)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="not supported"):
        gptq.pack_qweight(torch.zeros(32, 1, dtype=torch.uint8), 5)
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        gptq.pack_qweight(torch.full((16, 1), 4, dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="whole int32 words"):
        gptq.pack_qweight(torch.zeros(12, 1, dtype=torch.uint8), 4)
