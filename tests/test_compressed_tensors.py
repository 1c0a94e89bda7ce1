"""LoTA and L4Q on compressed-tensors `pack-quantized` checkpoints (what llm-compressor writes for vLLM), made with
compressed-tensors' own functions and loaded the stock way.

Matrix: tiny_models.CT_SPECS. Adapt, train, merge, save and reload: tests/test_contract.py (every format x method).
"""

from __future__ import annotations


import pytest
import torch
from peft import PeftModel, get_peft_model

pytest.importorskip("compressed_tensors")

from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32  # noqa: E402

import peft_lota  # noqa: E402
from peft_lota import LotaConfig  # noqa: E402
from peft_lota.formats import compressed_tensors as ct  # noqa: E402
from peft_lota.formats import dispatch  # noqa: E402
from tiny_models import CT_FAST, CT_SPECS, X, load_ct, logits, tiered, train_steps  # noqa: E402

@pytest.fixture(scope="module", params=tiered(CT_SPECS, CT_FAST))
def ct_spec(request, ct_dir):
    return request.param, ct_dir(request.param)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codec_is_compressed_tensors_packing(bits):
    g = torch.Generator().manual_seed(bits)
    q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (48, 64), generator=g, dtype=torch.int8)  # [N, K]
    ref = pack_to_int32(q, bits)
    codes = (q.to(torch.int16) + (1 << (bits - 1))).to(torch.uint8).t()  # ours: unsigned, [K, N]
    assert torch.equal(ct.pack_weight(codes, bits), ref)
    assert torch.equal(ct.unpack_weight(ref, bits), codes)
    assert torch.equal(unpack_from_int32(ref, bits, q.shape), q)


def test_read_reproduces_the_decompressed_weight(ct_spec):
    spec, path = ct_spec
    model = load_ct(path)
    layers = ct.ct_layers(model)
    assert len(layers) == 14
    states = {name: dispatch(layer, name).read().weight() for name, layer in layers}
    logits(model)  # the stock decompress-on-first-forward hook
    for name, layer in layers:
        assert torch.equal(states[name].t(), layer.weight), name



def test_bf16_model_keeps_bf16_scales_and_saved_adapter_reloads(ct_dir, tmp_path):
    path = ct_dir(CT_SPECS[0])
    model = get_peft_model(load_ct(path, dtype=torch.bfloat16), LotaConfig(r=4, init_seed=0))
    train_steps(model, X, lr=1e-2)
    expected = logits(model)
    model.save_pretrained(tmp_path / "adapter")
    again = PeftModel.from_pretrained(load_ct(path, dtype=torch.bfloat16), tmp_path / "adapter")
    assert torch.equal(logits(again), expected)
    merged = again.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
        assert f.get_slice("model.layers.0.self_attn.q_proj.weight_scale").get_dtype() == "BF16"
    assert torch.equal(logits(load_ct(tmp_path / "merged", dtype=torch.bfloat16)), expected)


def test_untouched_scales_are_stored_in_the_checkpoints_dtype(ct_dir, tmp_path):
    path = ct_dir(CT_SPECS[0])
    model = get_peft_model(load_ct(path), LotaConfig(r=4, init_seed=0, train_scales=False))
    train_steps(model, X)
    model.merge_and_unload().save_pretrained(tmp_path / "merged")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
        assert f.get_slice("model.layers.0.mlp.up_proj.weight_scale").get_dtype() == "BF16"


def test_decompressed_model_is_refused_with_the_way_out(ct_dir):
    path = ct_dir(CT_SPECS[0])
    model = load_ct(path)
    logits(model)  # the stock hook decompresses every layer into a dense weight
    assert not ct.ct_layers(model) or all(ct.layout_problem(n, m) for n, m in ct.ct_layers(model))
    with pytest.raises(ValueError):
        get_peft_model(model, LotaConfig(r=4))


def test_load_model_and_inspect_know_the_format(ct_dir):
    path = ct_dir(CT_SPECS[0])
    qc = peft_lota.loading.quantization_config(path)
    assert qc["quant_method"] == "compressed-tensors"
    model = peft_lota.load_model(path)
    assert len(ct.ct_layers(model)) == 14
    assert any(ok for _, _, ok in ct.kernels(qc))


def test_command_line_merges_inspects_and_verifies(ct_dir, tmp_path, capsys):
    import re

    from peft_lota import cli

    base = ct_dir(CT_SPECS[1])  # 8-bit per channel, with bias
    model = get_peft_model(load_ct(base), LotaConfig(r=4, omega=1, init_seed=0, train_scales=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lota_B.default"):  # ternary B: entries at 0 or twice latent_threshold
                p.copy_(torch.randint(-1, 2, p.shape, generator=torch.Generator().manual_seed(0)).float() * 2e-3)
    model.save_pretrained(tmp_path / "adapter")
    assert cli.main(["merge", str(base), str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"merged logits == adapter logits\s+True", out) and re.search(r"reloaded logits == merged\s+True", out)
    assert "compressed-tensors: format pack-quantized, bits 8" in out and "vLLM 0.34 compressed-tensors WNA16" in out
    assert cli.main(["inspect", str(tmp_path / "merged")]) == 0
    assert "compressed-tensors checkpoint" in capsys.readouterr().out
    assert cli.main(["verify", str(tmp_path / "merged"), "--against", str(tmp_path / "adapter"), "--base", str(base)]) == 0
    assert cli.main(["verify", str(tmp_path / "merged"), "--against", str(base)]) == 1  # codes moved
