"""LoTA-QAF's ternary adaptation as plain tensor functions (no PEFT, no nn.Module).

Notation of the LoTA-QAF paper (arXiv 2505.18724). Tensors are kept in the formats' own orientation, `[K, N]` =
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

from .. import numerics
from ..formats.base import QuantState, dequantize
from ..numerics import Scratch, adapted_weight, add_group_sums_, compute_dtype, input_grad, row_chunks

OFFSET_MODES = ("none", "float", "integer")


def is_ternary(t: torch.Tensor) -> bool:
    """Whether every entry is -1, 0 or 1."""
    return bool(((t == 0) | (t.abs() == 1)).all())


def init_ternary_A(in_features: int, r: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Kaiming-normal A, ternarised at 0.75 * mean|A| (LoTA-QAF, arXiv 2505.18724). Returns float32 [K, r]."""
    # Kaiming normal with fan_in = r (the same as nn.init.kaiming_normal_ on an [K, r] tensor).
    std = math.sqrt(2.0) / math.sqrt(r)
    a = torch.randn(in_features, r, generator=generator) * std
    thr = 0.75 * a.abs().mean()
    return (a > thr).float() - (a < -thr).float()


def delta_codes(P: torch.Tensor, codes: torch.Tensor, omega: int, maxq: int, max_step: int = 1) -> torch.Tensor:
    """Threshold the integer product and apply the grid-edge rule: D in {-max_step..max_step}, int8.

    The paper's rule (max_step 1): D = +1 where P > omega, -1 where P < -omega, and a step that would
    leave [0, maxq] is dropped (a mask, not a clamp after the add). Wider steps count the thresholds
    omega, 2 omega, ..., max_step * omega that |P| passes, and stop at the grid's edge.
    """
    if max_step == 1:
        up = (P > omega) & (codes < maxq)
        down = (P < -omega) & (codes > 0)
        return up.to(torch.int8) - down.to(torch.int8)
    passed = sum((P > i * omega).to(torch.int16) - (P < -i * omega).to(torch.int16) for i in range(1, max_step + 1))
    after = (codes.to(torch.int16) + passed).clamp(0, maxq)
    return (after - codes.to(torch.int16)).to(torch.int8)


