"""The ternary maths of LoTA-QAF, checked against the spec with plain autograd as the reference."""

import pytest
import torch

from peft_lota.lota import ternary
from peft_lota.formats.base import QuantState, group_counts
from peft_lota.lota.ternary import lota_linear
from tiny_models import ternary_reference


def test_init_is_ternary_and_fresh_adapter_is_a_no_op():
    A = ternary.init_ternary_A(256, 16, torch.Generator().manual_seed(0))
    assert set(A.unique().tolist()) == {-1.0, 0.0, 1.0}
    assert 0.2 < (A != 0).float().mean() < 0.8
    P = A @ torch.zeros(16, 8)
    codes = torch.randint(0, 16, (256, 8), dtype=torch.uint8)
    assert not ternary.delta_codes(P, codes, 12, 15).any()


def test_threshold_and_grid_edge_rule():
    omega, maxq = 3, 3
    P = torch.tensor([[4.0, 4.0, 3.0, -4.0, -4.0, -3.0, 0.0]])
    Q = torch.tensor([[1, 3, 1, 1, 0, 1, 1]], dtype=torch.uint8)
    D = ternary.delta_codes(P, Q, omega, maxq)
    # strictly above omega moves up, unless already at maxq; strictly below -omega moves down, unless at 0
    assert D.tolist() == [[1, 0, 0, -1, 0, 0, 0]]
    assert D.dtype == torch.int8


def test_offset_mu_and_integer_shift():
    g_idx = torch.tensor([0, 0, 1, 1])
    counts = group_counts(g_idx, 2)
    P = torch.tensor([[5.0], [1.0], [-2.0], [-2.0]])
    D = torch.tensor([[1], [0], [0], [0]], dtype=torch.int8)
    mu = ternary.offset_mu(P, D, 4, g_idx, counts)
    # group 0: residuals (5 - 4, 1) -> mean 1 -> /omega 0.25; group 1: mean -2 -> -0.5
    assert torch.allclose(mu, torch.tensor([[0.25], [-0.5]]))
    zeros = torch.tensor([[1], [15]])
    shifted = ternary.shift_zeros(zeros, torch.tensor([[0.75], [-2.0]]), (1, 15))
    assert shifted.tolist() == [[1], [15]]  # kept inside [1, maxq]: 1 - 1 -> 0 is refused, 15 + 2 -> 17 too
    assert ternary.shift_zeros(torch.tensor([[0], [8]]), torch.tensor([[0.2], [2.6]]), (1, 15)).tolist() == [[0], [5]]


def _problem(offset, seed=0, K=64, N=24, G=4, bits=3, r=4):
    g = torch.Generator().manual_seed(seed)
    maxq = 2**bits - 1
    g_idx = torch.randperm(K, generator=g) % G  # act-order style grouping
    state = QuantState(
        codes=torch.randint(0, maxq + 1, (K, N), generator=g, dtype=torch.uint8),
        zeros=torch.randint(1, maxq + 1, (G, N), generator=g),
        scales=torch.rand(G, N, generator=g) * 0.1 + 0.01,  # fp32: the reference below works in fp32
        g_idx=g_idx, maxq=maxq, bias=torch.randn(N, generator=g), zero_range=(1, maxq),  # GPTQ's
    )
    A = torch.randint(-1, 2, (K, r), generator=g).float().requires_grad_()
    B = torch.randint(-1, 2, (r, N), generator=g).float().requires_grad_()
    x = torch.randn(10, K, generator=g, dtype=torch.float32).requires_grad_()
    return state, A, B, x





