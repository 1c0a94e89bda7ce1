"""The streaming merge (peft_lota.stream.merge_checkpoint): shard by shard from the files, without building the model,
it writes the very tensors the in-memory merge saves, in the base's own shard layout."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import save_file

from peft_lota import L4QConfig, LotaConfig, load_model
from peft_lota.stream import INDEX, merge_checkpoint
from tiny_models import AwqSpec, CtSpec, Spec, checkpoint_tensors, reshard, tiered

X = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))


def _trained_adapter(path: Path, method: str, offset: str, out: Path):
    """A saved adapter with trained-looking values, and the in-memory merge of it, saved."""
    dtype = getattr(torch, json.loads((path / "config.json").read_text()).get("dtype") or "float32")
    config = (LotaConfig(r=4, init_seed=0, offset=offset) if method == "lota" else L4QConfig(r=4, init_seed=0))
    model = get_peft_model(load_model(path, dtype=dtype), config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * (0.05 if method == "l4q" else 1e-3))
    model.save_pretrained(out / "adapter")
    merged = model.merge_and_unload()
    merged.save_pretrained(out / "in-memory")
    return merged, dtype


CASES = [("gptq", Spec("llama", 4, False, True, "gptq"), "lota", "integer"),  # v1 zeros that wrap at load
         ("gptq", Spec("qwen2", 3, False, True, "gptq_v2"), "l4q", None),
         ("gptq", Spec("llama", 8, True, True, "gptq_v2"), "lota", "none"),
         ("awq", AwqSpec("llama", 4, False, 32), "lota", "integer"),
         ("awq", AwqSpec("qwen2", 4, True, 64), "l4q", None),
         ("ct", CtSpec("llama", 4, 32), "lota", "none"),
         ("ct", CtSpec("qwen2", 8, None), "l4q", None)]  # channel-wise


@pytest.mark.parametrize("kind,spec,method,offset", tiered(CASES, CASES[1::2], ids=lambda c: f"{c[0]}-{c[1].slug()}-{c[2]}",
                                                          unpack=True))  # the inner loop: one case of each format
@pytest.mark.parametrize("sharded", [False, True])
def test_streaming_writes_the_in_memory_merge_tensor_for_tensor(gptq_dir, awq_dir, ct_dir, tmp_path, kind, spec,
                                                                 method, offset, sharded):
    _check_stream({"gptq": gptq_dir, "awq": awq_dir, "ct": ct_dir}[kind](spec), tmp_path, method, offset, sharded)


@pytest.mark.parametrize("method", ["lota", "l4q"])
def test_streaming_an_llm_int8_checkpoint(fp_dir, tmp_path, method):
    """A pre-quantized LLM.int8 checkpoint (as users download them), merged from its files, in 3 shards."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    pytest.importorskip("bitsandbytes")
    AutoModelForCausalLM.from_pretrained(str(fp_dir("qwen2")), dtype=torch.float32, device_map="cpu",
                                         quantization_config=BitsAndBytesConfig(load_in_8bit=True)
                                         ).save_pretrained(tmp_path / "int8")
    _check_stream(tmp_path / "int8", tmp_path, method, "none", sharded=True)


def _check_stream(path: Path, tmp_path: Path, method: str, offset, sharded: bool) -> None:
    merged, dtype = _trained_adapter(path, method, offset, tmp_path)
    base = reshard(path, tmp_path / "sharded") if sharded else path
    report = merge_checkpoint(base, tmp_path / "adapter", tmp_path / "streamed", count_codes=True, progress=False)
    assert report.layers == 14 and report.shards == (3 if sharded else 1) and report.codes_moved > 0
    assert report.verified_tensors >= 14 * 3  # every merged tensor read back from the files
    expected, got = checkpoint_tensors(tmp_path / "in-memory"), checkpoint_tensors(tmp_path / "streamed")
    assert expected.keys() == got.keys()
    assert all(expected[k].dtype == got[k].dtype and torch.equal(expected[k], got[k]) for k in expected)
    if sharded:  # the base's layout: the same shards, each with the same tensor names (export tags shard names)
        def groups(folder):
            weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
            return sorted(sorted(k for k, s in weight_map.items() if s == shard) for shard in set(weight_map.values()))

        assert groups(tmp_path / "streamed") == groups(base)
    qc_mem = json.loads((tmp_path / "in-memory" / "config.json").read_text())["quantization_config"]
    qc_stream = json.loads((tmp_path / "streamed" / "config.json").read_text())["quantization_config"]
    for key in ("quant_method", "bits", "group_size", "sym", "checkpoint_format", "format", "zero_point", "desc_act"):
        assert qc_mem.get(key) == qc_stream.get(key), key
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "streamed", dtype=dtype)(input_ids=X).logits,
                           merged(input_ids=X).logits)


def test_streaming_refuses_before_writing_anything(gptq_dir, fp_dir, tmp_path):
    path = gptq_dir(Spec("llama", 4, True, False, "gptq"))
    _trained_adapter(path, "lota", "none", tmp_path)
    with pytest.raises(ValueError, match="is the base"):
        merge_checkpoint(path, tmp_path / "adapter", path, progress=False)
    with pytest.raises(ValueError, match="full-precision model"):
        merge_checkpoint(fp_dir("llama"), tmp_path / "adapter", tmp_path / "a", progress=False)
    other = gptq_dir(Spec("qwen2", 4, True, False, "gptq_v2"))
    with pytest.raises(ValueError, match="made for a base"):  # same names, other layers: the fingerprint check
        merge_checkpoint(other, tmp_path / "adapter", tmp_path / "b", progress=False)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "adapter_config.json").write_bytes((tmp_path / "adapter" / "adapter_config.json").read_bytes())
    save_file({**saved, "base_model.model.lm_head.modules_to_save.default.weight": torch.zeros(2, 2)},
              str(tmp_path / "extra" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="modules_to_save"):
        merge_checkpoint(path, tmp_path / "extra", tmp_path / "d", progress=False)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "LORA"}))
    (tmp_path / "lora" / "adapter_model.safetensors").write_bytes(
        (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="LORA adapter"):
        merge_checkpoint(path, tmp_path / "lora", tmp_path / "c", progress=False)
    assert not any((tmp_path / n).exists() for n in ("a", "b", "c", "d"))


def test_merge_stream_on_the_command_line_checks_what_it_wrote(gptq_dir, tmp_path, capsys):
    from peft_lota import cli

    path = gptq_dir(Spec("llama", 4, True, False, "gptq"))
    _trained_adapter(path, "lota", "none", tmp_path)
    assert cli.main(["merge", str(path), str(tmp_path / "adapter"), str(tmp_path / "out"), "--stream"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"reloaded logits == adapter logits +True", printed)
    assert re.search(r"read back == computed +True", printed)
    assert cli.main(["merge", str(path), str(tmp_path / "adapter"), str(tmp_path / "x"), "--stream",
                     "--push", "me/x"]) == 2
    assert cli.main(["merge", str(path), str(tmp_path / "adapter"), str(path), "--stream"]) == 2  # OUT is the base
    assert "drop --calib_file, --push" in capsys.readouterr().err and not (tmp_path / "x").exists()
