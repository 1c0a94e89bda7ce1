"""The chunked fast path of ternary.py against the reference functions: same integers, bit-identical weights.

Chunks are forced small (CHUNK_ELEMENTS) so that every layout is cut into many row chunks: contiguous
groups (chunks holding whole groups, and chunks inside one group), act-order groups, one group.
"""

import itertools
import math

import pytest
import torch

from peft_lota.formats import gptq
from peft_lota import numerics
from peft_lota.lota import ternary
from peft_lota.formats.base import QuantState
from tiny_models import ternary_reference


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(numerics, "CHUNK_ELEMENTS", 256)


def make_state(layout: str, bits: int = 4, K: int = 256, N: int = 24, seed: int = 0, packed: bool = True,
               scales_dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    maxq = 2**bits - 1
    if layout == "contiguous":
        g_idx, G = torch.arange(K) // 32, K // 32
    elif layout == "act-order":
        G = K // 32
        g_idx = torch.randperm(K, generator=g) % G
    else:  # one group
        g_idx, G = torch.zeros(K, dtype=torch.long), 1
    codes = torch.randint(0, maxq + 1, (K, N), generator=g, dtype=torch.uint8)
    codes[:3] = 0  # grid edges, where the edge rule drops steps
    codes[3:6] = maxq
    zeros = torch.randint(0, maxq + 1, (G, N), generator=g)
    scales = (torch.rand(G, N, generator=g) * 0.1 + 1e-3).to(scales_dtype)
    bias = torch.randn(N, generator=g)
    if not packed:
        return QuantState(codes, zeros, scales, g_idx, maxq, bias)
    qweight = gptq.pack_qweight(codes, bits)
    return QuantState(None, zeros, scales, g_idx, maxq, bias, in_features=K, row_align=32 // math.gcd(bits, 32),
                     codes_rows=lambda k0, k1: gptq.unpack_qweight(qweight[k0 * bits // 32: k1 * bits // 32], bits))


def factors(K, N, r, seed, dense_rows=None):
    g = torch.Generator().manual_seed(seed)
    A = torch.randint(-1, 2, (K, r), generator=g).float()
    B = torch.randint(-1, 2, (r, N), generator=g).float()
    if dense_rows is not None:  # rows that can reach omega; the others cannot (their chunks are skipped)
        A.zero_()
        A[dense_rows] = torch.randint(0, 2, (len(dense_rows), r), generator=g).float() * 2 - 1
        B = torch.randint(0, 2, (r, N), generator=g).float() * 2 - 1
    return A, B


def test_step_codes_is_delta_codes_on_every_input():
    for maxq, r in ((3, 4), (7, 8), (15, 64), (255, 16)):
        for omega, k in itertools.product(sorted({1, r // 2, r - 1}), (1, 2, 3)):
            P, Q = torch.meshgrid(torch.arange(-r, r + 1), torch.arange(maxq + 1), indexing="ij")
            P, Q = P.float(), Q.to(torch.uint8).contiguous()
            expected = Q.to(torch.int16) + ternary.delta_codes(P, Q, omega, maxq, k)
            got = ternary.step_codes_(Q.clone(), P.clone(), omega, maxq, max_step=k)
            assert torch.equal(got.to(torch.int16), expected), (maxq, omega, k)


def test_row_chunks_cover_rows_in_whole_words_and_groups():
    for layout, bits in itertools.product(("contiguous", "act-order", "one"), (2, 3, 4, 8)):
        state = make_state(layout, bits)
        chunks = numerics.row_chunks(state, 24, torch.device("cpu"))
        assert len(chunks) > 1 and chunks[0][0] == 0 and chunks[-1][1] == 256
        assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
        for k0, k1 in chunks:
            assert k0 % state.row_align == 0
            blocks = state.group_blocks(state.scales, k0, k1)  # raises if a chunk straddles groups
            assert blocks.shape[0] * ((k1 - k0) // blocks.shape[0]) == k1 - k0


@pytest.mark.parametrize("layout", ["contiguous", "act-order", "one"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_adapt_codes_equals_apply_adapters(layout, bits):
    state = make_state(layout, bits, seed=bits)
    K, N = 256, 24
    for modes in (["none"], ["integer"], ["float"], ["none", "integer"], ["float", "float"]):
        fs = [factors(K, N, 4, seed=i) for i in range(len(modes))]
        omegas = [1] * len(modes)
        ref_codes, ref_zeros, ref_mu, _ = ternary.apply_adapters(state, [A @ B for A, B in fs], omegas, modes)
        codes, zeros, mu = ternary.adapt_codes(state, fs, omegas, modes)
        assert (codes != state.codes).any()
        assert torch.equal(codes, ref_codes) and torch.equal(zeros, ref_zeros.to(torch.int32))
        assert (mu is None and ref_mu is None) or torch.equal(mu, ref_mu)
        for dtype in (torch.float32, torch.bfloat16):
            expected = ternary.effective_weight(state, ref_codes, ref_zeros, ref_mu).to(dtype)
            assert torch.equal(numerics.adapted_weight(state, codes, zeros, mu, dtype), expected)


def test_chunks_that_cannot_move_are_skipped_and_still_exact(monkeypatch):
    state = make_state("contiguous")
    K, N, r, omega = 256, 24, 8, 6
    A, B = factors(K, N, r, seed=0, dense_rows=[5, 200])
    B[:, 0], B[:, 1] = A[200], -A[200]  # P = +-8 there: row 200 moves up or down
    B[:4, 20:] = 0  # columns 20.. cannot reach omega: only the block of rows 5, 200 x columns 0..19 is computed
    calls = []
    real_step = ternary.step_codes_
    monkeypatch.setattr(ternary, "step_codes_", lambda *a, **k: calls.append(1) or real_step(*a, **k))
    codes, _, _ = ternary.adapt_codes(state, [(A, B)], [omega], ["none"])
    chunks = numerics.row_chunks(state, N, torch.device("cpu"))
    assert len(calls) == 2 < len(chunks)  # only the chunks holding rows 5 and 200
    ref, _, _, (D,) = ternary.apply_adapters(state, [A @ B], [omega], ["none"])
    assert D.any() and torch.equal(codes, ref)
    calls.clear()
    fresh = ternary.adapt_codes(state, [(A, torch.zeros_like(B))], [omega], ["none"])[0]
    assert not calls and torch.equal(fresh, state.codes)


@pytest.mark.parametrize("layout", ["contiguous", "act-order", "one"])
@pytest.mark.parametrize("offset", ternary.OFFSET_MODES)
@pytest.mark.parametrize("factored", [False, True])
def test_forward_is_bit_exact_and_gradients_match_reference(layout, offset, factored, monkeypatch):
    if factored and layout == "act-order":
        pytest.skip("the factored gradient needs contiguous groups")
    monkeypatch.setattr(ternary, "_factored_pays", lambda *a: factored)
    state = make_state(layout, bits=3, seed=7, packed=True, scales_dtype=torch.float32)
    K, N, r, omega = 256, 24, 4, 1
    A, B = (t.requires_grad_() for t in factors(K, N, r, seed=3))
    x = torch.randn(2, 5, K, generator=torch.Generator().manual_seed(1), requires_grad=True)
    y = ternary.lota_linear(x, state, [(A, B)], [(omega, offset, 1)])
    codes, zeros, mu, _ = ternary.apply_adapters(state, [(A @ B).detach()], [omega], [offset])
    w = ternary.effective_weight(state, codes, zeros, mu)
    assert torch.equal(y, torch.matmul(x, w) + state.bias)  # forward: the reference weight, bit for bit
    ref_state = QuantState(state.codes, state.zeros, state.scales, state.g_idx, state.maxq, state.bias)
    y_ref = ternary_reference(ref_state, A, B, x, omega, offset)
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, (A, B, x), grad)
    ref = torch.autograd.grad(y_ref, (A, B, x), grad)
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", ["contiguous", "act-order", "one"])
def test_trained_scales_forward_is_bit_exact_and_gradients_match_reference(layout):
    state = make_state(layout, bits=3, seed=8, packed=True)  # fp16 scales, as GPTQ stores them
    K, N, r = 256, 24, 4
    A, B = (t.requires_grad_() for t in factors(K, N, r, seed=4))
    scales = (state.scales.float() * 1.05).requires_grad_()
    x = torch.randn(7, K, generator=torch.Generator().manual_seed(3), requires_grad=True)
    y = ternary.lota_linear(x, state, [(A, B)], [(1, "integer", 2)], scales)
    codes, zeros, mu, _ = ternary.apply_adapters(state, [(A @ B).detach()], [1], ["integer"], [2])
    rounded = state.replace(scales=scales.detach().half())
    w = ternary.effective_weight(rounded, codes, zeros, mu)
    assert torch.equal(y, torch.matmul(x, w.float()) + state.bias)  # what a merge writes, bit for bit
    ref_state = QuantState(state.codes, state.zeros, state.scales, state.g_idx, state.maxq, state.bias)
    y_ref = ternary_reference(ref_state, A, B, x, 1, "integer", 2, scales)
    grad = torch.randn_like(y)
    got, ref = torch.autograd.grad(y, (A, B, x, scales), grad), torch.autograd.grad(y_ref, (A, B, x, scales), grad)
    for a, b in zip(got, ref):  # the forward's weights are rounded to fp16, the reference's are not
        assert torch.allclose(a, b, rtol=1e-3, atol=2e-3)
    assert got[3].abs().sum() > 0


def test_two_adapters_get_their_own_gradients_in_both_paths(monkeypatch):
    state = make_state("contiguous", seed=2, scales_dtype=torch.float32)
    K, N = 256, 24
    (A1, B1), (A2, B2) = factors(K, N, 4, seed=1), factors(K, N, 8, seed=2)
    for t in (A1, B1, A2, B2):
        t.requires_grad_()
    x = torch.randn(6, K, generator=torch.Generator().manual_seed(0))
    results = []
    for factored in (False, True):
        monkeypatch.setattr(ternary, "_factored_pays", lambda *a: factored)
        y = ternary.lota_linear(x, state, [(A1, B1), (A2, B2)], [(1, "none", 1), (2, "integer", 1)])
        results.append(torch.autograd.grad(y.square().sum(), (A1, B1, A2, B2)))
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4) and a.abs().sum() > 0


def test_factored_gradient_is_chosen_by_its_cost():
    state = make_state("contiguous")  # groups of 32 rows
    assert ternary._factored_pays(state, [4], tokens=64)
    assert not ternary._factored_pays(state, [64], tokens=4096)
    assert not ternary._factored_pays(make_state("act-order"), [4], tokens=64)


def test_pack_leaves_its_input_alone():
    zeros = torch.randint(0, 16, (4, 64), dtype=torch.int32)
    before = zeros.clone()
    packed = gptq.pack_qzeros(zeros, 4)
    assert torch.equal(zeros, before) and packed.is_contiguous()
    assert torch.equal(gptq.unpack_qzeros(packed, 4), before.to(torch.uint8))


def test_merge_swaps_buffers_and_reading_deltas_while_merged_keeps_the_merge(gptq_dir):
    from peft import get_peft_model

    from peft_lota import LotaConfig, LotaLayer
    from tiny_models import Spec, X, load_gptq, logits, randomize

    model = get_peft_model(load_gptq(gptq_dir(Spec("llama", 4, False, False, "gptq_v2"))),
                           LotaConfig(r=4, omega=1, init_seed=0))
    randomize(model)
    layer = next(m for m in model.modules() if isinstance(m, LotaLayer))
    qweight = layer.base_layer.qweight
    original = qweight.clone()
    D = layer.get_delta_codes("default")
    expected = logits(model)
    model.merge_adapter()
    assert layer.base_layer.qweight is qweight and not torch.equal(qweight, original)  # same buffer, new values
    assert torch.equal(layer.get_delta_codes("default"), D)  # read against the unmerged codes...
    assert torch.equal(logits(model, X), expected)  # ...without undoing the merge
    model.unmerge_adapter()
    assert torch.equal(qweight, original)


def test_decoded_zero_points_follow_merge_and_unmerge(gptq_dir):
    from tiny_models import Spec, adapted, lota_layers

    model = adapted(gptq_dir(Spec("llama", 4, False, False, "gptq_v2")), offset="integer")
    layers = lota_layers(model)
    before = [layer.quant.read().zeros.clone() for layer in layers]
    model.merge_adapter()
    for layer in layers:
        assert torch.equal(layer.quant.read().zeros, gptq.unpack_qzeros(layer.base_layer.qzeros, 4))
    assert any(not torch.equal(layer.quant.read().zeros, z) for layer, z in zip(layers, before))
    model.unmerge_adapter()
    assert all(torch.equal(layer.quant.read().zeros, z) for layer, z in zip(layers, before))
