"""LoTA on real (tiny) GPTQ checkpoints: every acceptance property, over the fixture matrix.

Matrix: bits 2/3/4/8 x sym/asym x desc_act x v1/v2 x bias (qwen2) x group size incl. -1.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel, PeftModelForCausalLM, get_peft_model
from safetensors.torch import load_file

import peft_lota
from peft_lota import FloatOffsetMergeError, LotaConfig, LotaLayer
from peft_lota.formats import gptq
from tiny_models import (FAST_SPECS, SPECS_MATRIX, Spec, X, adapted, assert_kernel_reads_weights, load_gptq,
                         logits, lota_layers, randomize, tiered)




def raw_codes(layer):
    """Codes and true zeros straight from a GPTQ layer's packed buffers (zeros are v2 in memory)."""
    return gptq.unpack_qweight(layer.qweight, layer.bits), gptq.unpack_qzeros(layer.qzeros, layer.bits)


@pytest.fixture(scope="module", params=tiered(SPECS_MATRIX, FAST_SPECS))
def spec_dir(request, gptq_dir):
    return request.param, gptq_dir(request.param)


# ---- injection and the adapter model ----------------------------------------------------------

def test_fresh_adapter_is_bit_identical_and_trains(spec_dir):
    spec, path = spec_dir
    base = logits(load_gptq(path))
    model = get_peft_model(load_gptq(path), LotaConfig(r=8, target_modules="all-linear"))
    assert isinstance(model, PeftModelForCausalLM)
    layers = lota_layers(model)
    assert len(layers) == 14  # 7 projections x 2 decoder layers; the output head is left alone
    assert torch.equal(logits(model), base)
    with model.disable_adapter():
        assert torch.equal(logits(model), base)
    model.train()
    model(input_ids=X, labels=X).loss.backward()
    grads_B = [layer.lota_B["default"].grad for layer in layers]
    assert all(g is not None and g.abs().sum() > 0 for g in grads_B)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lota_A." in n or ".lota_B." in n or ".lota_scales." in n for n in trainable)


def test_delta_codes_and_delta_weight(spec_dir):
    spec, path = spec_dir
    model = adapted(path)
    maxq = 2**spec.bits - 1
    layer = lota_layers(model)[0]
    base = layer.base_layer
    D = layer.get_delta_codes("default")
    assert D.shape == (layer.out_features, layer.in_features) and D.dtype == torch.int8
    assert (D != 0).any() and set(D.unique().tolist()) <= {-1, 0, 1}
    codes, zeros = raw_codes(base)
    moved = codes.to(torch.int16) + D.t()
    assert int(moved.min()) >= 0 and int(moved.max()) <= maxq  # the edge rule keeps codes on the grid
    g = base.g_idx.long()
    expected = (base.scales[g].float() * D.t().float()).t()
    assert torch.equal(layer.get_delta_weight("default"), expected)


# ---- merging ------------------------------------------------------------------------------------

def test_merge_is_exact_and_unmerge_restores(spec_dir):
    spec, path = spec_dir
    model = adapted(path)
    expected = logits(model)
    before = {id(l): (l.base_layer.qweight.clone(), l.base_layer.qzeros.clone(), raw_codes(l.base_layer)[0],
                      l.get_delta_codes("default")) for l in lota_layers(model)}
    model.merge_adapter()
    for layer in lota_layers(model):
        qweight, qzeros, codes, D = before[id(layer)]
        merged_codes, _ = raw_codes(layer.base_layer)
        assert torch.equal(merged_codes.to(torch.int16), codes.to(torch.int16) + D.t())
        assert torch.equal(layer.base_layer.qzeros, qzeros)  # offset "none" leaves zeros alone
    assert torch.equal(logits(model), expected)
    model.merge_adapter()  # already merged: must not apply twice
    assert torch.equal(logits(model), expected)
    model.unmerge_adapter()
    for layer in lota_layers(model):
        assert torch.equal(layer.base_layer.qweight, before[id(layer)][0])
        assert torch.equal(layer.base_layer.qzeros, before[id(layer)][1])
    assert torch.equal(logits(model), expected)

    merged = model.merge_and_unload(safe_merge=True)
    assert not lota_layers(merged) and not hasattr(merged, "peft_config")
    assert not any("lota" in n for n, _ in merged.named_parameters())
    assert torch.equal(logits(merged), expected)


def test_two_adapters_merge_in_turn(gptq_dir):
    path = gptq_dir(Spec("llama", 2, False, False, "gptq_v2"))  # 2 bits: the edge rule bites most
    model = adapted(path, seed=1)
    model.add_adapter("second", LotaConfig(r=4, omega=1, init_seed=1))
    randomize(model, seed=2, adapter="second")
    model.base_model.set_adapter(["default", "second"])
    both = logits(model)
    model.merge_adapter(["default"])
    model.merge_adapter(["second"])
    assert torch.equal(logits(model), both)
    merged = model.merge_and_unload()
    assert torch.equal(logits(merged), both)


# ---- offset modes -------------------------------------------------------------------------------

