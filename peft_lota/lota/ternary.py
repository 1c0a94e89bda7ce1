"""LoTA-QAF's ternary adaptation as plain tensor functions (no PEFT, no nn.Module).

Notation follows ../shared/LOTA_SPEC.md. Tensors are kept in the formats' own orientation, `[K, N]` =
`[in_features, out_features]` (codes, zeros, scales, g_idx: formats/base.py), so the product `P = A @ B`
and the code change `D` line up with the codes without transposes; only the public `get_delta_*`
methods of the layer return PyTorch's `[out, in]` weight convention.

    P = A @ B  float [K, N]   exact integers in [-r, r]
    D          int8  [K, N]   code change in {-1, 0, +1}
    mu         float [G, N]   offset factor, in units of the scale

Two layers: reference functions written straight from the spec (delta_codes ... effective_weight; used
for get_delta_* and as the tests' oracle), and a chunked fast path (row_chunks ... LotaLinearFunction)
that forward, backward and merge use, equal to the reference bit for bit.
"""

from __future__ import annotations

import math

import torch

from ..formats.base import QuantState, dequantize

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


def apply_adapters(state: QuantState, Ps, omegas, offset_modes):
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


def effective_weight(state: QuantState, codes, zeros, mu) -> torch.Tensor:
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


# ---- the fast path: row chunks ------------------------------------------------------------------
#
# A layer's codes, P, D and weight are [K, N] tensors; on CPU, element-wise work over them is bound
# by memory traffic. The functions below walk the rows in chunks of about CHUNK_ELEMENTS elements, so
# that each chunk's temporaries (P, the step, the weight rows) stay in cache, and never materialise P
# or the weight gradient for a whole layer. They return the same integers and bit-identical weights
# as the reference functions above (tests/test_fast_path.py checks it); gradients agree up to float
# summation order. On accelerators a single chunk is used: there, kernel launches are the cost.

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


def step_codes_(codes: torch.Tensor, P: torch.Tensor, omega: int, maxq: int, step=None) -> torch.Tensor:
    """codes += D in place, with D = delta_codes(P, codes, omega, maxq), for integer-valued P. Overwrites P.

    For an integer P, clamp(P, +-(omega + 1)) / (omega + 1) is exactly +-1 where |P| > omega and
    strictly inside (-1, 1) elsewhere, so truncation to int8 is the thresholded step. A step is +-1,
    so clamping Q + step to [0, maxq] drops exactly the steps that would leave the grid: the edge
    rule. Three cheap in-place passes instead of two float comparisons and a mask.
    """
    P.clamp_(-(omega + 1), omega + 1).div_(omega + 1)
    step = P.to(torch.int8) if step is None else step.copy_(P)  # float -> int truncates toward zero
    if maxq < 127:  # codes fit int8: add in place
        codes.view(torch.int8).add_(step).clamp_(0, maxq)
    else:
        codes.copy_(codes.to(torch.int16).add_(step).clamp_(0, maxq))
    return codes


def _movable(A: torch.Tensor, B: torch.Tensor, omega: int):
    """Where a code may move: rows k and columns n that can have |P[k, n]| > omega. Returns (row mask, columns).

    |P[k, n]| <= min(sum_j |A[k, j]| * max|B|, sum_j |B[j, n]| * max|A|) for entries in [-1, 1]. With
    omega = 0.75 r, a ternary row or column needs more than 3/4 of its entries non-zero to pass: few do
    (about 6% of uniformly random ones), and none while B = 0 (a fresh adapter).
    """
    a, b = A.abs(), B.abs()
    rows = a.sum(1) * b.amax() > omega
    cols = torch.nonzero(b.sum(0) * a.amax() > omega).flatten()
    return rows, cols


