"""The peft-lota command line: merge, inspect, verify; exit codes; one-line errors for usage mistakes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from peft_lota import cli
from tiny_models import CLI_SPEC as SPEC
from tiny_models import Spec, saved_adapter

@pytest.fixture(scope="module")
def base(gptq_dir):
    return gptq_dir(SPEC)


@pytest.mark.parametrize("method", ["lota", "l4q"])
def test_merge_writes_a_verified_checkpoint_and_inspect_and_verify_agree(base, tmp_path, capsys, method):
    adapter = saved_adapter(base, tmp_path / "adapter", method)
    assert cli.main(["merge", str(base), str(adapter), str(tmp_path / "merged")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"merged logits == adapter logits\s+True", out) and re.search(r"reloaded logits == merged\s+True", out)
    assert "codes moved" in out and "auto_gptq (Marlin)" in out  # a symmetric 4-bit checkpoint stays on Marlin
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["quantization_config"]["sym"] is True

    assert cli.main(["inspect", str(adapter), "--base", str(base)]) == 0
    out = capsys.readouterr().out
    assert f"{method.upper()} adapter" in out and "per layer (codes moved):" in out
    assert cli.main(["inspect", str(tmp_path / "merged")]) == 0
    out = capsys.readouterr().out
    assert "GPTQ checkpoint" in out and "yes  vLLM 0.34 auto_gptq (Marlin)" in out and "yes  SGLang 0.5.23 gptq_marlin" in out

    assert cli.main(["verify", str(tmp_path / "merged"), "--against", str(adapter), "--base", str(base)]) == 0
    assert cli.main(["verify", str(tmp_path / "merged"), "--against", str(tmp_path / "merged")]) == 0
    assert cli.main(["verify", str(tmp_path / "merged"), "--against", str(base)]) == 1  # the codes moved: differs
    capsys.readouterr()


def test_usage_mistakes_are_one_line_and_exit_2(base, gptq_dir, tmp_path, capsys):
    assert cli.main(["merge", str(base), str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no adapter_config.json" in err
    assert cli.main(["inspect", str(tmp_path)]) == 2
    assert "it is not a model folder" in capsys.readouterr().err
    lora_dir = tmp_path / "lora"
    lora_dir.mkdir()
    (lora_dir / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    assert cli.main(["merge", str(base), str(lora_dir), str(tmp_path / "out")]) == 2
    assert "merges LoTA, L4Q and LoRA adapters" in capsys.readouterr().err
    (lora_dir / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    assert cli.main(["merge", str(base), str(lora_dir), str(tmp_path / "out")]) == 2
    assert "has no adapter_model.safetensors" in capsys.readouterr().err
    # another base than the adapter was made for: refused with the reason, in one line
    adapter = saved_adapter(base, tmp_path / "adapter", "lota")
    other = gptq_dir(Spec("qwen2", 4, True, False, "gptq_v2"))
    assert cli.main(["merge", str(other), str(adapter), str(tmp_path / "out")]) == 2
    assert "made for a base" in capsys.readouterr().err


@pytest.mark.slow
def test_the_console_script_is_installed():
    exe = Path(sys.executable).with_name("peft-lota")
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "merge" in proc.stdout and "inspect" in proc.stdout and "verify" in proc.stdout
    for command in ("merge", "inspect", "verify"):
        assert subprocess.run([str(exe), command, "--help"], capture_output=True, text=True,
                              timeout=120).returncode == 0


def test_merge_keeps_the_base_dtype(base, tmp_path, capsys, monkeypatch):
    """A bfloat16 base merges, and is checked, in bfloat16, and the merged config says so (it loads as the adapter
    model ran); --dtype still overrides."""
    from transformers import AutoModelForCausalLM, GPTQConfig

    bf16 = tmp_path / "bf16-base"
    shutil.copytree(base, bf16)
    config = json.loads((bf16 / "config.json").read_text())
    config.update(dtype="bfloat16", **({"torch_dtype": "bfloat16"} if "torch_dtype" in config else {}))
    (bf16 / "config.json").write_text(json.dumps(config))
    with warnings.catch_warnings():  # only the backend of our GPTQConfig is used: meant
        warnings.filterwarnings("ignore", message="You passed `quantization_config`")
        stock = AutoModelForCausalLM.from_pretrained(str(bf16), device_map="cpu",  # no dtype: transformers' default
                                                     quantization_config=GPTQConfig(bits=4, backend="gptq_torch"))
    assert {p.dtype for p in stock.parameters()} == {torch.bfloat16}
    adapter = saved_adapter(bf16, tmp_path / "adapter", "lota")
    compared = []
    from peft_lota import verify

    logits = verify.logits
    monkeypatch.setattr(verify, "logits", lambda model, ids: compared.append(logits(model, ids)) or compared[-1])

    assert cli.main(["merge", str(bf16), str(adapter), str(tmp_path / "merged")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"merged logits == adapter logits\s+True", out) and re.search(r"reloaded logits == merged\s+True",
                                                                                    out)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "bfloat16"
    assert len(compared) == 3 and {t.dtype for t in compared} == {torch.bfloat16}
    compared.clear()
    assert cli.main(["verify", str(tmp_path / "merged"), "--against", str(adapter), "--base", str(bf16)]) == 0
    assert {t.dtype for t in compared} == {torch.bfloat16}

    assert cli.main(["merge", str(bf16), str(adapter), str(tmp_path / "merged32"), "--dtype", "float32"]) == 0
    assert json.loads((tmp_path / "merged32" / "config.json").read_text())["dtype"] == "float32"
    capsys.readouterr()
