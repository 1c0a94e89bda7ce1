"""A target weight rounded onto a fixed quantization grid with GPTQ's error feedback, and that grid's scales refit:
the maths of `merge_lora`, as pure functions.

Orientation as in formats/base.py: W [K, N], rows k = input features (GPTQ's "columns"), row k in group g_idx[k],
weight s[g, n] * (Q[k, n] - z[g, n]). The grid (scales s, zero points z) is given; the codes Q are chosen.

Why feedback: a layer's output error on inputs X is (W - W_q)^T x, whose mean square over the calibration tokens is
tr(E^T H E), E = W - W_q, H = X^T X / tokens. Rounding each row to its nearest code ignores H; GPTQ (Frantar et
al. 2022, arXiv 2210.17323, Algorithm 1) rounds the rows one at a time and moves each row's rounding error onto
the rows not yet rounded, weighted by the inverse Hessian, so that they compensate it. A LoRA update is mostly
smaller than half a step: rounded to the nearest code it changes almost nothing, while with feedback the parts of
it that no single code can hold add up until some codes move (Nagel et al., AdaRound, make the same point).

Trained scales: with the codes fixed, W_q is linear in the scales, and tr(E^T H E) is minimised over them exactly
(coordinate descent over groups, each step a closed-form line search), then rounded to the dtype stored.
"""

from __future__ import annotations

import torch


def add_to_hessian(H: torch.Tensor, x: torch.Tensor) -> int:
    """H += x^T x over every token of x [..., K] (float32); returns the number of tokens added."""
    x2 = x.reshape(-1, x.shape[-1]).to(torch.float32)
    H.addmm_(x2.t(), x2)
    return x2.shape[0]


def damped(H: torch.Tensor, damp: float) -> torch.Tensor:
    """H with inputs never seen (zero diagonal) given a unit diagonal, plus damp * mean(diagonal) on the diagonal:
    GPTQ's regularisation, which keeps H invertible and the feedback from overshooting."""
    H = H.clone()
    d = H.diagonal()
    d[d == 0] = 1.0
    d.add_(damp * float(d.mean()))
    return H


def inverse_factor(H: torch.Tensor, damp: float) -> torch.Tensor:
    """The upper Cholesky factor of (damped H)^-1; the damping grows tenfold until the factorisation succeeds."""
    for _ in range(6):
        try:
            L = torch.linalg.cholesky(damped(H, damp))
            return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
        except RuntimeError:  # torch.linalg.LinAlgError: not positive definite at this damping
            damp *= 10
    raise ValueError("the layer's input Hessian stays singular after damping: its calibration inputs hold NaN or "
                     "infinity, or are all zero.")


def stored_weight(codes: torch.Tensor, zeros32: torch.Tensor, scales32: torch.Tensor, dtype: torch.dtype
                  ) -> torch.Tensor:
    """s * (q - z) in float32, rounded to the scales' stored dtype as the kernel computes it, back in float32.

    `codes`, `zeros32`, `scales32`: one row each (or rows of the same groups), all float32."""
    return (scales32 * (codes - zeros32)).to(dtype).float()