@pytest.mark.parametrize("offset", ternary.OFFSET_MODES)
def test_straight_through_gradients_match_reference(offset):
    omega = 1
    state, A, B, x = _problem(offset)
    y = lota_linear(x, state, [(A, B)], [(omega, offset, 1)])
    y_ref = ternary_reference(state, A, B, x, omega, offset)
    assert torch.allclose(y, y_ref, atol=1e-4)
    grad_out = torch.randn_like(y)
    gA, gB, gx = torch.autograd.grad(y, (A, B, x), grad_out)
    rA, rB, rx = torch.autograd.grad(y_ref, (A, B, x), grad_out)
    for got, ref in ((gA, rA), (gB, rB), (gx, rx)):
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4)
    assert gA.abs().sum() > 0 and gB.abs().sum() > 0


def test_no_grad_path_equals_autograd_path():
    state, A, B, x = _problem("float", seed=3)
    y = lota_linear(x, state, [(A, B)], [(2, "float", 1)])
    with torch.no_grad():
        y2 = lota_linear(x, state, [(A, B)], [(2, "float", 1)])
    assert torch.equal(y.detach(), y2)


def test_adapters_in_turn_equal_their_sequential_application():
    state, A, B, _ = _problem("none", seed=4)
    A2, B2 = torch.flip(A, (0,)).detach(), torch.flip(B, (1,)).detach()
    P1, P2 = (A @ B).detach(), A2 @ B2
    codes, _, _, (D1, D2) = ternary.apply_adapters(state, [P1, P2], [1, 1], ["none", "none"])
    step = ternary.delta_codes(P2, (state.codes.to(torch.int16) + D1).to(torch.uint8), 1, state.maxq)
    assert torch.equal(D2, step)
    assert torch.equal(codes.to(torch.int16), state.codes.to(torch.int16) + D1 + D2)
    assert int(codes.max()) <= state.maxq


def test_wide_steps_count_the_thresholds_passed_and_stop_at_the_grid_edge():
    P = torch.tensor([[-9.0, -7, -4, -3, 0, 3, 4, 6, 7, 12]])
    codes = torch.full_like(P, 5, dtype=torch.uint8)
    assert ternary.delta_codes(P, codes, 3, 15, max_step=1).tolist() == [[-1, -1, -1, 0, 0, 0, 1, 1, 1, 1]]
    assert ternary.delta_codes(P, codes, 3, 15, max_step=2).tolist() == [[-2, -2, -1, 0, 0, 0, 1, 1, 2, 2]]
    assert ternary.delta_codes(P, codes, 3, 15, max_step=3).tolist() == [[-2, -2, -1, 0, 0, 0, 1, 1, 2, 3]]
    edge = torch.tensor([[1, 14]], dtype=torch.uint8)  # two steps asked, one left to the edge: it moves one
    assert ternary.delta_codes(torch.tensor([[-7.0, 7]]), edge, 3, 15, max_step=2).tolist() == [[-1, 1]]


@pytest.mark.parametrize("offset", ternary.OFFSET_MODES)
@pytest.mark.parametrize("max_step", [1, 2])
def test_trained_scales_and_wide_steps_match_reference(offset, max_step):
    """Trained scales: the forward uses them rounded to the stored dtype (fp16 here), the gradient passes through."""
    state, A, B, x = _problem(offset, seed=5, r=6)
    state = state.replace(scales=state.scales.half())
    scales = (state.scales.float() * (1 + 0.1 * torch.randn(state.scales.shape,
                                                             generator=torch.Generator().manual_seed(2))))
    scales.requires_grad_()
    y = lota_linear(x, state, [(A, B)], [(1, offset, max_step)], scales)
    y_ref = ternary_reference(state, A, B, x, 1, offset, max_step, scales)
    # The forward also rounds each weight s * (Q - z) to fp16, as the stock kernel does; the reference does not.
    assert torch.allclose(y, y_ref, atol=2e-3)
    grad_out = torch.randn_like(y)
    got = torch.autograd.grad(y, (A, B, x, scales), grad_out)
    ref = torch.autograd.grad(y_ref, (A, B, x, scales), grad_out)
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, rtol=1e-3, atol=2e-3)
    assert got[3].abs().sum() > 0
