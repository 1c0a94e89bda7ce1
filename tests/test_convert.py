"""Lossless conversion between formats (peft_lota.convert, `peft-lota convert`): the same integer grid written in
another format, read back by a stock load; what the target cannot hold is refused before anything changes."""

from __future__ import annotations

import json
import re

import pytest
import torch

from peft_lota import cli, formats, load_model
from peft_lota.convert import convert_model, same_grid
from tiny_models import AwqSpec, CtSpec, Spec, tiered

X = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))


def _source(kind, spec, gptq_dir, awq_dir, ct_dir):
    return {"gptq": gptq_dir, "awq": awq_dir, "ct": ct_dir}[kind](spec)


CASES = [("awq", AwqSpec("llama", 4, False, 32), "gptq"),  # zero points of 0: written as gptq_v2
         ("gptq", Spec("qwen2", 4, True, False, "gptq_v2"), "awq"),  # bias
         ("gptq", Spec("llama", 2, False, False, "gptq_v2"), "awq"),
         ("ct", CtSpec("llama", 4, 32), "awq"),
         ("ct", CtSpec("qwen2", 8, None), "gptq"),  # channel-wise: one group per column
         ("gptq", Spec("llama", 3, True, False, "gptq"), "compressed-tensors"),  # 3 bits: vLLM takes it only as CT
         ("gptq", Spec("qwen2", 4, True, False, "gptq_v2"), "compressed-tensors"),  # bias
         ("awq", AwqSpec("qwen2", 4, True, 64), "compressed-tensors")]


@pytest.mark.parametrize("kind,spec,to", tiered(CASES, [CASES[i] for i in (0, 4, 5)], unpack=True,  # every format
                                                 ids=lambda c: f"{c[0]}-{c[1].slug()}-to-{c[2]}"))
def test_conversion_keeps_the_grid_through_a_stock_reload(gptq_dir, awq_dir, ct_dir, tmp_path, kind, spec, to):
    path = _source(kind, spec, gptq_dir, awq_dir, ct_dir)
    source = load_model(path)
    formats.prepare_model(source)
    converted = convert_model(load_model(path), to)
    assert formats.model_format(converted).name == to and same_grid(source, converted)
    converted.save_pretrained(tmp_path / "out")
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == to
    reloaded = load_model(tmp_path / "out")
    assert formats.model_format(reloaded).name == to
    assert same_grid(source, reloaded)  # codes, zero points, scales, g_idx, bias: the same values
    with torch.no_grad():  # the weights are the same; the kernels may round the products differently
        a, b = source(input_ids=X).logits, reloaded(input_ids=X).logits
    assert torch.allclose(a, b, atol=1e-2, rtol=0)


def test_what_the_target_cannot_hold_is_refused_before_anything_changes(gptq_dir, fp_dir):
    act_order = load_model(gptq_dir(Spec("llama", 4, False, True, "gptq")))
    formats.prepare_model(act_order)
    before = formats.quantized_tensors(act_order)
    with pytest.raises(ValueError, match="act-order"):
        convert_model(act_order, "awq")
    after = formats.quantized_tensors(act_order)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert formats.model_format(act_order).name == "gptq"
    with pytest.raises(ValueError, match="GPTQ already"):
        convert_model(act_order, "gptq")
    with pytest.raises(ValueError, match="actorder='group'"):
        convert_model(act_order, "compressed-tensors")
    asymmetric = load_model(gptq_dir(Spec("llama", 2, False, False, "gptq_v2")))
    with pytest.raises(ValueError, match="zero points, and transformers .* cannot load an asymmetric"):
        convert_model(asymmetric, "compressed-tensors")
    with pytest.raises(ValueError, match="unknown format"):
        convert_model(act_order, "nf4")
    with pytest.raises(ValueError, match="full precision"):
        convert_model(load_model(fp_dir("llama")), "gptq")