def adapt_codes(state: QuantState, factors, omegas, offset_modes):
    """Apply adapters (A, B) in turn, one row chunk at a time: (codes' uint8 [K, N], zeros' int32, mu or None).

    The same integers as apply_adapters(state, [A @ B, ...], ...). With offset "none", P is computed
    only where a code can move (see _movable): not at all for a fresh adapter, on the block of
    movable rows and columns when it is small, else on the whole chunk. An offset needs P everywhere
    for its group means.
    """
    K, N, device = state.in_features, state.scales.shape[1], state.scales.device
    chunks = row_chunks(state, N, device)
    scratch = Scratch(device)
    codes = torch.empty(K, N, dtype=torch.uint8, device=device)
    factors = [(A.detach().float(), B.detach().float()) for A, B in factors]
    movable = [_movable(A, B, omega) if mode == "none" else None
               for (A, B), omega, mode in zip(factors, omegas, offset_modes)]
    B_movable = [None if m is None else B[:, m[1]] for (A, B), m in zip(factors, movable)]
    sums = [None if mode == "none" else torch.zeros(state.scales.shape, dtype=torch.float32, device=device)
            for mode in offset_modes]
    with torch.autocast(device_type=device.type, enabled=False):  # P in float32: exact integers
        for k0, k1 in chunks:
            rows = codes[k0:k1]
            rows.copy_(state.codes_rows(k0, k1))
            shape = (k1 - k0, N)
            for (A, B), omega, mode, can_move, B_cols, total in zip(factors, omegas, offset_modes, movable,
                                                                    B_movable, sums):
                if mode == "none":
                    idx = torch.nonzero(can_move[0][k0:k1]).flatten()
                    cols = can_move[1]
                    if not len(idx) or not len(cols):
                        continue
                    if 2 * len(idx) * len(cols) < rows.numel():  # a small block: gather, step, scatter back
                        block = rows[idx][:, cols]
                        step_codes_(block, A[k0 + idx] @ B_cols, omega, state.maxq)
                        rows[idx[:, None], cols] = block
                        continue
                P = torch.mm(A[k0:k1], B, out=scratch("P", shape, torch.float32))
                step = scratch("step", shape, torch.int8)
                if mode == "none":
                    step_codes_(rows, P, omega, state.maxq, step)
                    continue
                D = scratch("D", shape, torch.int16).copy_(rows).neg_()
                step_codes_(rows, scratch("P2", shape, torch.float32).copy_(P), omega, state.maxq, step)
                D.add_(rows)  # codes after - codes before
                total.index_add_(0, state.g_idx[k0:k1], P.sub_(D, alpha=omega))  # R = P - omega * D (exact)
    zeros, mu = state.zeros.to(torch.int32), None
    for total, omega, mode in zip(sums, omegas, offset_modes):
        if mode == "none":
            continue
        step_mu = total / state.counts.clamp_min(1)[:, None] / omega  # = offset_mu: integer sums are exact
        if mode == "integer":
            zeros = shift_zeros(zeros, step_mu, state.maxq)
        else:
            mu = step_mu if mu is None else mu + step_mu
    return codes, zeros, mu


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


FACTORED_MARGIN = 0.85


def _factored_pays(state: QuantState, ranks, tokens: int) -> bool:
    """Whether the per-group factored gradient costs fewer multiply-adds than forming G (see factor_grads).

    Per adapter of rank r, G costs M K N (shared) + 2 K N r, the factored form 2 M N r K / group_size.
    """
    gs = state.group_rows
    if gs is None:
        return False
    # Measured on CPU, the factored form's small batched matmuls run ~20% less efficiently: ask for a margin.
    return sum(2 * r / gs for r in ranks) < FACTORED_MARGIN * (1 + sum(2 * r / tokens for r in ranks))