def test_integer_offset_merges_exactly_and_changes_zeros(gptq_dir):
    path = gptq_dir(Spec("qwen2", 4, True, False, "gptq_v2"))  # symmetric: the merge makes it asymmetric
    model = adapted(path, offset="integer", r=8, omega=2)
    with torch.no_grad():  # rows of A all equal: P is constant down each group, so mu reaches whole steps
        for layer in lota_layers(model):
            layer.lota_A["default"].fill_(1.0)
    expected = logits(model)
    zeros_before = [raw_codes(l.base_layer)[1].clone() for l in lota_layers(model)]
    assert not torch.equal(expected, logits(load_gptq(path)))
    merged = model.merge_and_unload()
    assert torch.equal(logits(merged), expected)
    layers = [m for m in merged.modules() if hasattr(m, "qzeros")]
    changed = sum(int((raw_codes(l)[1] != z).sum()) for l, z in zip(layers, zeros_before))
    assert changed > 0
    for layer in layers:
        z = raw_codes(layer)[1]
        assert int(z.min()) >= 1 and int(z.max()) <= 15  # storable in both GPTQ formats


def test_float_offset_refuses_merge_unless_rounding_is_asked(gptq_dir):
    path = gptq_dir(Spec("llama", 4, False, True, "gptq"))
    model = adapted(path, offset="float", r=8, omega=2)
    qweights = [l.base_layer.qweight.clone() for l in lota_layers(model)]
    with pytest.raises(FloatOffsetMergeError, match="round_float_offset=True"):
        model.merge_and_unload()
    with pytest.raises(FloatOffsetMergeError, match="offset='integer'"):
        model.merge_adapter()
    # refused before anything was written
    assert all(torch.equal(l.base_layer.qweight, q) for l, q in zip(lota_layers(model), qweights))
    layers = lota_layers(model)
    model.merge_adapter(round_float_offset=True)
    reports = [l.merge_reports["default"] for l in layers]
    worst = max(r["max_abs_weight_change"] for r in reports)
    assert worst > 0  # rounding mu changed the weights, and the report says by how much


# ---- saving and loading the adapter ----------------------------------------------------------------

@pytest.mark.parametrize("train_mode", ["ternary", "latent"])
def test_adapter_round_trip_is_exact_and_compact(gptq_dir, tmp_path, train_mode):
    path = gptq_dir(Spec("qwen2", 3, False, True, "gptq_v2"))
    model = adapted(path, offset="integer", r=8, omega=2, train_mode=train_mode)
    if train_mode == "latent":  # latent values that are not ternary themselves, on both sides of the threshold
        with torch.no_grad():
            for layer in lota_layers(model):
                for p in (layer.lota_A["default"], layer.lota_B["default"]):
                    p.mul_(torch.rand(p.shape, generator=torch.Generator().manual_seed(1)) * 4e-3)
    expected = logits(model)
    model.save_pretrained(tmp_path / "adapter")
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    packed = {k: t for k, t in saved.items() if k.endswith((".lota_A", ".lota_B"))}
    assert packed and all(t.dtype == torch.uint8 for t in packed.values())
    latents = {k: t for k, t in saved.items() if k.endswith("_latent")}
    scales = {k: t for k, t in saved.items() if k.endswith(".lota_scales")}
    assert (latents.keys() == {k + "_latent" for k in (*packed, *scales)}) if train_mode == "latent" else not latents
    # the trained scales are kept as what the merge writes: each fp16 scale's change in units in the last place
    assert all(not t.is_floating_point() and t.element_size() <= 2 for t in scales.values())
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LOTA" and config["offset"] == "integer" and config["r"] == 8
    assert config["train_mode"] == train_mode

    reloaded = PeftModel.from_pretrained(load_gptq(path), tmp_path / "adapter")
    for a, b in zip(lota_layers(model), lota_layers(reloaded)):
        assert torch.equal(a.lota_A["default"], b.lota_A["default"])  # latent values too: resuming is exact
        assert torch.equal(a.lota_B["default"], b.lota_B["default"])
    assert torch.equal(logits(reloaded), expected)

    # the base model path recorded in the adapter config makes AutoPeftModel work too
    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert torch.equal(logits(auto), expected)

    # 2 bits per ternary value: an fp16 LoRA of the same rank stores 8x more bytes
    n_values = sum(p.numel() for n, p in model.named_parameters() if ".lota_A." in n or ".lota_B." in n)
    assert sum(t.numel() for t in packed.values()) == pytest.approx(n_values / 4, abs=4 * len(saved))
    if train_mode == "ternary":  # (the paper trains no scales)
        assert not any("lota_scales" in k for k in saved)
        assert os.path.getsize(tmp_path / "adapter" / "adapter_model.safetensors") < 2 * n_values / 4 + 20_000
    else:  # without the latent values (e.g. stripped for shipping), the same ternary adapter loads
        from safetensors.torch import save_file

        ternary_only = {k: t for k, t in saved.items() if not k.endswith("_latent")}  # (the scales stay: a file
        save_file(ternary_only, str(tmp_path / "adapter" / "adapter_model.safetensors"))  # without them is refused)
        shipped = PeftModel.from_pretrained(load_gptq(path), tmp_path / "adapter")
        assert torch.equal(logits(shipped), expected)


