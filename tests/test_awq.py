"""LoTA and L4Q on AWQ (GEMM) checkpoints that gptqmodel's own AWQ quantized on CPU, and formats we refuse.

Matrix: tiny_models.AWQ_SPECS. Adapt, train, merge, save and reload: tests/test_contract.py (every format x method).
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from peft import get_peft_model

import peft_lota
from peft_lota import L4QConfig, LotaConfig
from peft_lota.formats import awq, dispatch
from tiny_models import AWQ_FAST, AWQ_SPECS, adapter_layers, load_awq, logits, tiered


@pytest.fixture(scope="module", params=tiered(AWQ_SPECS, AWQ_FAST))
def awq_spec(request, awq_dir):
    return request.param, awq_dir(request.param)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codec_is_gptqmodels_packing(bits):
    from gptqmodel.quantization.awq.utils.packing_utils import pack_awq, reverse_awq_order, unpack_awq

    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (48, 64), generator=g, dtype=torch.int32)
    zeros = torch.randint(0, 1 << bits, (3, 64), generator=g, dtype=torch.int32)
    ref_q, ref_z = pack_awq(codes, zeros, bits)
    assert torch.equal(awq.pack_columns(codes.to(torch.uint8), bits), ref_q)
    assert torch.equal(awq.pack_columns(zeros.to(torch.uint8), bits), ref_z)
    assert torch.equal(awq.unpack_columns(ref_q, bits).to(torch.int32), codes)
    iw, iz = reverse_awq_order(*unpack_awq(ref_q, ref_z, bits, 64), bits)
    assert torch.equal(iw & ((1 << bits) - 1), codes) and torch.equal(iz & ((1 << bits) - 1), zeros)


def test_read_reproduces_the_kernels_weight(awq_spec):
    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

    spec, path = awq_spec
    model = load_awq(path)
    layers = awq.awq_layers(model)
    assert len(layers) == 14
    for name, layer in layers:
        state = dispatch(layer, name).read()
        kernel = dequantize_gemm(layer.qweight, layer.qzeros, layer.scales, layer.bits, layer.group_size)
        assert torch.equal(state.weight(), kernel), name
        assert ((state.zeros == 1 << (spec.bits - 1)).all()) == spec.sym



def test_bf16_activations_compute_what_the_kernel_computes(awq_dir, caplog, monkeypatch):
    from peft_lota.formats import awq

    monkeypatch.setattr(awq, "_WARNED", set())  # (warned once per process: another test may have run into it first)
    path = awq_dir(AWQ_SPECS[0])
    model = get_peft_model(load_awq(path, dtype=torch.bfloat16), LotaConfig(r=4, init_seed=0))
    with caplog.at_level(logging.WARNING, logger="peft_lota"):
        base = logits(model)
    assert "round this model's torch.float16 scales to torch.bfloat16" in caplog.text
    with torch.no_grad():
        for layer in adapter_layers(model):
            layer.lota_A["default"].copy_(torch.randn_like(layer.lota_A["default"]))
            layer.lota_B["default"].copy_(torch.randn_like(layer.lota_B["default"]))
    expected = logits(model)
    assert not torch.equal(expected, base)
    merged = model.merge_and_unload()
    assert merged.model.layers[0].self_attn.q_proj.scales.dtype == torch.bfloat16
    assert torch.equal(logits(merged), expected)


def test_default_cpu_kernel_trains_until_it_repacks(awq_dir):
    path = awq_dir(AWQ_SPECS[0])
    model = load_awq(path, backend=None)
    assert type(model.model.layers[0].mlp.up_proj).__name__ != "AwqTorchLinear"
    peft_model = get_peft_model(model, LotaConfig(r=4, init_seed=0))  # moved to the layout-keeping kernel
    assert {type(m.base_layer).__name__ for m in adapter_layers(peft_model)} == {"AwqTorchLinear"}
    assert torch.equal(logits(peft_model), logits(load_awq(path)))

    used = load_awq(path, dtype=torch.float16, backend=None)
    logits(used)  # the stock CPU kernel's first inference call repacks it privately (when the CPU can)
    if not getattr(used.model.layers[0].mlp.up_proj, "_cpu_transformed", False):
        pytest.skip("this CPU's kernel did not repack (no int4pack ops)")
    with pytest.raises(ValueError, match="torch_awq"):
        get_peft_model(used, LotaConfig(r=4))


def test_non_uniform_and_unknown_quantization_is_refused(fp_dir, tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(str(fp_dir("llama")))
    model.config.quantization_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    for config in (LotaConfig(r=4), L4QConfig(r=4)):
        with pytest.raises(ValueError, match="non-uniform grid"):
            get_peft_model(model, config)
    assert not adapter_layers(model)  # nothing was injected
    folder = tmp_path / "nf4"
    folder.mkdir()
    cfg = json.loads((fp_dir("llama") / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "fp4"}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="FP4, a non-uniform grid"):
        peft_lota.load_model(folder)
    cfg["quantization_config"] = {"quant_method": "hqq"}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="'hqq' is not a format peft_lota reads"):
        peft_lota.load_model(folder)