def factor_grads(state: QuantState, x2: torch.Tensor, g2: torch.Tensor, factors) -> list:
    """The straight-through part of (dL/dA, dL/dB) for each adapter, in float32.

    dL/dP = G = s[g] * (x^T g), dL/dA = G B^T, dL/dB = A^T G. Two exact ways to compute them:
    - direct: form G one row chunk at a time: M K N multiply-adds, plus 2 K N r per adapter;
    - factored (contiguous groups only): the scale is constant over a group's rows, so with
      U_g = x_g A_g [M, r] and H_g = g (s_g * B)^T [M, r], dL/dB = sum_g s_g * (U_g^T g) and
      dL/dA_g = x_g^T H_g: 2 M N r K / group_size, cheaper whenever r is small against the group size
      (r = 64, groups of 128: M K N instead of M K N (1 + 128 / M)).
    The two differ only in float summation order.
    """
    M, N = x2.shape[0], g2.shape[1]
    device, dtype = x2.device, x2.dtype
    s32, scratch = state.scales.float(), Scratch(device)
    grads = [(torch.zeros(A.shape, dtype=torch.float32, device=device),
              torch.zeros(B.shape, dtype=torch.float32, device=device)) for A, B in factors]
    gs = state.group_rows
    if _factored_pays(state, [A.shape[1] for A, _ in factors], M):
        for (A, B), (dA, dB) in zip(factors, grads):
            r, n_groups = A.shape[1], s32.shape[0]
            per_chunk = max(1, 2 * CHUNK_ELEMENTS // (r * N)) if device.type == "cpu" else n_groups
            A_c, B32 = A.to(dtype), B.float()
            for g0 in range(0, n_groups, per_chunk):
                g1 = min(g0 + per_chunk, n_groups)
                nb, k0, k1 = g1 - g0, g0 * gs, g1 * gs
                xb = x2[:, k0:k1].reshape(M, nb, gs).transpose(0, 1)  # [groups, M, gs]
                U = torch.bmm(xb, A_c[k0:k1].view(nb, gs, r))  # x_g A_g: [groups, M, r]
                T = torch.mm(U.transpose(0, 1).reshape(M, nb * r).t(), g2, out=scratch("T", (nb * r, N), dtype))
                s = s32[g0:g1].unsqueeze(1)
                T32 = T if dtype == torch.float32 else scratch("T32", T.shape, torch.float32).copy_(T)
                dB.add_(T32.view(nb, r, N).mul_(s).sum(0))  # sum_g s_g * (U_g^T g)
                SB = scratch("SB", (nb, r, N), dtype).copy_(s * B32)  # s_g * B
                H = g2 @ SB.view(nb * r, N).t()  # g (s_g * B)^T: [M, groups * r]
                dA[k0:k1] = torch.bmm(xb.transpose(1, 2), H.view(M, nb, r).transpose(0, 1)).view(nb * gs, r)
        return grads
    for k0, k1 in row_chunks(state, N, device):
        G = torch.mm(x2[:, k0:k1].t(), g2, out=scratch("G", (k1 - k0, N), dtype))  # dL/dW' rows
        if dtype != torch.float32:
            G = scratch("G32", G.shape, torch.float32).copy_(G)
        s = state.group_blocks(s32, k0, k1)
        G.view(s.shape[0], -1, N).mul_(s)
        for (A, B), (dA, dB) in zip(factors, grads):
            torch.mm(G, B.t(), out=dA[k0:k1])
            dB.addmm_(A[k0:k1].t(), G)
    return grads


def add_offset_grads(state: QuantState, x2: torch.Tensor, g2: torch.Tensor, A, B, omega: int, dA, dB) -> None:
    """The gradient that reaches P through the offset mu, added in place to (dA, dB).

    mu[g] = mean_{k in g}(P - omega D)[k] / omega, so dL/dP[k] gains E[g(k)] = mean_{k' in g} G[k'] / omega,
    one row per group: dL/dA[k] += E[g(k)] B^T and dL/dB += (sum_{k in g} A[k])^T E[g]. The group means
    of G = s * x^T g need only x summed over each group's columns.
    """
    x_groups = torch.zeros(x2.shape[0], state.scales.shape[0], device=x2.device).index_add_(1, state.g_idx, x2.float())
    E = (x_groups.t() @ g2.float()) * state.scales.float() / state.counts.clamp_min(1)[:, None] / omega
    dA.add_((E @ B.t())[state.g_idx])
    A_groups = torch.zeros(E.shape[0], A.shape[1], device=A.device).index_add_(0, state.g_idx, A)
    dB.add_(A_groups.t() @ E)


class LotaLinearFunction(torch.autograd.Function):
    """y = x @ W'(A_1 B_1, ..., A_m B_m) + bias, with straight-through gradients to each A_i, B_i.

    Forward stores only the adapted codes (uint8, one byte per weight) and the small zero/offset
    tensors, and rebuilds W' in backward: less than the dequantized weight that a LoRA layer on
    GPTQ keeps alive for its input gradient.

    Backward (spec section 2): the threshold and edge mask pass gradients through unchanged, so
    dL/dP = s[g] * dL/dW' (factor_grads), plus, with an offset, the path through mu (add_offset_grads);
    then dL/dA = dL/dP @ B^T and dL/dB = A^T @ dL/dP. Neither dL/dW' nor dL/dP is held for a whole
    layer on CPU.
    """

    @staticmethod
    def forward(ctx, x, state: QuantState, omegas, offset_modes, *factors):
        pairs = list(zip(factors[0::2], factors[1::2]))
        codes, zeros, mu = adapt_codes(state, pairs, omegas, offset_modes)
        # Under autocast the stock kernel's matmul runs in the autocast dtype; do the same explicitly,
        # so that backward (which autocast does not reach) uses the same dtype for all matmuls.
        dtype = compute_dtype(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.to(dtype)
            out = torch.matmul(x, adapted_weight(state, codes, zeros, mu, dtype))
            if state.bias is not None:
                out = out + state.bias.to(out.dtype)
        ctx.state, ctx.omegas, ctx.offset_modes = state, omegas, offset_modes
        ctx.has_mu = mu is not None
        ctx.save_for_backward(x, codes, zeros, *([mu] if ctx.has_mu else []), *factors)  # x in the compute dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, codes, zeros, *rest = ctx.saved_tensors
        mu = rest.pop(0) if ctx.has_mu else None
        state, (K, N) = ctx.state, codes.shape
        x2, g2 = x.reshape(-1, K), grad_out.to(x.dtype).reshape(-1, N)
        needs = ctx.needs_input_grad
        wanted = [i for i in range(len(rest) // 2) if needs[4 + 2 * i] or needs[5 + 2 * i]]
        factors = [(rest[2 * i].float(), rest[2 * i + 1].float()) for i in wanted]
        grads = [None] * len(rest)
        with torch.autocast(device_type=x.device.type, enabled=False):
            grad_x = input_grad(state, codes, zeros, mu, g2).view(x.shape) if needs[0] else None
            for i, (A, B), (dA, dB) in zip(wanted, factors, factor_grads(state, x2, g2, factors)):
                if ctx.offset_modes[i] != "none":
                    add_offset_grads(state, x2, g2, A, B, ctx.omegas[i], dA, dB)
                grads[2 * i] = dA.to(rest[2 * i].dtype) if needs[4 + 2 * i] else None
                grads[2 * i + 1] = dB.to(rest[2 * i + 1].dtype) if needs[5 + 2 * i] else None
        return (grad_x, None, None, None, *grads)


def lota_linear(x: torch.Tensor, state: QuantState, factors, omegas, offset_modes) -> torch.Tensor:
    """y = x @ W' + bias for adapters given as (A, B) pairs; no autograd graph when nothing needs grad."""
    flat = [t for pair in factors for t in pair]
    if torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in flat)):
        return LotaLinearFunction.apply(x, state, tuple(omegas), tuple(offset_modes), *flat)
    codes, zeros, mu = adapt_codes(state, factors, omegas, offset_modes)
    out = torch.matmul(x, adapted_weight(state, codes, zeros, mu, x.dtype))
    if state.bias is not None:
        out.add_(state.bias.to(out.dtype))
    return out