# ---- the merged checkpoint -----------------------------------------------------------------------------

@pytest.mark.parametrize("offset", ["none", "integer"])
def test_merged_checkpoint_reloads_with_stock_transformers(spec_dir, tmp_path, offset):
    spec, path = spec_dir
    if offset == "integer" and spec.bits != 4:
        pytest.skip("integer-offset export is covered on the 4-bit specs (sym and asym, v1 and v2)")
    model = adapted(path, offset=offset, r=8, omega=2)
    expected = logits(model)
    merged = model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())["quantization_config"]
    assert config.get("backend") in (None, "auto")
    assert (tmp_path / "merged" / "quantize_config.json").exists()
    reloaded = load_gptq(tmp_path / "merged")  # gptq_torch: the same kernel
    for (name, a), b in zip(((n, m) for n, m in merged.named_modules() if hasattr(m, "qweight")),
                            (m for m in reloaded.modules() if hasattr(m, "qweight"))):
        ca, za = raw_codes(a)
        cb, zb = raw_codes(b) if b.qzero_format() == 2 or config["checkpoint_format"] == "gptq_v2" else (None, None)
        assert torch.equal(a.qweight, b.qweight), name
        assert torch.equal(a.scales, b.scales) and torch.equal(a.g_idx, b.g_idx), name
        if zb is not None:
            assert torch.equal(za, zb), name
    assert torch.equal(logits(reloaded), expected)
    if spec.group_size != -1:  # the stock CPU int4 kernel only runs groups of 32..256 (the base model fails too)
        stock = load_gptq(tmp_path / "merged", backend=None)  # whatever kernel a user gets by default
        assert_kernel_reads_weights(stock, reloaded)  # (its kernel depends on the CPU)


# ---- kernels, bad input ------------------------------------------------------------------------------

def test_default_kernel_model_trains_and_merges(gptq_dir):
    path = gptq_dir(Spec("llama", 4, False, True, "gptq"))
    model = load_gptq(path, backend=None)  # the stock CPU kernel: not trainable as is
    reference = logits(load_gptq(path))
    peft_model = get_peft_model(model, LotaConfig(r=4, omega=1, target_modules=["q_proj", "v_proj"], init_seed=0))
    peft_model.train()  # must not crash, for targeted and untargeted layers alike
    peft_model.eval()
    assert torch.equal(logits(peft_model), reference)
    randomize(peft_model)
    expected = logits(peft_model)
    assert torch.equal(logits(peft_model.merge_and_unload()), expected)


def test_repacked_kernel_fails_early_with_instructions(gptq_dir):
    path = gptq_dir(Spec("llama", 4, False, False, "gptq_v2"))
    model = load_gptq(path, backend=None)
    with torch.inference_mode():
        model(input_ids=X)  # the default CPU kernel may repack its weights here
    repacked = any(getattr(m, "_cpu_transformed", False) for m in model.modules())
    if not repacked:
        pytest.skip("this machine's default kernel did not repack (no fused CPU int4 op)")
    with pytest.raises(ValueError, match="backend='gptq_torch'"):
        get_peft_model(model, LotaConfig(r=4))


def test_targeting_options_and_errors(gptq_dir):
    path = gptq_dir(Spec("qwen2", 4, True, False, "gptq_v2"))
    model = get_peft_model(load_gptq(path), LotaConfig(r=4, target_modules=r".*\.(q|v)_proj",
                                                         exclude_modules=["model.layers.1.self_attn.v_proj"],
                                                         layers_to_transform=None))
    names = {n for n, m in model.named_modules() if isinstance(m, LotaLayer)}
    assert len(names) == 3 and not any("layers.1.self_attn.v_proj" in n for n in names)

    model = get_peft_model(load_gptq(path), LotaConfig(r=4, layers_to_transform=[1], layers_pattern="layers"))
    assert all(".layers.1." in n for n, m in model.named_modules() if isinstance(m, LotaLayer))

    model = get_peft_model(load_gptq(path), LotaConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert any("modules_to_save" in n and p.requires_grad for n, p in model.named_parameters())

    with pytest.raises(ValueError, match="target modules"):
        get_peft_model(load_gptq(path), LotaConfig(r=4, target_modules=["no_such_layer"]))
    with pytest.raises(TypeError, match=r"quantized \(GPTQ, AWQ, compressed-tensors, LLM.int8, GGUF\) linear layers only"):
        get_peft_model(load_gptq(path), LotaConfig(r=4, target_modules=["lm_head"]))


def test_import_registers_once():
    import importlib

    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import PeftType

    importlib.reload(peft_lota)
    peft_lota.register()
    assert PeftType("LOTA") is PeftType.LOTA
    assert [p for p in PeftType if p.value == "LOTA"] == [PeftType.LOTA]
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.LOTA].__name__ == "LotaModel"
