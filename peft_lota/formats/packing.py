"""Packing and unpacking of integer codes into int32 words, as pure functions on tensors.

The packing GPTQ uses (and, along other dimensions or in other orders, other integer formats):
`b`-bit unsigned codes form one little-endian bit stream, code `i` of a run occupying stream bits
`[i*b, (i+1)*b)` and word `j` holding stream bits `[32*j, 32*j + 32)`. For b in {2, 4, 8} that is
the familiar "32/b codes per word"; for 3 bits codes spill across word boundaries (32 codes fill
3 words). Which dimension is packed, and what the codes mean, is each format's business
(formats/gptq.py).

We own these few lines rather than import gptqmodel's helpers, which are private and move
between releases. Every function is exact and round-trips bit for bit (see tests/test_codec.py).
"""

from __future__ import annotations

import math

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
_BLOCK_ELEMENTS = 1 << 18  # int32 words per block in pack_codes (1 MiB)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"codes of {bits} bits are not supported; use one of {SUPPORTED_BITS}.")


def packed_len(n: int, bits: int) -> int:
    """Number of int32 words that hold `n` codes of `bits` bits."""
    _check_bits(bits)
    if (n * bits) % 32:
        raise ValueError(f"{n} codes of {bits} bits do not fill whole int32 words.")
    return n * bits // 32


def unpack_codes(packed: torch.Tensor, bits: int, dim: int = 0) -> torch.Tensor:
    """Unpack int32 words along `dim` into uint8 codes.

    Returns a contiguous tensor whose size along `dim` is `packed.shape[dim] * 32 // bits`. This
    runs in every adapted forward and merge, so the 2/4/8-bit path works in int32 lanes with the
    packed dimension first (every op reads and writes contiguous rows): an arithmetic shift cast
    to uint8 keeps the low byte, and the mask removes the higher codes of that byte.
    """
    _check_bits(bits)
    words = packed.movedim(dim, 0).to(torch.int32)
    mask = (1 << bits) - 1
    if bits in (2, 4, 8):
        per_word = 32 // bits
        codes = torch.empty(words.shape[0], per_word, *words.shape[1:], dtype=torch.uint8, device=packed.device)
        for i in range(per_word):
            code = codes[:, i]
            torch.bitwise_right_shift(words, i * bits, out=code)  # int32 result, low byte stored
            if bits < 8:
                code.bitwise_and_(mask)
        codes = codes.flatten(0, 1)
    else:  # 3 bits: 32 codes in 3 words; int64 keeps the spilled bits unsigned
        if words.shape[0] % bits:
            raise ValueError(f"{words.shape[0]} words do not hold whole runs of 32 {bits}-bit codes.")
        blocks = (words.to(torch.int64) & 0xFFFFFFFF).reshape(-1, bits, *words.shape[1:])
        out = []
        for i in range(32):
            w, off = divmod(i * bits, 32)
            value = blocks[:, w] >> off
            if off + bits > 32:  # the code spills into the next word
                value = value | (blocks[:, w + 1] << (32 - off))
            out.append(value & mask)
        codes = torch.stack(out, dim=1).to(torch.uint8).flatten(0, 1)
    return codes.movedim(0, dim).contiguous()


def pack_codes(codes: torch.Tensor, bits: int, dim: int = 0) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) along `dim` into int32 words (inverse of unpack_codes).

    Returns a contiguous tensor. 2/4/8 bits: Horner's scheme in int32 lanes, from the highest code of
    each word down (a left shift into the sign bit is the two's-complement wrap GPTQ stores).
    """
    _check_bits(bits)
    c = codes.movedim(dim, 0)
    if c.numel():
        lo, hi = torch.aminmax(c)
        if int(lo) < 0 or int(hi) > (1 << bits) - 1:
            raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] to be packed in {bits} bits.")
    n = c.shape[0]
    packed_len(n, bits)  # validates that the codes fill whole words
    if bits in (2, 4, 8):
        per_word = 32 // bits
        c = c.reshape(n // per_word, per_word, *c.shape[1:])
        words = torch.empty(c.shape[0], *c.shape[2:], dtype=torch.int32, device=c.device)
        # Blocks of words small enough for the cache; same-dtype operands (mixed uint8/int32 ops are slow on CPU).
        step = max(1, _BLOCK_ELEMENTS // max(1, math.prod(c.shape[2:])))
        code = torch.empty(min(step, c.shape[0]), *c.shape[2:], dtype=torch.int32, device=c.device)
        for w0 in range(0, c.shape[0], step):
            out, block, tmp = words[w0:w0 + step], c[w0:w0 + step], code[: min(step, c.shape[0] - w0)]
            out.copy_(block[:, per_word - 1])
            for i in range(per_word - 2, -1, -1):
                out.bitwise_left_shift_(bits).bitwise_or_(tmp.copy_(block[:, i]))
    else:
        c = c.to(torch.int64)
        blocks = c.reshape(n // 32, 32, *c.shape[1:])
        words = torch.zeros(n // 32, bits, *c.shape[1:], dtype=torch.int64, device=c.device)
        for i in range(32):
            start = i * bits
            w, off = divmod(start, 32)
            words[:, w] |= (blocks[:, i] << off) & 0xFFFFFFFF
            if off + bits > 32:
                words[:, w + 1] |= blocks[:, i] >> (32 - off)
        words = words.reshape(-1, *c.shape[1:])
        # Reinterpret the unsigned 32-bit values as int32 (two's complement).
        words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    return words.movedim(0, dim).contiguous()


def word_rows(bits: int) -> int:
    """Codes of `bits` bits that fill whole int32 words when packed along one dimension (32 at 3 bits)."""
    return 32 // math.gcd(bits, 32)
