"""L4Q: its quantizer maths against an autograd reference, and the method on real (tiny) GPTQ and full-precision
models: fresh-adapter identity, merge exactness, export round trips, errors.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from peft_lota import L4QConfig, L4QLayer
from peft_lota.formats import gptq
from peft_lota.formats.base import QuantState
from peft_lota.l4q import quantizer as q
from tiny_models import (FAST_SPECS, SPECS_MATRIX, Spec, X, assert_kernel_reads_weights, load_gptq, logits,
                         tiered)




def l4q_layers(model):
    return [m for m in model.modules() if isinstance(m, L4QLayer)]


def randomize(model, seed=0, strength=0.05):
    """A trained-looking adapter: random B (so W_comb moves across rounding boundaries) and scale multipliers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in l4q_layers(model):
            B = layer.l4q_B["default"]
            B.copy_(torch.randn(B.shape, generator=g) * strength)
            if "default" in layer.l4q_scales:
                m = layer.l4q_scales["default"]
                m.copy_(0.1 * (torch.rand(m.shape, generator=g) - 0.5))  # multipliers 0.95..1.05


def train_two_steps(model):
    """Two AdamW steps at a high rate (codes and scales move), then eval mode."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(input_ids=X, labels=X).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


# ---- the maths -----------------------------------------------------------------------------------

def _problem(layout: str, seed=0, K=64, N=24, G=4, bits=3, r=4, scales_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    maxq = 2**bits - 1
    g_idx = torch.randperm(K, generator=g) % G if layout == "act-order" else torch.arange(K) // (K // G)
    codes = torch.randint(0, maxq + 1, (K, N), generator=g, dtype=torch.uint8)
    state = QuantState(codes, torch.randint(1, maxq + 1, (G, N), generator=g),
                       (torch.rand(G, N, generator=g) * 0.1 + 0.01).to(scales_dtype), g_idx, maxq,
                       torch.randn(N, generator=g))
    A = (torch.randn(r, K, generator=g) * 0.3).requires_grad_()
    B = (torch.randn(N, r, generator=g) * 0.3).requires_grad_()
    s = (state.scales.float() * (1 + 0.2 * torch.rand(G, N, generator=g))).requires_grad_()
    x = torch.randn(9, K, generator=g).requires_grad_()
    return state, A, B, s, x


def _reference(state, A, B, scaling, s, x, scale_gradient="lsq", anchored=False):
    """The L4Q layer written directly with autograd: round and clamp with straight-through gradients (anchored: on
    the starting grid state.scales, which the trained scales s then stretch)."""
    g = state.g_idx
    gs = q.lsq_gradient_scale(state, state.maxq) if scale_gradient == "lsq" else 1.0
    s_lsq = s * gs + (s - s * gs).detach()  # LSQ's gradient scale on s, value unchanged
    s_r = (s_lsq + (s.detach().to(state.scales.dtype).float() - s.detach()))[g]
    W0 = state.scales.float()[g] * (state.codes.float() - state.zeros.float()[g])
    # "codes": the codes do not move with s (only W_q = s * (Q - z) sees it)
    divisor = state.scales.float()[g] if anchored else s_r if scale_gradient == "lsq" else s_r.detach()
    w = (W0 + scaling * A.t() @ B.t()) / divisor
    v = torch.round(w).detach() + (w - w.detach()) + state.zeros.float()[g]  # exact integers, gradient 1
    # the paper's mask is inclusive (codes on the grid's edge pass gradient); torch.clamp's is not
    c = torch.where((v >= 0) & (v <= state.maxq), v, torch.clamp(v, 0, state.maxq).detach())
    return x @ (s_r * (c - state.zeros.float()[g])) + state.bias


@pytest.mark.parametrize("scale_gradient", ["lsq", "codes"])
@pytest.mark.parametrize("layout", ["contiguous", "act-order"])
def test_gradients_match_an_autograd_reference(layout, scale_gradient):
    state, A, B, s, x = _problem(layout)
    grid = q.Grid.from_quantized(state)
    y = q.l4q_linear(x, grid, A, B, 0.5, s, scale_gradient)
    y_ref = _reference(state, A, B, 0.5, s, x, scale_gradient)
    assert torch.allclose(y, y_ref, atol=1e-5)
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, A, B, s), grad)
    ref = torch.autograd.grad(y_ref, (x, A, B, s), grad)
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)
    # clipping happened (some codes hit the grid's edges) and scales got gradient
    codes = q.quantized_codes(grid, A, B, 0.5, s.detach())
    assert bool((codes == 0).any()) and bool((codes == state.maxq).any()) and got[3].abs().sum() > 0


@pytest.mark.parametrize("layout", ["contiguous", "act-order"])
def test_anchored_gradients_match_an_autograd_reference(layout):
    state, A, B, s, x = _problem(layout)
    grid = q.Grid.from_quantized(state)
    y = q.l4q_linear(x, grid, A, B, 0.5, s, "codes", anchored=True)
    y_ref = _reference(state, A, B, 0.5, s, x, "codes", anchored=True)
    assert torch.allclose(y, y_ref, atol=1e-5)
    grad = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, (x, A, B, s), grad), torch.autograd.grad(y_ref, (x, A, B, s), grad)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)


def test_anchored_codes_move_with_the_lora_only(gptq_dir, tmp_path):
    """anchor_codes: trained scales stretch the base grid without re-rounding it (the paper's rounding against the
    trained scales moves codes with them); the LoRA moves codes; merge and reload are exact."""
    path = gptq_dir(Spec("llama", 3, False, True, "gptq"))
    moved = {}
    for anchored in (False, True):
        model = get_peft_model(load_gptq(path), L4QConfig(r=4, init_seed=0, anchor_codes=anchored))
        with torch.no_grad():
            for layer in l4q_layers(model):
                m = layer.l4q_scales["default"]
                m.copy_(0.6 * (torch.rand(m.shape, generator=torch.Generator().manual_seed(0)) - 0.5))
        moved[anchored] = sum(int((layer.get_delta_codes("default") != 0).sum()) for layer in l4q_layers(model))
    assert moved[False] > 0 and moved[True] == 0
    randomize(model)  # the anchored model: a LoRA that passes half steps, and scales
    assert sum(int((layer.get_delta_codes("default") != 0).sum()) for layer in l4q_layers(model)) > 0
    train_two_steps(model)
    expected = logits(model)
    merged = model.merge_and_unload(safe_merge=True)
    assert torch.equal(logits(merged), expected)
    merged.save_pretrained(tmp_path / "merged")
    assert torch.equal(logits(load_gptq(tmp_path / "merged")), expected)
    with pytest.raises(ValueError, match="scale_gradient='codes'"):
        L4QConfig(anchor_codes=True, scale_gradient="lsq")


def test_scale_rate_is_how_far_u_moves_a_scale_and_reloads(gptq_dir, tmp_path):
    """scale_rate k: the scales are s0 * (1 + k u), the same model as k u at rate 1; it is saved with the adapter, so a
    reloaded adapter gives the same logits, and the merge is exact."""
    path = gptq_dir(Spec("llama", 3, False, True, "gptq"))
    out = {}
    for rate in (1.0, 4.0):
        model = get_peft_model(load_gptq(path), L4QConfig(r=4, init_seed=0, anchor_codes=True, scale_rate=rate))
        with torch.no_grad():
            for i, layer in enumerate(l4q_layers(model)):
                m = layer.l4q_scales["default"]
                m.copy_(0.02 * (torch.rand(m.shape, generator=torch.Generator().manual_seed(i)) - 0.5) / rate)
        out[rate] = logits(model)
    assert torch.equal(out[1.0], out[4.0])  # 4 * (x / 4) and x are the same float32 multiplier here
    assert not torch.equal(out[1.0], logits(load_gptq(path)))
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load_gptq(path), str(tmp_path / "adapter"))
    assert reloaded.peft_config["default"].scale_rate == 4.0
    assert torch.equal(logits(reloaded), out[4.0])
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    del config["scale_rate"]  # an adapter saved before the field: rate 1
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    older = PeftModel.from_pretrained(load_gptq(path), str(tmp_path / "adapter"))
    assert older.peft_config["default"].scale_rate == 1.0 and not torch.equal(logits(older), out[4.0])
    assert torch.equal(logits(model.merge_and_unload(safe_merge=True)), out[4.0])
    for bad in (0, -1.0, float("nan"), True, "2"):
        with pytest.raises(ValueError, match="scale_rate"):
            L4QConfig(scale_rate=bad)


def test_a_fresh_adapter_reproduces_the_codes_and_the_stock_weights():
    state, A, B, s, x = _problem("act-order", scales_dtype=torch.float16)
    grid = q.Grid.from_quantized(state)
    codes = q.quantized_codes(grid, A, torch.zeros_like(B), 0.5, state.scales.float())
    assert torch.equal(codes, state.codes)
    w = q.quantized_weight(grid, codes, state.scales.float(), torch.float32)
    assert torch.equal(w, state.weight().float())  # fp16 products, as the stock kernel computes them


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_initial_grid_covers_every_weight(sym, bits):
    W = torch.randn(64, 16, generator=torch.Generator().manual_seed(bits)) * 0.05
    scales, zeros = q.init_grid(W, bits, 16, sym)
    maxq = 2**bits - 1
    v = torch.round(W.view(4, 16, 16) / scales.float()[:, None]) + zeros[:, None]
    assert int(v.min()) >= 0 and int(v.max()) <= maxq  # nothing clipped at the start
    assert int(zeros.min()) >= 1 and scales.dtype == torch.float16
    if sym:
        assert bool((zeros == 2 ** (bits - 1)).all())


# ---- on GPTQ models --------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=tiered(SPECS_MATRIX, FAST_SPECS))
def spec_dir(request, gptq_dir):
    return request.param, gptq_dir(request.param)


def test_gptq_start_fresh_identity_merge_and_reload(spec_dir, tmp_path):
    spec, path = spec_dir
    base = logits(load_gptq(path))
    model = get_peft_model(load_gptq(path), L4QConfig(r=4, init_seed=0))
    assert len(l4q_layers(model)) == 14 and torch.equal(logits(model), base)
    model.train()
    model(input_ids=X, labels=X).loss.backward()
    layer = l4q_layers(model)[0]
    assert layer.l4q_B["default"].grad.abs().sum() > 0
    # W0 sits on the grid, so LSQ's scale gradient (round(w) - w where in range) is 0 until the LoRA moves it off
    assert layer.l4q_scales["default"].grad.abs().sum() == 0
    model.zero_grad()
    randomize(model)
    model(input_ids=X, labels=X).loss.backward()
    assert layer.l4q_scales["default"].grad.abs().sum() > 0
    model.eval()
    expected = logits(model)
    moved = sum(int((layer.get_delta_codes("default") != 0).sum()) for layer in l4q_layers(model))
    assert moved > 0
    merged = model.merge_and_unload(safe_merge=True)
    assert not l4q_layers(merged) and torch.equal(logits(merged), expected)
    out = merged.save_pretrained(tmp_path / "merged") or tmp_path / "merged"
    reloaded = load_gptq(out)
    assert torch.equal(logits(reloaded), expected)
    for (_, a), (_, b) in zip(gptq.gptq_layers(merged), gptq.gptq_layers(reloaded)):
        assert torch.equal(a.scales, b.scales) and torch.equal(a.qweight, b.qweight)


def test_merge_unmerge_and_adapter_round_trip(gptq_dir, tmp_path):
    path = gptq_dir(Spec("qwen2", 3, False, True, "gptq_v2"))
    model = get_peft_model(load_gptq(path), L4QConfig(r=4, init_seed=0))
    randomize(model)
    expected = logits(model)
    before = [(layer.base_layer.qweight.clone(), layer.base_layer.scales.clone()) for layer in l4q_layers(model)]
    model.merge_adapter()
    assert torch.equal(logits(model), expected)
    model.unmerge_adapter()
    for layer, (qweight, scales) in zip(l4q_layers(model), before):
        assert torch.equal(layer.base_layer.qweight, qweight) and torch.equal(layer.base_layer.scales, scales)
    assert torch.equal(logits(model), expected)
    model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["peft_type"] == "L4Q"
    reloaded = PeftModel.from_pretrained(load_gptq(path), tmp_path / "adapter")
    assert torch.equal(logits(reloaded), expected)


# ---- from full precision ----------------------------------------------------------------------------

FP_GRIDS = [("llama", 4, 32, True), ("qwen2", 3, 64, False), ("llama", 2, -1, False), ("qwen2", 8, 128, True)]


@pytest.mark.parametrize("arch,bits,group_size,sym", tiered(FP_GRIDS, FP_GRIDS[1:2], unpack=True,
                                                            ids=lambda c: "-".join(map(str, c))))
def test_full_precision_start_becomes_an_exact_gptq_checkpoint(fp_dir, tmp_path, arch, bits, group_size, sym):
    path = fp_dir(arch)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                           L4QConfig(r=4, bits=bits, group_size=group_size, sym=sym, init_seed=0))
    assert len(l4q_layers(model)) == 14  # every projection, not the output head
    train_two_steps(model)
    expected = logits(model)
    merged = model.merge_and_unload()
    assert len(gptq.gptq_layers(merged)) == 14 and torch.equal(logits(merged), expected)
    merged.save_pretrained(tmp_path / "merged")
    qc = json.loads((tmp_path / "merged" / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"]) == (
        "gptq", bits, group_size, sym, False)
    assert json.loads((tmp_path / "merged" / "quantize_config.json").read_text())["bits"] == bits
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)  # default kernel
    assert len(gptq.gptq_layers(stock)) == 14
    assert torch.equal(logits(load_gptq(tmp_path / "merged")), expected)  # the trainable kernel: bit-identical
    assert_kernel_reads_weights(stock, load_gptq(tmp_path / "merged"))  # (its kernel depends on the CPU)


# ---- errors ------------------------------------------------------------------------------------------

def test_bad_configs_and_misuse_say_what_to_do(gptq_dir, fp_dir):
    with pytest.raises(ValueError, match="lora_dropout=0"):
        L4QConfig(lora_dropout=0.1)
    with pytest.raises(ValueError, match="bits must be one of"):
        L4QConfig(bits=5)
    with pytest.raises(ValueError, match="group_size must be"):
        L4QConfig(group_size=0)
    with pytest.raises(ValueError, match="target_modules is empty"):
        L4QConfig(target_modules=[])
    with pytest.raises(ValueError, match="keeps the checkpoint's grid"):
        get_peft_model(load_gptq(gptq_dir(Spec("llama", 2, False, False, "gptq_v2"))), L4QConfig(bits=4))
    # (a group size that does not divide the width is not a mistake: the last group is short, tests/test_real_model.py)


# ---- from a LoRA you already trained ------------------------------------------------------------------------

@pytest.mark.parametrize("as_folder", [False, True])
def test_l4q_from_lora_starts_from_the_lora_and_merges_exactly(gptq_dir, tmp_path, as_folder):
    from peft import LoraConfig

    from peft_lota import l4q_from_lora

    path = gptq_dir(Spec("llama", 4, False, True, "gptq"))
    lora = get_peft_model(load_gptq(path), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                      lora_dropout=0.05, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.05)
    lora.eval()
    lora_logits = logits(lora)
    factors = {n: p.detach().clone() for n, p in lora.named_parameters() if "lora_" in n}
    if as_folder:
        lora.save_pretrained(tmp_path / "lora")
        model = l4q_from_lora(load_gptq(path), tmp_path / "lora")
    else:
        model = l4q_from_lora(lora)
    layers = l4q_layers(model)
    assert len(layers) == 6 and all(layer.settings["default"].scaling == 2.0 for layer in layers)
    for n, A in factors.items():  # the LoRA's own A and B, in the L4Q layers
        target = n.replace("lora_A.default.weight", "l4q_A.default").replace("lora_B.default.weight", "l4q_B.default")
        assert torch.equal(dict(model.named_parameters())[target], A)
    # The fresh model is the LoRA model quantized onto the base's grid: close to it, and exactly mergeable.
    quantized = logits(model)
    assert not torch.equal(quantized, lora_logits) and torch.allclose(quantized, lora_logits, atol=0.5)
    merged = model.merge_and_unload()
    assert torch.equal(logits(merged), quantized)
    merged.save_pretrained(tmp_path / "merged")
    assert torch.equal(logits(load_gptq(tmp_path / "merged")), quantized)


# ---- the format a full-precision start is written in -------------------------------------------------------

@pytest.mark.parametrize("bits,group_size,sym,dtype", [(4, 32, False, torch.float32), (8, 64, True, torch.float32),
                                                      (4, 32, True, torch.bfloat16)])
def test_full_precision_start_into_awq_is_exact(fp_dir, tmp_path, bits, group_size, sym, dtype):
    """L4QConfig(format="awq"): trained through AWQ's kernel semantics, merged into AWQ layers, saved as a standard
    AWQ checkpoint that a stock AwqConfig load reads with the same codes and logits as the model that trained."""
    from peft_lota.formats import awq, quantized_tensors
    from tiny_models import load_awq

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(fp_dir("llama"), dtype=dtype),
                           L4QConfig(r=4, bits=bits, group_size=group_size, sym=sym, format="awq", init_seed=0))
    train_two_steps(model)
    expected = logits(model)
    merged = model.merge_and_unload(safe_merge=True)
    assert len(awq.awq_layers(merged)) == 14 and not gptq.gptq_layers(merged)
    assert torch.equal(logits(merged), expected)
    merged.save_pretrained(tmp_path / "merged")
    qc = json.loads((tmp_path / "merged" / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["zero_point"]) == ("awq", bits, group_size, not sym)
    reloaded = load_awq(tmp_path / "merged", dtype=dtype)
    before, after = quantized_tensors(merged), quantized_tensors(reloaded)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(logits(reloaded), expected)


def test_a_format_builds_layers_that_read_back_exactly():
    """Format.build_layer, then the format's own reader: the same codes, zero points and scales, for every format
    that builds layers; a grid a format cannot hold is named by grid_problem before anything is built."""
    from peft_lota import formats

    g = torch.Generator().manual_seed(0)
    K, N, bits, gs = 64, 32, 4, 16
    codes = torch.randint(0, 16, (K, N), generator=g, dtype=torch.uint8)
    zeros = torch.randint(1, 16, (K // gs, N), generator=g).to(torch.int32)
    scales = (torch.rand(K // gs, N, generator=g) + 0.5).half()
    g_idx = torch.arange(K, dtype=torch.int32) // gs
    built = [f for f in formats.FORMATS if f.can_build]
    assert {f.name for f in built} == {"gptq", "awq", "compressed-tensors"}
    for fmt in built:
        sym = fmt.name == "compressed-tensors"  # it holds no zero points: asymmetric grids are refused
        assert ("zero points" in fmt.grid_problem(K, N, bits, gs, False)) if sym else fmt.grid_problem(K, N, bits, gs,
                                                                                                      False) is None
        z = torch.full_like(zeros, 8) if sym else zeros
        weights = fmt.dispatch(fmt.build_layer(codes, z, scales, g_idx, None, bits, gs, sym), "x")
        state = weights.read()
        assert torch.equal(state.codes, codes) and torch.equal(state.scales.to(scales.dtype), scales)
        assert torch.equal(state.zeros.to(torch.int32), z)
        if sym:  # compressed-tensors stores no zero points: none can move (LoTA's offsets are refused for it)
            assert weights.fixed_zero_points
        else:  # where a merge may move zero points: GPTQ's classic format stores z - 1, AWQ raw z
            assert state.zero_range == {"gptq": (1, 15), "awq": (0, 15)}[fmt.name]
        assert fmt.new_config(bits, gs, sym)["quant_method"] == fmt.quant_method
    assert "multiple" in formats.by_name("gptq").grid_problem(20, N, 3, -1, True)  # 3-bit words hold 32 rows
    assert "multiple of 48" in formats.by_name("awq").grid_problem(K, N, bits, 48, True)


def test_a_format_that_cannot_hold_the_grid_or_build_layers_is_refused(fp_dir):
    base = AutoModelForCausalLM.from_pretrained(fp_dir("llama"), dtype=torch.float32)
    with pytest.raises(ValueError, match="cannot write compressed-tensors layers; choose one of GPTQ, AWQ"):
        get_peft_model(base, L4QConfig(format="compressed-tensors"))
    with pytest.raises(ValueError, match="into a 4-bit AWQ layer: AWQ groups"):
        get_peft_model(AutoModelForCausalLM.from_pretrained(fp_dir("llama"), dtype=torch.float32),
                       L4QConfig(format="awq", group_size=48))
    with pytest.raises(ValueError, match="format must be one of"):
        L4QConfig(format="nf4")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(fp_dir("llama"), dtype=torch.float32),
                           L4QConfig(r=4, format="awq", group_size=32))
    with pytest.raises(ValueError, match="share its grid and format"):  # a second adapter cannot ask for GPTQ
        model.add_adapter("other", L4QConfig(r=4, group_size=32))