def feedback_order(H: torch.Tensor, damp: float, act_order: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(the order rows are rounded in, the upper Cholesky factor of the damped inverse Hessian in that order)."""
    K = H.shape[0]
    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else torch.arange(K, device=H.device)
    return perm, inverse_factor(H[perm][:, perm], damp)


def round_with_feedback(target: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
                        maxq: int, H: torch.Tensor, *, damp: float = 0.01, block: int = 128,
                        act_order: bool = True, order=None) -> torch.Tensor:
    """Codes uint8 [K, N] on the grid (scales, zeros [G, N], g_idx [K]) whose weight is closest to `target` [K, N]
    in the output error tr(E^T H E), found row by row with GPTQ's error feedback.

    act_order: round the rows of largest H[k, k] (the most active inputs) first, GPTQ's "act-order" heuristic.
    It is only an order of work: each row keeps its own group (g_idx), so the grid is untouched.
    order: (perm, U) from feedback_order(H, damp, act_order), when the caller rounds several times with one H."""
    K, N = target.shape
    perm, U = order if order is not None else feedback_order(H, damp, act_order)
    W = target.to(torch.float32)[perm]  # a copy: rows are updated in place below
    s32, z32 = scales.float()[g_idx[perm]], zeros.float()[g_idx[perm]]  # [K, N] (the grid of each row, permuted)
    codes = torch.empty(K, N, dtype=torch.float32, device=target.device)
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1, U1, errors = W[i1:i2], U[i1:i2, i1:i2], torch.empty(i2 - i1, N, device=target.device)
        for i in range(i2 - i1):
            w, s, z = W1[i], s32[i1 + i], z32[i1 + i]
            q = torch.clamp(torch.round(torch.where(s != 0, w / s, 0.0)) + z, 0, maxq)
            err = (w - stored_weight(q, z, s, scales.dtype)) / U1[i, i]
            W1[i + 1:].addr_(U1[i, i + 1:], err, alpha=-1.0)
            errors[i], codes[i1 + i] = err, q
        W[i2:].addmm_(U[i1:i2, i2:].t(), errors, alpha=-1.0)
    out = torch.empty(K, N, dtype=torch.uint8, device=target.device)
    out[perm] = codes.to(torch.uint8)
    return out


def group_rows(g_idx: torch.Tensor, num_groups: int) -> list:
    """The rows of each group: a slice where they are contiguous, else an index tensor (act-order)."""
    rows = []
    for g in range(num_groups):
        idx = torch.nonzero(g_idx == g).squeeze(1)
        contiguous = idx.numel() and int(idx[-1]) - int(idx[0]) + 1 == idx.numel()
        rows.append(slice(int(idx[0]), int(idx[-1]) + 1) if contiguous else idx)
    return rows


def output_error(target: torch.Tensor, weight: torch.Tensor, H: torch.Tensor) -> float:
    """tr(E^T H E) with E = target - weight ([K, N]): the mean squared output error on the calibration inputs,
    summed over the outputs."""
    E = target.float() - weight.float()
    return float((E * (H @ E)).sum())


def refit_scales(target: torch.Tensor, codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
                 g_idx: torch.Tensor, H: torch.Tensor, *, damp: float = 0.01, sweeps: int = 2,
                 max_change: float = 0.5) -> torch.Tensor:
    """Scales [G, N] (in the stored dtype) that minimise tr(E^T H E) for these codes, E = target - s (q - z).

    Coordinate descent over the groups, all output columns at once: for group g the best scale given the others is
    closed-form, s_g += c_g^T (H R)_g / (c_g^T H_gg c_g), with c = q - z and R = target - W_q (kept as H R, updated
    after each group). A column whose codes in a group all sit on the zero point has no say over that scale: it keeps
    its own. A scale is kept where its new value would change sign, overflow the stored dtype, or move by more than
    max_change of itself (such a fit rests on too few inputs to trust).
    """
    dtype, G = scales.dtype, scales.shape[0]
    Hd = damped(H, damp)
    c = codes.float() - zeros.float()[g_idx]
    s = scales.float().clone()
    HR = Hd @ (target.float() - c * s[g_idx])
    rows = group_rows(g_idx, G)
    for _ in range(sweeps):
        for g, idx in enumerate(rows):
            cg = c[idx]
            Hcol = Hd[:, idx]
            denom = (cg * (Hcol[idx] @ cg)).sum(0)
            step = torch.where(denom > 0, (cg * HR[idx]).sum(0) / denom.clamp_min(1e-30), 0.0)
            new = s[g] + step
            ok = torch.isfinite(new) & (new * s[g] > 0) & ((new - scales[g].float()).abs()
                                                            <= max_change * scales[g].float().abs())
            step = torch.where(ok, step, 0.0)
            s[g] += step
            HR.addmm_(Hcol, cg * step, alpha=-1.0)
    new = s.to(dtype)
    bad = ~torch.isfinite(new.float()) | (new.float() * scales.float() <= 0)
    return torch.where(bad, scales, new)


def merge_onto_grid(target: torch.Tensor, base_codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
                    g_idx: torch.Tensor, maxq: int, H: torch.Tensor, *, train_scales: bool = False, rounds: int = 2,
                    damp: float = 0.01, act_order: bool = True) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(codes uint8 [K, N], scales [G, N], report): `target` [K, N] on the grid, codes by error feedback, and with
    train_scales the scales refit too, alternating `rounds` times; the best of the candidates in tr(E^T H E) wins.

    report: the output error of the base codes (no merge), of nearest rounding, and of the result, each relative to
    the base's (1.0: the update is lost; 0.0: it is held exactly)."""
    def error(codes, s):
        return output_error(target, stored_weight(codes.float(), zeros.float()[g_idx], s.float()[g_idx], s.dtype), H)

    base_err = error(base_codes, scales)
    nearest = nearest_codes(target, zeros, scales, g_idx, maxq)
    candidates = [(error(nearest, scales), nearest, scales)]
    s = scales
    order = feedback_order(H, damp, act_order)  # one factorisation for every round: H does not change
    for _ in range(max(1, rounds) if train_scales else 1):
        codes = round_with_feedback(target, s, zeros, g_idx, maxq, H, order=order)
        candidates.append((error(codes, s), codes, s))
        if not train_scales:
            break
        s = refit_scales(target, codes, zeros, s, g_idx, H, damp=damp)
        candidates.append((error(codes, s), codes, s))
    best, codes, s = min(candidates, key=lambda c: c[0])
    rel = (lambda e: e / base_err) if base_err > 0 else (lambda e: 0.0)
    report = {"error_nearest": rel(candidates[0][0]), "error": rel(best),
              "codes_moved": int((codes != base_codes).sum()), "scales_changed": int((s != scales).sum())}
    return codes, s, report


def nearest_codes(weight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                  maxq: int) -> torch.Tensor:
    """Each weight of [K, N] rounded to its nearest code on the grid, alone (no feedback)."""
    s32, z32 = scales.float()[g_idx], zeros.float()[g_idx]
    return torch.clamp(torch.round(torch.where(s32 != 0, weight.float() / s32, 0.0)) + z32, 0, maxq).to(torch.uint8)
