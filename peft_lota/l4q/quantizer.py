"""L4Q's quantizer and its fused linear, as plain tensor functions (no PEFT, no nn.Module).

L4Q (arXiv 2402.04902) in the formats' orientation `[K, N]` = `[in, out]`, on the formats'
unsigned grid (codes in [0, maxq], integer zero points z):

    W_comb = W0 + scaling * A^T B^T          A [r, K], B [N, r]: PEFT LoRA's lora_A / lora_B weights
    v      = round(W_comb / s) + z           s [G, N] trained scales, z [G, N] integer zero points
    Q      = clamp(v, 0, maxq)               the codes a checkpoint stores
    W_q    = s * (Q - z)                     computed exactly as the stock kernel does (fp16 product)
    y      = x @ W_q (+ bias)

L4Q's signed grid with offset b = 0 is the symmetric unsigned grid (z = 2^(b-1)); from a quantized checkpoint,
W0 = s0 * (Q0 - z) is recomputed from its codes, so W_comb / s0 = Q0 - z exactly and a fresh adapter
(B = 0) reproduces the checkpoint bit for bit.

Backward (straight-through, LSQ-style), recomputing W_comb instead of keeping it:
    dL/dW_comb = G * m             G = x^T g, m = 1[0 <= v <= maxq] (clipped weights pass no gradient)
    dL/dA = scaling * (G m B)^T    dL/dB = scaling * (G m)^T A^T
    dL/ds = sum over the group's rows of G * (round(W_comb/s) - W_comb/s) where in range, G * (Q - z)
            where clipped; times LSQ's gradient scale 1 / sqrt(rows per group * Q_P)     (scale_gradient "lsq")
    or, holding the codes: sum of G * (Q - z), the weights' own derivative            (scale_gradient "codes")

LSQ's gradient treats the codes as moving with s; on a quantized start W0 sits on the grid, where it is 0 until
the LoRA moves W_comb off it, and then mostly rounding noise.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..formats.base import QuantState, group_layout
from ..numerics import Scratch, add_group_sums_, compute_dtype, input_grad, row_chunks, weight_rows

SMALLEST_SCALE = 2.0 ** -14  # fp16's smallest normal number: a scale must stay a normal fp16 value


def init_grid(W: torch.Tensor, bits: int, group_size: int, sym: bool, dtype=torch.float16):
    """L4Q's quantizer initialisation of a full-precision weight W [K, N]: (scales [G, N] in `dtype`, zeros int32).

    sym (L4Q_init): per group, s = max(|min| / 2^(b-1), max / (2^(b-1) - 1)) and z = 2^(b-1), so that no weight
    is clipped. Asymmetric: min-max over the group and 0, s = (max - min) / maxq, z = round(-min / s) kept in
    [1, maxq], the range every format stores (GPTQ's classic format stores z - 1), then s widened if the rounded z would clip an end.
    Scales are rounded up to `dtype`, so the stored scale clips nothing either. G = ceil(K / group_size).
    """
    K, N = W.shape
    gs = K if group_size == -1 else group_size
    # A width that is no multiple of the group size ends in a short group (as GPTQ's g_idx = k // group_size has
    # it): padded with zeros, which change nothing, as both grids below include 0 anyway.
    padded = torch.nn.functional.pad(W.float(), (0, 0, 0, -K % gs))
    groups = padded.reshape(-1, gs, N)
    lo, hi = groups.amin(1), groups.amax(1)
    maxq = (1 << bits) - 1
    if sym:
        half = 1 << (bits - 1)
        s = torch.maximum(lo.clamp_max(0).abs() / half, hi.clamp_min(0) / max(half - 1, 1))
        zeros = torch.full(s.shape, half, dtype=torch.int32)
    else:
        lo, hi = lo.clamp_max(0), hi.clamp_min(0)
        s = ((hi - lo) / maxq).clamp_min(SMALLEST_SCALE)
        zeros = torch.round(-lo / s).clamp(1, maxq)
        # Codes round(w / s) + z stay in [0, maxq] when -min / s <= z + 1/2 and max / s <= maxq - z + 1/2.
        s = torch.maximum(s, torch.maximum(-lo / (zeros + 0.49), hi / (maxq - zeros + 0.49)))
        zeros = zeros.to(torch.int32)
    s = s.clamp_min(SMALLEST_SCALE)
    stored = s.to(dtype)
    stored = torch.where(stored.float() < s, torch.nextafter(stored, torch.full_like(stored, float("inf"))), stored)
    return stored, zeros.to(W.device)


def default_g_idx(in_features: int, group_size: int, device=None) -> torch.Tensor:
    gs = in_features if group_size == -1 else group_size
    return torch.arange(in_features, device=device, dtype=torch.int32) // gs


class Grid:
    """What L4Q quantizes in one layer: W0 (one row chunk at a time) and its grid (zeros, base scales, g_idx).

    `state` is a QuantState holding the zeros, the base scales (the checkpoint's dtype), g_idx, bias and layout;
    `w0_rows(k0, k1, out=None)` returns rows k0..k1-1 of W0 in float32 (written into `out` if given: a scratch
    buffer the caller then works in, in place).
    """

    def __init__(self, state: QuantState, w0_rows: Callable[[int, int], torch.Tensor]):
        self.state, self.w0_rows = state, w0_rows

    @classmethod
    def from_quantized(cls, state: QuantState) -> "Grid":
        """W0 = s0 * (Q0 - z), recomputed from the codes (exact in float32): no full-precision copy is kept. A grid
        with a float offset per group (GGUF's Q4_1 / Q5_1: w = s * (Q - z) + m) is quantized without it, as W - m:
        the codes round on the same grid, and the weight adds m back (numerics.weight_rows)."""
        zeros32, scales32 = state.zeros.float(), state.scales.float()

        def w0_rows(k0: int, k1: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
            codes = state.codes_rows(k0, k1)
            s = state.group_blocks(scales32, k0, k1)
            w = codes.float() if out is None else out.copy_(codes)
            w.view(s.shape[0], -1, codes.shape[-1]).sub_(state.group_blocks(zeros32, k0, k1)).mul_(s)
            return w

        return cls(state, w0_rows)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias, scales, zeros, g_idx, maxq: int, row_align: int) -> "Grid":
        """W0 = a full-precision weight [N, K] (nn.Linear's), read transposed."""
        K = weight.shape[1]
        state = QuantState(None, zeros, scales, g_idx.long(), maxq, bias, codes_rows=lambda k0, k1: None,
                           in_features=K, row_align=row_align, layout=group_layout(g_idx.long(), scales.shape[0]))
        def w0_rows(k0: int, k1: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
            rows = weight[:, k0:k1].t()  # a copy either way: W_comb is built in place on these rows
            return rows.to(torch.float32, copy=True) if out is None else out.copy_(rows)

        return cls(state, w0_rows)


def lsq_gradient_scale(state: QuantState, maxq: int) -> torch.Tensor:
    """LSQ's 1 / sqrt(rows per group * Q_P), per group [G, 1] (Q_P: the grid's positive range, maxq here)."""
    return (state.counts.clamp_min(1) * maxq).rsqrt()[:, None]


def _combined_rows(grid: Grid, A32, B32, scaling: float, k0: int, k1: int) -> torch.Tensor:
    """W_comb rows k0..k1-1 in float32: W0 + scaling * A^T B^T."""
    w = grid.w0_rows(k0, k1)
    return w.addmm_(A32[:, k0:k1].t(), B32.t(), alpha=scaling)


def quantize_rows(grid: Grid, wc: torch.Tensor, scales32, zeros32, k0: int, k1: int):
    """(v = round(W_comb / s) + z unclipped, as float [blocks, rows/blocks, N], and W_comb / s) for rows k0..k1-1."""
    st = grid.state
    s = st.group_blocks(scales32, k0, k1)
    ws = wc.view(s.shape[0], -1, wc.shape[-1]).div(s)
    return torch.round(ws).add_(st.group_blocks(zeros32, k0, k1)), ws


def quantized_codes(grid: Grid, A, B, scaling: float, scales32: torch.Tensor) -> torch.Tensor:
    """Q = clamp(round(W_comb / s) + z, 0, maxq) as uint8 [K, N], one row chunk at a time.

    The same float32 operations as quantize_rows, done in place in one reused buffer per chunk (the forward
    and every merge run this; fresh chunk-sized tensors cost more than the arithmetic on CPU).
    """
    st = grid.state
    K, N = st.in_features, st.scales.shape[1]
    device = st.scales.device
    codes = torch.empty(K, N, dtype=torch.uint8, device=device)
    zeros32 = st.zeros.float()
    A32, B32 = A.detach().float(), B.detach().float()
    scratch = Scratch(device)
    with torch.autocast(device_type=device.type, enabled=False):
        for k0, k1 in row_chunks(st, N, device):
            w = grid.w0_rows(k0, k1, out=scratch("w", (k1 - k0, N), torch.float32))
            w.addmm_(A32[:, k0:k1].t(), B32.t(), alpha=scaling)  # W_comb
            s = st.group_blocks(scales32, k0, k1)
            w.view(s.shape[0], -1, N).div_(s).round_().add_(st.group_blocks(zeros32, k0, k1)).clamp_(0, st.maxq)
            codes[k0:k1].copy_(w)
    return codes


def quantized_weight(grid: Grid, codes: torch.Tensor, scales32: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W_q = s * (Q - z) in `dtype`, bit for bit as the stock kernel computes it from these codes and scales."""
    st = grid.state.replace(scales=scales32.to(grid.state.scales.dtype))
    K, N = codes.shape
    out = torch.empty(K, N, dtype=dtype, device=codes.device)
    zeros32, scratch = st.zeros.float(), Scratch(codes.device)
    for k0, k1 in row_chunks(st, N, codes.device):
        weight_rows(st, codes[k0:k1], zeros32, scales32, None, k0, k1, out[k0:k1], scratch)
    return out


class L4QLinearFunction(torch.autograd.Function):
    """y = x @ W_q(W0 + scaling A^T B^T; s) + bias, with L4Q's straight-through gradients to A, B (and s).

    Forward keeps x, the codes (one byte per weight) and the small parameters; backward rebuilds W_q from
    the codes and recomputes W_comb (the paper's memory-optimised design): no weight-sized float tensor
    lives from forward to backward.
    """

    @staticmethod
    def forward(ctx, x, grid: Grid, scaling: float, scale_gradient: str, scales32, A, B, anchored: bool = False):
        base_scales = grid.state.scales.float() if scales32 is None else scales32.detach()
        # anchored: the codes round on the starting grid; the trained scales stretch it without re-rounding
        round_scales = grid.state.scales.float() if anchored else base_scales
        codes = quantized_codes(grid, A, B, scaling, round_scales)
        dtype = compute_dtype(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.to(dtype)
            out = grid.state.linear(x, quantized_weight(grid, codes, base_scales, dtype), grid.state.bias, codes=codes,
                                    zeros=grid.state.zeros, scales=base_scales)
        ctx.grid, ctx.scaling, ctx.learn_scales, ctx.scale_gradient = grid, scaling, scales32 is not None, scale_gradient
        ctx.anchored = anchored
        ctx.save_for_backward(x, codes, base_scales, A, B)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, codes, scales32, A, B = ctx.saved_tensors
        grid, scaling = ctx.grid, ctx.scaling
        st = grid.state.replace(scales=scales32.to(grid.state.scales.dtype))
        (K, N), device = codes.shape, x.device
        x2, g2 = x.reshape(-1, K), grad_out.to(x.dtype).reshape(-1, N)
        needs = ctx.needs_input_grad
        A32, B32 = A.float(), B.float()
        dA, dB = torch.zeros_like(A32), torch.zeros_like(B32)
        d_scales = torch.zeros_like(scales32) if ctx.learn_scales else None
        zeros32, scratch = st.zeros.float(), Scratch(device)
        # the grid the codes rounded on: the starting one when anchored, else the trained one (the same as scales32)
        round32 = grid.state.scales.float() if ctx.anchored else scales32
        with torch.autocast(device_type=device.type, enabled=False):
            grad_x = input_grad(st, codes, st.zeros, None, g2).view(x.shape) if needs[0] else None
            for k0, k1 in row_chunks(st, N, device):
                G = torch.mm(x2[:, k0:k1].t(), g2, out=scratch("G", (k1 - k0, N), x2.dtype))  # dL/dW_q rows
                if G.dtype != torch.float32:
                    G = scratch("G32", G.shape, torch.float32).copy_(G)
                v, ws = quantize_rows(grid, _combined_rows(grid, A32, B32, scaling, k0, k1), round32, zeros32, k0, k1)
                blocks = G.view(v.shape)
                in_range = (v >= 0) & (v <= st.maxq)
                if d_scales is not None:  # dW_q/ds: (Q - z), or LSQ's round(w~) - w~ where in range
                    step = codes[k0:k1].view(v.shape).float().sub_(st.group_blocks(zeros32, k0, k1))
                    if ctx.scale_gradient == "lsq":
                        step = torch.where(in_range, v.sub(st.group_blocks(zeros32, k0, k1)).sub_(ws), step)
                    add_group_sums_(d_scales, st, step.mul_(blocks).sum(1), k0, k1)
                if ctx.anchored and ctx.learn_scales:  # W_q = s * (round(W_comb / s0) - z): dW_q/dW_comb = s / s0
                    blocks.mul_(st.group_blocks(scales32, k0, k1) / st.group_blocks(round32, k0, k1))
                dwc = blocks.mul_(in_range).view(k1 - k0, N)  # dL/dW_comb: clipped weights pass nothing
                dA[:, k0:k1] = (dwc @ B32).t().mul_(scaling)
                dB.addmm_(dwc.t(), A32[:, k0:k1].t(), alpha=scaling)
        if d_scales is not None and ctx.scale_gradient == "lsq":
            d_scales.mul_(lsq_gradient_scale(st, st.maxq))
        return (grad_x, None, None, None, d_scales, dA.to(A.dtype) if needs[5] else None,
                dB.to(B.dtype) if needs[6] else None, None)


def l4q_linear(x: torch.Tensor, grid: Grid, A: torch.Tensor, B: torch.Tensor, scaling: float,
               scales32: Optional[torch.Tensor] = None, scale_gradient: str = "lsq",
               anchored: bool = False) -> torch.Tensor:
    """y = x @ W_q + bias; no autograd graph when nothing needs a gradient. anchored: the codes round on the
    starting grid (L4QConfig.anchor_codes)."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, A, B, scales32)):
        return L4QLinearFunction.apply(x, grid, scaling, scale_gradient, scales32, A, B, anchored)
    s = grid.state.scales.float() if scales32 is None else scales32
    codes = quantized_codes(grid, A, B, scaling, grid.state.scales.float() if anchored else s)
    return grid.state.linear(x, quantized_weight(grid, codes, s, x.dtype), grid.state.bias, codes=codes,
                             zeros=grid.state.zeros, scales=s)


def fake_quantized_weight(grid: Grid, A: torch.Tensor, B: torch.Tensor, scaling: float,
                          scales32: Optional[torch.Tensor] = None, scale_gradient: str = "lsq") -> torch.Tensor:
    """W_q [K, N] in float32 as a differentiable function of A, B (and the scales), with L4Q's straight-through
    gradients, for losses on the weights themselves (calibration's saliency regulariser). Whole layer at once;
    the products are not rounded to the stored dtype (the forward's are)."""
    st = grid.state
    g = st.g_idx
    s = st.scales.float() if scales32 is None else scales32
    if scales32 is not None and scale_gradient == "lsq":
        gs = lsq_gradient_scale(st, st.maxq)
        s = s * gs + (s - s * gs).detach()  # LSQ's gradient scale; the value is unchanged
    s_rows, z = s[g], st.zeros.float()[g]
    wc = grid.w0_rows(0, st.in_features) + scaling * (A.float().t() @ B.float().t())
    w = wc / (s_rows if scale_gradient == "lsq" else s_rows.detach())
    v = torch.round(w).detach() + (w - w.detach()) + z  # exact integers, gradient 1
    inside = (v >= 0) & (v <= st.maxq)  # the paper's mask is inclusive; torch.clamp's gradient is not
    q = torch.where(inside, v, torch.clamp(v, 0, st.maxq).detach())
    return s_rows * (q - z) + (0 if st.offsets is None else st.offsets[g])