def test_the_command_line_converts_verifies_and_refuses_in_one_line(awq_dir, tmp_path, capsys):
    path = awq_dir(AwqSpec("qwen2", 4, True, 64))
    out = tmp_path / "gptq"
    assert cli.main(["convert", str(path), str(out), "--to", "gptq"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"codes, zeros, scales, group order, bias equal +True", printed)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"
    assert cli.main(["convert", str(path), str(path), "--to", "gptq"]) == 2  # OUT is the input
    assert cli.main(["convert", str(path), str(tmp_path / "x"), "--to", "awq"]) == 2  # AWQ already
    err = capsys.readouterr().err
    assert "is the checkpoint" in err and "AWQ already" in err and not (tmp_path / "x").exists()


def test_merge_writes_the_merged_model_in_another_format(gptq_dir, tmp_path, capsys):
    """merge --format: the exact merge, then the same grid repacked; reloaded, its codes equal the merged ones."""
    from peft import get_peft_model

    from peft_lota import LotaConfig

    path = gptq_dir(Spec("qwen2", 4, True, False, "gptq_v2"))
    model = get_peft_model(load_model(path), LotaConfig(r=4, init_seed=0))
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 1e-3)
    model.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "awq"
    assert cli.main(["merge", str(path), str(tmp_path / "adapter"), str(out), "--format", "awq"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"reloaded codes, zeros, scales == merged +True", printed)
    assert re.search(r"merged logits == adapter logits +True", printed)  # checked before the repacking
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "awq"
    assert cli.main(["merge", str(path), str(tmp_path / "adapter"), str(tmp_path / "x"), "--format", "awq",
                     "--stream"]) == 2


def test_an_asymmetric_4_bit_gptq_checkpoint_is_told_the_conversion_a_fast_kernel_takes():
    note = formats.by_name("gptq").fast_path_note
    assert "--to awq" in note({"bits": 4, "sym": False, "desc_act": False, "group_size": 128})
    assert "--to awq" not in note({"bits": 4, "sym": False, "desc_act": True, "group_size": 128})  # AWQ: no act-order
    assert note({"bits": 4, "sym": True, "desc_act": False, "group_size": 128}) is None


def test_each_server_is_told_its_own_conversion_or_that_none_serves():
    gptq, awq = formats.by_name("gptq"), formats.by_name("awq")
    # 3-bit symmetric: vLLM serves it as compressed-tensors (2-8 bits there), SGLang at no format (4/8 bits only)
    note = gptq.fast_path_note({"bits": 3, "sym": True, "desc_act": False, "group_size": 128})
    vllm, sglang = note.split("SGLang 0.5.23 refuses it:")
    assert vllm.startswith("vLLM 0.34 refuses it:") and "--to compressed-tensors" in vllm
    assert "no format peft-lota writes" in sglang
    # act-order with groups: SGLang serves it as it is, vLLM refuses and no format holds its group order for it
    note = gptq.fast_path_note({"bits": 4, "sym": True, "desc_act": True, "group_size": 128})
    assert note.startswith("vLLM 0.34 refuses it") and "SGLang" not in note and "no format" in note
    rows = {name.split()[0]: ok for name, _, ok in gptq.kernels({"bits": 4, "sym": True, "desc_act": True,
                                                                  "group_size": 128}) if name.startswith(("vLLM", "SGL"))}
    assert rows == {"vLLM": False, "SGLang": True}
    # 3-bit asymmetric (the real model's benchmark grid): no server takes it in any format peft-lota writes
    note = gptq.fast_path_note({"bits": 3, "sym": False, "desc_act": False, "group_size": 64})
    assert note.count("no format peft-lota writes") == 2
    # AWQ: 4-bit with zero points is served by both, whatever the group; 8-bit by neither
    assert awq.fast_path_note({"bits": 4, "zero_point": True, "group_size": 256}) is None
    assert awq.fast_path_note({"bits": 8, "zero_point": True, "group_size": 128}).count("4 bits only") == 2