def group_mean(x: torch.Tensor, g_idx: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Mean over the rows of each group: [K, N] -> [G, N] (works with any g_idx, act-order included)."""
    out = torch.zeros(counts.numel(), x.shape[1], dtype=torch.float32, device=x.device)
    out.index_add_(0, g_idx, x.float())
    return out / counts.clamp_min(1)[:, None]


def offset_mu(P: torch.Tensor, D: torch.Tensor, omega: int, g_idx: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """mu = group mean of the part of P the threshold left over, divided by omega (the authors' code)."""
    return group_mean(P - omega * D.to(P.dtype), g_idx, counts) / omega


def shift_zeros(zeros: torch.Tensor, mu: torch.Tensor, zero_range: tuple[int, int]) -> torch.Tensor:
    """Integer offset: move each zero point by round(mu), kept inside the range the format stores.

    W = s * (Q - z + mu) ~ s * (Q - (z - round(mu))). `zero_range` is the format's (QuantState.zero_range: GPTQ's
    classic checkpoints store z - 1, so [1, maxq]). A zero point that already sits below it (a GPTQ v2 checkpoint's
    0) may stay there.
    """
    lowest, highest = zero_range
    z = zeros.to(torch.int32)
    target = z - torch.round(mu).to(torch.int32)
    lo = torch.clamp(z, max=lowest)
    return torch.clamp(torch.maximum(target, lo), max=highest)


def apply_adapters(state: QuantState, Ps, omegas, offset_modes, max_steps=None):
    """Apply adapters in turn: returns (codes', zeros', mu_float or None, [D per adapter]).

    Each adapter's edge mask is taken against the codes left by the previous one, so applying
    adapters together and merging them one after the other give the same integers.
    """
    codes = state.codes
    zeros = state.zeros.to(torch.int32)
    mu_total = None
    deltas = []
    for P, omega, mode, k in zip(Ps, omegas, offset_modes, max_steps or [1] * len(Ps)):
        D = delta_codes(P, codes, omega, state.maxq, k)
        deltas.append(D)
        codes = (codes.to(torch.int16) + D).to(torch.uint8)
        if mode == "none":
            continue
        mu = offset_mu(P, D, omega, state.g_idx, state.counts)
        if mode == "integer":
            zeros = shift_zeros(zeros, mu, state.zero_range)
        else:
            mu_total = mu if mu_total is None else mu_total + mu
    return codes, zeros, mu_total, deltas


def effective_weight(state: QuantState, codes, zeros, mu) -> torch.Tensor:
    """The adapted layer's weight [K, N]: exactly the stock dequantization when there is no float offset."""
    w = dequantize(codes, zeros, state.scales, state.g_idx)
    if mu is not None:
        w = w.float() + state.scales[state.g_idx].float() * mu[state.g_idx]
    if state.offsets is not None:
        w = w + state.offsets[state.g_idx]
    return w


# ---- the fast path: row chunks ------------------------------------------------------------------
#
# Forward, backward and merge walk the rows in chunks (numerics.row_chunks), so that each chunk's
# temporaries (P, the step, the weight rows) stay in cache, and never materialise P or the weight
# gradient for a whole layer on CPU. They return the same integers and bit-identical weights as the
# reference functions above (tests/test_fast_path.py checks it); gradients agree up to float
# summation order.

def step_codes_(codes: torch.Tensor, P: torch.Tensor, omega: int, maxq: int, step=None,
                max_step: int = 1) -> torch.Tensor:
    """codes += D in place, with D = delta_codes(P, codes, omega, maxq, max_step), for integer-valued P.

    Overwrites P. For an integer P, clamp(P, +-(omega + 1)) / (omega + 1) is exactly +-1 where |P| > omega
    and strictly inside (-1, 1) elsewhere, so truncation to int8 is the thresholded step. A step is +-1,
    so clamping Q + step to [0, maxq] drops exactly the steps that would leave the grid: the edge
    rule. Three cheap in-place passes instead of two float comparisons and a mask. Wider steps:
    trunc((|P| - 1) / omega) (exact for integers) is the number of thresholds |P| passes.
    """
    if max_step == 1:
        P.clamp_(-(omega + 1), omega + 1).div_(omega + 1)
    else:
        sign = torch.sign(P)
        P.abs_().sub_(1).clamp_(min=0).div_(omega).trunc_().clamp_(max=max_step).mul_(sign)
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


def adapt_codes(state: QuantState, factors, omegas, offset_modes, max_steps=None):
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
    max_steps = max_steps or [1] * len(factors)
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
            for (A, B), omega, mode, k, can_move, B_cols, total in zip(factors, omegas, offset_modes, max_steps,
                                                                       movable, B_movable, sums):
                if mode == "none":
                    idx = torch.nonzero(can_move[0][k0:k1]).flatten()
                    cols = can_move[1]
                    if not len(idx) or not len(cols):
                        continue
                    if 2 * len(idx) * len(cols) < rows.numel():  # a small block: gather, step, scatter back
                        block = rows[idx][:, cols]
                        step_codes_(block, A[k0 + idx] @ B_cols, omega, state.maxq, max_step=k)
                        rows[idx[:, None], cols] = block
                        continue
                P = torch.mm(A[k0:k1], B, out=scratch("P", shape, torch.float32))
                step = scratch("step", shape, torch.int8)
                if mode == "none":
                    step_codes_(rows, P, omega, state.maxq, step, k)
                    continue
                D = scratch("D", shape, torch.int16).copy_(rows).neg_()
                step_codes_(rows, scratch("P2", shape, torch.float32).copy_(P), omega, state.maxq, step, k)
                D.add_(rows)  # codes after - codes before
                total.index_add_(0, state.g_idx[k0:k1], P.sub_(D, alpha=omega))  # R = P - omega * D (exact)
    zeros, mu = state.zeros.to(torch.int32), None
    for total, omega, mode in zip(sums, omegas, offset_modes):
        if mode == "none":
            continue
        step_mu = total / state.counts.clamp_min(1)[:, None] / omega  # = offset_mu: integer sums are exact
        if mode == "integer":
            zeros = shift_zeros(zeros, step_mu, state.zero_range)
        else:
            mu = step_mu if mu is None else mu + step_mu
    return codes, zeros, mu


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


def factor_grads(state: QuantState, x2: torch.Tensor, g2: torch.Tensor, factors, scale_steps=None,
                 offsets: bool = False) -> tuple:
    """The straight-through part of (dL/dA, dL/dB) for each adapter, in float32, and dL/ds and dL/dm if asked.

    dL/dP = G = s[g] * (x^T g), dL/dA = G B^T, dL/dB = A^T G. Two exact ways to compute them:
    - direct: form x^T g one row chunk at a time: M K N multiply-adds, plus 2 K N r per adapter;
    - factored (contiguous groups only): the scale is constant over a group's rows, so with
      U_g = x_g A_g [M, r] and H_g = g (s_g * B)^T [M, r], dL/dB = sum_g s_g * (U_g^T g) and
      dL/dA_g = x_g^T H_g: 2 M N r K / group_size, cheaper whenever r is small against the group size
      (r = 64, groups of 128: M K N instead of M K N (1 + 128 / M)).
    The two differ only in float summation order.

    scale_steps: (codes', zeros', mu) of the forward when the scales are trained. W' = s[g] * (Q' - z + mu),
    so dL/ds[g, n] = sum over the group's rows of (x^T g)[k, n] * (Q' - z + mu)[k, n]: that needs x^T g
    itself, so the direct path is taken. `offsets`: also dL/dm of a grid's float offsets (w = ... + m[g]), the
    group sums of x^T g (the direct path too). Returns (grads per adapter, dL/ds or None, dL/dm or None).
    """
    M, N = x2.shape[0], g2.shape[1]
    device, dtype = x2.device, x2.dtype
    s32, scratch = state.scales.float(), Scratch(device)
    grads = [(torch.zeros(A.shape, dtype=torch.float32, device=device),
              torch.zeros(B.shape, dtype=torch.float32, device=device)) for A, B in factors]
    gs = state.group_rows
    if scale_steps is None and not offsets and _factored_pays(state, [A.shape[1] for A, _ in factors], M):
        for (A, B), (dA, dB) in zip(factors, grads):
            r, n_groups = A.shape[1], s32.shape[0]
            per_chunk = max(1, 2 * numerics.CHUNK_ELEMENTS // (r * N)) if device.type == "cpu" else n_groups
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
        return grads, None, None
    d_scales = None
    d_offsets = torch.zeros(s32.shape, dtype=torch.float32, device=device) if offsets else None
    if scale_steps is not None:
        codes, zeros, mu = scale_steps
        zeros32, d_scales = zeros.float(), torch.zeros(s32.shape, dtype=torch.float32, device=device)
    for k0, k1 in row_chunks(state, N, device):
        G = torch.mm(x2[:, k0:k1].t(), g2, out=scratch("G", (k1 - k0, N), dtype))  # dL/dW' rows
        if dtype != torch.float32:
            G = scratch("G32", G.shape, torch.float32).copy_(G)
        s = state.group_blocks(s32, k0, k1)
        blocks = G.view(s.shape[0], -1, N)
        if d_scales is not None:  # sum over each group's rows of G * (Q' - z + mu)
            steps = scratch("steps", blocks.shape, torch.float32).copy_(codes[k0:k1].view(blocks.shape))
            steps.sub_(state.group_blocks(zeros32, k0, k1))
            if mu is not None:
                steps.add_(state.group_blocks(mu, k0, k1))
            add_group_sums_(d_scales, state, steps.mul_(blocks).sum(1), k0, k1)
        if d_offsets is not None:  # sum over each group's rows of G
            add_group_sums_(d_offsets, state, blocks.sum(1), k0, k1)
        blocks.mul_(s)
        for (A, B), (dA, dB) in zip(factors, grads):
            torch.mm(G, B.t(), out=dA[k0:k1])
            dB.addmm_(A[k0:k1].t(), G)
    return grads, d_scales, d_offsets


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
    """y = x @ W'(A_1 B_1, ..., A_m B_m; s) + bias, with straight-through gradients to each A_i, B_i (and s).

    Forward stores only the adapted codes (uint8, one byte per weight) and the small zero/offset
    tensors, and rebuilds W' in backward: less than the dequantized weight that a LoRA layer on a
    quantized base keeps alive for its input gradient.

    Backward (the paper's straight-through estimator): the threshold and edge mask pass gradients through unchanged, so
    dL/dP = s[g] * dL/dW' (factor_grads), plus, with an offset, the path through mu (add_offset_grads);
    then dL/dA = dL/dP @ B^T and dL/dB = A^T @ dL/dP. Neither dL/dW' nor dL/dP is held for a whole
    layer on CPU.

    `scales32` (optional, float32 [G, N]): trained scales. The forward uses them rounded to the dtype the
    checkpoint stores (what a merge writes), and their gradient passes that rounding straight through.
    `offsets32` (optional, float32 [G, N]): trained float offsets of a grid that stores them (GGUF's Q4_1 / Q5_1
    `m`), already rounded to the stored dtype; the weight adds them last, as the format does.
    `steps`: one (omega, offset mode, max_step) per adapter.
    """

    @staticmethod
    def forward(ctx, x, state: QuantState, steps, scales32, offsets32, *factors):
        pairs = list(zip(factors[0::2], factors[1::2]))
        if scales32 is not None:
            state = state.replace(scales=scales32.detach().to(state.scales.dtype))
        if offsets32 is not None:
            state = state.replace(offsets=offsets32.detach())
        omegas, modes, max_steps = zip(*steps)
        codes, zeros, mu = adapt_codes(state, pairs, omegas, modes, max_steps)
        # Under autocast the stock kernel's matmul runs in the autocast dtype; do the same explicitly,
        # so that backward (which autocast does not reach) uses the same dtype for all matmuls.
        dtype = compute_dtype(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.to(dtype)
            out = state.linear(x, adapted_weight(state, codes, zeros, mu, dtype), state.bias, codes=codes, zeros=zeros,
                               scales=state.scales)
        ctx.state, ctx.steps = state, steps
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
        first = 5  # index of the first factor among forward's inputs
        wanted = [i for i in range(len(rest) // 2) if needs[first + 2 * i] or needs[first + 1 + 2 * i]]
        factors = [(rest[2 * i].float(), rest[2 * i + 1].float()) for i in wanted]
        grads = [None] * len(rest)
        with torch.autocast(device_type=x.device.type, enabled=False):
            grad_x = input_grad(state, codes, zeros, mu, g2).view(x.shape) if needs[0] else None
            factor_g, d_scales, d_offsets = factor_grads(state, x2, g2, factors,
                                                         (codes, zeros, mu) if needs[3] else None, bool(needs[4]))
            for i, (A, B), (dA, dB) in zip(wanted, factors, factor_g):
                omega, mode, _ = ctx.steps[i]
                if mode != "none":
                    add_offset_grads(state, x2, g2, A, B, omega, dA, dB)
                grads[2 * i] = dA.to(rest[2 * i].dtype) if needs[first + 2 * i] else None
                grads[2 * i + 1] = dB.to(rest[2 * i + 1].dtype) if needs[first + 1 + 2 * i] else None
        return (grad_x, None, None, d_scales, d_offsets, *grads)


def lota_linear(x: torch.Tensor, state: QuantState, factors, steps, scales32=None, offsets32=None) -> torch.Tensor:
    """y = x @ W' + bias for adapters given as (A, B) pairs and their (omega, offset, max_step) steps.

    scales32: trained scales (float32), used rounded to the stored dtype; offsets32: trained float offsets (a grid
    that stores them), already rounded. No autograd graph when nothing needs a gradient.
    """
    flat = [t for pair in factors for t in pair]
    steps = tuple(tuple(step) for step in steps)
    inputs = [x, scales32, offsets32, *flat]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        return LotaLinearFunction.apply(x, state, steps, scales32, offsets32, *flat)
    if scales32 is not None:
        state = state.replace(scales=scales32.to(state.scales.dtype))
    if offsets32 is not None:
        state = state.replace(offsets=offsets32)
    omegas, modes, max_steps = zip(*steps)
    codes, zeros, mu = adapt_codes(state, factors, omegas, modes, max_steps)
    return state.linear(x, adapted_weight(state, codes, zeros, mu, x.dtype), state.bias, codes=codes, zeros=zeros,
                        scales=state.scales)
