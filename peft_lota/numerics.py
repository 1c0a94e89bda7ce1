"""Chunked numerics shared by the methods: the stock kernel's dequantization, built one row chunk at a time.

A layer's codes and weight are [K, N] tensors; on CPU, element-wise work over them is bound by
memory traffic. The functions here walk the rows in chunks of about CHUNK_ELEMENTS elements, so
that each chunk's temporaries stay in cache, and rebuild weights bit for bit as the stock kernel
(gptqmodel's TorchLinear) computes them. On accelerators a single chunk is used: there, kernel
launches are the cost.
"""

from __future__ import annotations

import math

import torch

from .formats.base import QuantState


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on `x` runs in: the autocast dtype when autocast is on for x's device."""
    if x.is_floating_point() and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


CHUNK_ELEMENTS = 1 << 21


class Scratch:
    """Buffers reused across the chunks of one call.

    On CPU a fresh multi-megabyte tensor is page-faulted in on every allocation, which costs several
    times the arithmetic done in it; chunk loops take their temporaries from here instead.
    """

    def __init__(self, device: torch.device):
        self.device, self._buffers = device, {}

    def __call__(self, name: str, shape, dtype: torch.dtype) -> torch.Tensor:
        n = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            buf = self._buffers[name] = torch.empty(n, dtype=dtype, device=self.device)
        return buf[:n].view(shape)


def row_chunks(state: QuantState, n_cols: int, device: torch.device) -> list[tuple[int, int]]:
    """Row ranges covering [0, K): whole packed words, and whole groups or parts of one group."""
    K = state.in_features
    if device.type != "cpu" or K == 0:
        return [(0, K)]
    align = state.row_align
    rows = max(CHUNK_ELEMENTS // max(n_cols, 1), 1)
    gs = state.group_rows
    if gs is not None and gs < K:
        unit = math.lcm(gs, align)
        if rows >= unit:
            rows = rows // unit * unit
        else:  # several chunks per group: a divisor of the group size
            fits = [d for d in range(align, rows + 1, align) if gs % d == 0]
            rows = fits[-1] if fits else unit
    else:
        rows = max(align, rows // align * align)
    return [(k, min(k + rows, K)) for k in range(0, K, rows)]


def weight_rows(state: QuantState, codes, zeros32, scales32, mu, k0: int, k1: int, out: torch.Tensor,
                scratch: Scratch) -> torch.Tensor:
    """Rows k0..k1-1 of effective_weight(state, codes, zeros, mu), bit for bit, written into `out` in its dtype.

    `codes` holds just these rows; `zeros32`, `scales32` are the whole zeros and scales in float32.
    (Q - z) * s is exact in float32 (a scale has at most 11 significant bits, |Q - z| < 256), so
    rounding it to the scales' own dtype gives exactly the product the stock kernel computes in
    that dtype. Same-dtype float ops only: on CPU, mixed uint8/fp16 broadcasting ops run ~10x slower.
    """
    s = state.group_blocks(scales32, k0, k1)
    target = out.view(s.shape[0], -1, out.shape[-1])
    w = target if out.dtype == torch.float32 else scratch("w32", target.shape, torch.float32)
    w.copy_(codes.view(target.shape)).sub_(state.group_blocks(zeros32, k0, k1)).mul_(s)
    if state.scales.dtype != torch.float32:  # the stock kernel's rounding
        w.copy_(scratch("rounded", target.shape, state.scales.dtype).copy_(w))
    if mu is not None:
        w.add_(s * state.group_blocks(mu, k0, k1))
    if state.offsets is not None:  # s * (Q - z) + m, the float offset last (GGUF's dequantization)
        w.add_(state.group_blocks(state.offsets, k0, k1))
    if w is not target:
        target.copy_(w)
    return out


def adapted_weight(state: QuantState, codes, zeros, mu, dtype: torch.dtype) -> torch.Tensor:
    """effective_weight(state, codes, zeros, mu).to(dtype), bit for bit, built one row chunk at a time."""
    K, N = codes.shape
    out = torch.empty(K, N, dtype=dtype, device=codes.device)
    zeros32, scales32, scratch = zeros.float(), state.scales.float(), Scratch(codes.device)
    for k0, k1 in row_chunks(state, N, codes.device):
        weight_rows(state, codes[k0:k1], zeros32, scales32, mu, k0, k1, out[k0:k1], scratch)
    return out


def input_grad(state: QuantState, codes, zeros, mu, g2: torch.Tensor) -> torch.Tensor:
    """dL/dx = g @ W'^T, rebuilding W' one row chunk at a time (each chunk gives its own columns)."""
    K, N = codes.shape
    grad_x = torch.empty(g2.shape[0], K, dtype=g2.dtype, device=g2.device)
    zeros32, scales32, scratch = zeros.float(), state.scales.float(), Scratch(g2.device)
    for k0, k1 in row_chunks(state, N, g2.device):
        w = weight_rows(state, codes[k0:k1], zeros32, scales32, mu, k0, k1,
                        scratch("w", (k1 - k0, N), g2.dtype), scratch)
        torch.mm(g2, w.t(), out=grad_x[:, k0:k1])
    return grad_x


def add_group_sums_(total: torch.Tensor, state: QuantState, part: torch.Tensor, k0: int, k1: int) -> None:
    """total [G, N] += the sums over each group's rows of the rows k0..k1-1 of a [K, N] tensor.

    `part` is those rows already summed per block of state.group_blocks(., k0, k1): [blocks, N].
    """
    gs = state.group_rows
    if gs is None:  # act-order: one block per row
        total.index_add_(0, state.g_idx[k0:k1], part)
    else:
        total[k0 // gs: k0 // gs + part.shape[0]] += part


# Trained scales are parametrised as s0 * (1 + unit * u), u starting at 0, so that one optimizer step at the
# method's usual learning rate moves a scale by a sensible fraction: LoTA (lr ~1e-4) by up to ~1%; L4Q's unit is its
# config's scale_rate (default 1: at its LoRA's lr ~1e-3, ~0.1%). The accuracy pilot chose both (benchmarks/README.md).
LOTA_SCALE_UNIT = 100.0


def scale_multiplier(u: torch.Tensor, unit: float) -> torch.Tensor:
    return 1.0 + unit * u if unit != 1.0 else 1.0 + u
