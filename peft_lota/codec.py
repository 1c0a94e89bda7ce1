"""Packing and unpacking of GPTQ integer codes, as pure functions on tensors.

GPTQ packs `b`-bit unsigned codes into int32 words as one little-endian bit stream: code `i` of
a run occupies stream bits `[i*b, (i+1)*b)`, and word `j` holds stream bits `[32*j, 32*j + 32)`.
For b in {2, 4, 8} that is the familiar "32/b codes per word"; for 3 bits codes spill across
word boundaries (32 codes fill 3 words). gptqmodel stores 5/6/7 bits in a different, "planar"
layout that we do not handle. `qweight` is packed along the input dimension
(rows), `qzeros` along the output dimension (columns).

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
        raise ValueError(f"GPTQ codes of {bits} bits are not supported; use one of {SUPPORTED_BITS}.")


def packed_len(n: int, bits: int) -> int:
    """Number of int32 words that hold `n` codes of `bits` bits."""
    _check_bits(bits)
    if (n * bits) % 32:
        raise ValueError(f"{n} codes of {bits} bits do not fill whole int32 words.")
    return n * bits // 32


def unpack_codes(packed: torch.Tensor, bits: int, dim: int = 0) -> torch.Tensor:
    """Unpack int32 words along `dim` into uint8 codes.

    Returns a contiguous tensor whose size along `dim` is `packed.shape[dim] * 32 // bits`. This
    runs in every LoTA forward and merge, so the 2/4/8-bit path works in int32 lanes with the
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


def unpack_qweight(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """`qweight` int32 [K*b/32, N] -> codes uint8 [K, N]."""
    return unpack_codes(qweight, bits, dim=0)


def pack_qweight(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [K, N] -> `qweight` int32 [K*b/32, N]."""
    return pack_codes(codes, bits, dim=0)


def unpack_qzeros(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """`qzeros` int32 [groups, N*b/32] -> stored zero points uint8 [groups, N] (no +1 applied)."""
    return unpack_codes(qzeros, bits, dim=1)


def pack_qzeros(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """stored zero points [groups, N] -> `qzeros` int32 [groups, N*b/32]."""
    return pack_codes(zeros, bits, dim=1)


def zeros_v2_to_v1(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Packed true zero points (v2, "gptq_v2") -> packed classic zero points (v1, "gptq": z - 1).

    A v1 checkpoint cannot hold a true zero point of 0 (it would need -1); refuse rather than
    write a checkpoint that loads wrong.
    """
    z = unpack_qzeros(qzeros, bits).to(torch.int16)
    if z.numel() and int(z.min()) < 1:
        raise ValueError(
            "this layer has a zero point of 0, which the classic GPTQ format ('gptq', v1) cannot store; "
            "save it in 'gptq_v2' format instead."
        )
    return pack_qzeros(z - 1, bits)


def zeros_v1_to_v2(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Packed classic zero points (v1: z - 1) -> packed true zero points (v2)."""
    z = unpack_qzeros(qzeros, bits).to(torch.int16) + 1
    if z.numel() and int(z.max()) > (1 << bits) - 1:
        raise ValueError(
            f"a stored v1 zero point of {(1 << bits) - 1} means a true zero point of {1 << bits}, "
            f"which does not fit in {bits} bits of the 'gptq_v2' format."
        )
    return pack_qzeros(z, bits)


def group_index(in_features: int, group_size: int, device=None) -> torch.Tensor:
    """The default (no act-order) `g_idx`: row k belongs to group k // group_size."""
    gs = in_features if group_size in (-1, 0) else group_size
    return torch.arange(in_features, device=device, dtype=torch.int32) // gs
