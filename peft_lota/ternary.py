"""LoTA-QAF's ternary adaptation as plain tensor functions (no PEFT, no nn.Module).

Notation follows ../shared/LOTA_SPEC.md. Tensors are kept in GPTQ's own orientation, `[K, N]` =
`[in_features, out_features]`, so codes, the product `P = A @ B` and the code change `D` line up
with `qweight` without transposes; only the public `get_delta_*` methods of the layer return
PyTorch's `[out, in]` weight convention.

    codes   Q  uint8 [K, N]   integer codes in [0, maxq]
    zeros   z  int   [G, N]   true (v2) zero points
    scales  s  float [G, N]
    g_idx      long  [K]      group of each input row
    P = A @ B  float [K, N]   exact integers in [-r, r]
    D          int8  [K, N]   code change in {-1, 0, +1}
    mu         float [G, N]   offset factor, in units of the scale
"""

from __future__ import annotations

import math

import torch

OFFSET_MODES = ("none", "float", "integer")


def init_ternary_A(in_features: int, r: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Kaiming-normal A, ternarised at 0.75 * mean|A| (spec section 2). Returns float32 [K, r]."""
    # Kaiming normal with fan_in = r (the same as nn.init.kaiming_normal_ on an [K, r] tensor).
    std = math.sqrt(2.0) / math.sqrt(r)
    a = torch.randn(in_features, r, generator=generator) * std
    thr = 0.75 * a.abs().mean()
    return (a > thr).float() - (a < -thr).float()


def delta_codes(P: torch.Tensor, codes: torch.Tensor, omega: int, maxq: int) -> torch.Tensor:
    """Threshold the integer product and apply the grid-edge rule: D in {-1, 0, +1}, int8.

    A step that would leave [0, maxq] is dropped (a mask, not a clamp after the add).
    """
    up = (P > omega) & (codes < maxq)
    down = (P < -omega) & (codes > 0)
    return up.to(torch.int8) - down.to(torch.int8)


def group_counts(g_idx: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Rows per group, float [G]."""
    return torch.bincount(g_idx, minlength=num_groups).to(torch.float32)


def group_mean(x: torch.Tensor, g_idx: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Mean over the rows of each group: [K, N] -> [G, N] (works with any g_idx, act-order included)."""
    out = torch.zeros(counts.numel(), x.shape[1], dtype=torch.float32, device=x.device)
    out.index_add_(0, g_idx, x.float())
    return out / counts.clamp_min(1)[:, None]


def offset_mu(P: torch.Tensor, D: torch.Tensor, omega: int, g_idx: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """mu = group mean of the part of P the threshold left over, divided by omega (the authors' code)."""
    return group_mean(P - omega * D.to(P.dtype), g_idx, counts) / omega


def shift_zeros(zeros: torch.Tensor, mu: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer offset: move each zero point by round(mu), kept inside the storable range.

    W = s * (Q - z + mu) ~ s * (Q - (z - round(mu))). The new zero point must stay storable in both
    GPTQ formats: v1 stores z - 1 (so z >= 1) and gptqmodel's v1 -> v2 load is a packed add (so
    z <= maxq). A zero point that already sits at 0 (v2 checkpoints) may stay there.
    """
    z = zeros.to(torch.int32)
    target = z - torch.round(mu).to(torch.int32)
    lo = torch.minimum(z, torch.ones_like(z))
    return torch.clamp(torch.maximum(target, lo), max=maxq)


def dequantize(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """`s[g] * (Q - z[g])` with the op order and dtypes of gptqmodel's TorchLinear.

    The integer difference is formed first and multiplied by the scales in their own dtype
    (fp16 for standard checkpoints), so a weight computed here is bit-identical to the one the
    stock kernel computes from the same codes: this is what makes the merged model's logits equal
    the adapter model's.
    """
    dtype = torch.int16  # holds Q - z for every width; int8 (gptqmodel's choice below 8 bits) gives the same values
    return scales[g_idx] * (codes.to(dtype) - zeros.to(dtype)[g_idx])


class LotaState:
    """What one forward needs of a GPTQ layer, read once per call from its (standard-layout) buffers."""

    __slots__ = ("codes", "zeros", "scales", "g_idx", "counts", "maxq", "bias")

    def __init__(self, codes, zeros, scales, g_idx, maxq, bias=None):
        self.codes, self.zeros, self.scales, self.g_idx = codes, zeros, scales, g_idx
        self.maxq, self.bias = maxq, bias
        self.counts = group_counts(g_idx, scales.shape[0])


def apply_adapters(state: LotaState, Ps, omegas, offset_modes):
    """Apply adapters in turn: returns (codes', zeros', mu_float or None, [D per adapter]).

    Each adapter's edge mask is taken against the codes left by the previous one, so applying
    adapters together and merging them one after the other give the same integers.
    """
    codes = state.codes
    zeros = state.zeros.to(torch.int32)
    mu_total = None
    deltas = []
    for P, omega, mode in zip(Ps, omegas, offset_modes):
        D = delta_codes(P, codes, omega, state.maxq)
        deltas.append(D)
        codes = (codes.to(torch.int16) + D).to(torch.uint8)
        if mode == "none":
            continue
        mu = offset_mu(P, D, omega, state.g_idx, state.counts)
        if mode == "integer":
            zeros = shift_zeros(zeros, mu, state.maxq)
        else:
            mu_total = mu if mu_total is None else mu_total + mu
    return codes, zeros, mu_total, deltas


def effective_weight(state: LotaState, codes, zeros, mu) -> torch.Tensor:
    """The adapted layer's weight [K, N]: exactly the stock dequantization when there is no float offset."""
    w = dequantize(codes, zeros, state.scales, state.g_idx)
    if mu is not None:
        w = w.float() + state.scales[state.g_idx].float() * mu[state.g_idx]
    return w


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on `x` runs in: the autocast dtype when autocast is on for x's device."""
    if x.is_floating_point() and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class LotaLinearFunction(torch.autograd.Function):
    """y = x @ W'(P_1..P_m) + bias, with straight-through gradients to each P.

    Forward stores only the adapted codes (uint8, one byte per weight) and the small zero/offset
    tensors, and rebuilds W' in backward: less than the dequantized weight that a LoRA layer on
    GPTQ keeps alive for its input gradient.

    Backward (spec section 2): the threshold and edge mask pass gradients through unchanged, so
    dL/dP = s[g] * dL/dW' (called G), plus, with an offset, the path through mu:
    mu[g] = mean_{k in g}(P - omega D)[k] / omega gives dL/dP[k] += sum_{k' in g} G[k'] / (omega |g|).
    """

    @staticmethod
    def forward(ctx, x, state: LotaState, omegas, offset_modes, *Ps):
        codes, zeros, mu, _ = apply_adapters(state, [P.detach() for P in Ps], omegas, offset_modes)
        # Under autocast the stock kernel's matmul runs in the autocast dtype; do the same explicitly,
        # so that backward (which autocast does not reach) uses the same dtype for all three matmuls.
        dtype = compute_dtype(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.to(dtype)
            out = torch.matmul(x, effective_weight(state, codes, zeros, mu).to(dtype))
            if state.bias is not None:
                out = out + state.bias.to(out.dtype)
        ctx.state, ctx.omegas, ctx.offset_modes = state, omegas, offset_modes
        ctx.save_for_backward(x, codes, zeros, *([mu] if mu is not None else []))  # x in the compute dtype
        ctx.has_mu = mu is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, codes, zeros, *rest = ctx.saved_tensors
        state = ctx.state
        grad_out = grad_out.to(x.dtype)
        w = effective_weight(state, codes, zeros, rest[0] if ctx.has_mu else None).to(x.dtype)
        grad_x = torch.matmul(grad_out, w.t()) if ctx.needs_input_grad[0] else None
        x2 = x.reshape(-1, x.shape[-1])
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        grad_w = torch.matmul(x2.t(), g2).float()  # dL/dW' [K, N]
        G = grad_w * state.scales[state.g_idx].float()
        grads_P = []
        group_sum = None
        for omega, mode in zip(ctx.omegas, ctx.offset_modes):
            if mode == "none":
                grads_P.append(G)
                continue
            if group_sum is None:
                group_sum = group_mean(G, state.g_idx, state.counts)  # = sum_{k in g} G / |g|
            grads_P.append(G + group_sum[state.g_idx] / omega)
        return (grad_x, None, None, None, *grads_P)


def lota_linear(x: torch.Tensor, state: LotaState, Ps, omegas, offset_modes) -> torch.Tensor:
    """Functional entry point; falls back to a plain (no-autograd-graph) path when nothing needs grad."""
    if torch.is_grad_enabled() and (x.requires_grad or any(P.requires_grad for P in Ps)):
        return LotaLinearFunction.apply(x, state, tuple(omegas), tuple(offset_modes), *Ps)
    codes, zeros, mu, _ = apply_adapters(state, Ps, omegas, offset_modes)
    w = effective_weight(state, codes, zeros, mu).to(x.dtype)
    out = torch.matmul(x, w)
    if state.bias is not None:
        out.add_(state.bias.to(out.dtype))
    return out
