"""The vLLM rows of the kernel table (`peft-lota inspect` / `merge`) against vLLM's own rules.

vLLM does not install beside this project's pinned torch, so the test asks a Python that has it: set
PEFT_LOTA_VLLM_PYTHON to that interpreter (e.g. a venv made with `pip install vllm==0.33.0`), or run in an environment
that has vllm. Skipped otherwise. tests/vllm_probe.py feeds each checkpoint config, as peft_lota writes it, to vLLM's
quantization config classes (and Marlin's support check that GPTQ and AWQ layers run as they are built); the
table must say "can serve" exactly where vLLM accepts, name the method vLLM picks, and name the version it follows.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from peft_lota import formats

PROBE = Path(__file__).resolve().parent / "vllm_probe.py"


def _vllm_python() -> str | None:
    if os.environ.get("PEFT_LOTA_VLLM_PYTHON"):
        return os.environ["PEFT_LOTA_VLLM_PYTHON"]
    return sys.executable if importlib.util.find_spec("vllm") else None


def _configs() -> list[dict]:
    gptq, awq = formats.by_name("gptq"), formats.by_name("awq")
    out = []
    for bits in (2, 3, 4, 8):
        for group_size in (32, 128, -1, 16):
            for sym in (True, False):
                for desc_act in (False, True):
                    qc = gptq.new_config(bits, group_size, sym)
                    qc["desc_act"] = desc_act
                    out.append(qc)
                qc = gptq.new_config(bits, group_size, sym)
                qc["checkpoint_format"] = qc["format"] = "gptq_v2"
                out.append(qc)
                out.append(awq.new_config(bits, group_size, sym))
            out.append(formats.by_name("compressed-tensors").new_config(bits, group_size, True))  # what convert writes
    ct_weights = {"dynamic": False, "group_size": 32, "num_bits": 4, "strategy": "group", "symmetric": True,
                  "type": "int", "actorder": None}
    ct = {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
          "ignore": ["lm_head"], "config_groups": {"group_0": {"format": "pack-quantized", "targets": ["Linear"],
                                                               "input_activations": None, "output_activations": None,
                                                               "weights": ct_weights}}}
    for bits in range(2, 9):
        for sym in (True, False):
            for strategy, group_size in (("group", 32), ("group", 128), ("channel", None)):
                for actorder in (None, "group", "weight"):
                    qc = copy.deepcopy(ct)
                    qc["config_groups"]["group_0"]["weights"].update(
                        num_bits=bits, symmetric=sym, strategy=strategy, group_size=group_size, actorder=actorder)
                    out.append(qc)
    return out


def _vllm_row(qc: dict) -> tuple[str, bool]:
    rows = [(name, ok) for name, _, ok in formats.config_format(qc).kernels(qc) if name.startswith("vLLM")]
    assert len(rows) == 1, rows
    return rows[0]


def test_kernel_table_follows_vllm():
    python = _vllm_python()
    if python is None:
        pytest.skip("no vLLM here: set PEFT_LOTA_VLLM_PYTHON to a Python that has `pip install vllm`")
    configs = _configs()
    proc = subprocess.run([python, str(PROBE), json.dumps(configs)], capture_output=True, text=True, timeout=900,
                          cwd=Path(PROBE).parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    version = ".".join(answer["version"].split(".")[:2])
    wrong = []
    for qc, got in zip(configs, answer["results"]):
        name, ok = _vllm_row(qc)
        assert f"vLLM {version} {got['method']}" in name, (name, got)
        if ok != got["accepted"]:
            wrong.append((formats.config_format(qc).name, {k: qc.get(k) for k in ("bits", "group_size", "sym",
                          "desc_act", "checkpoint_format", "zero_point")} if "bits" in qc
                          else qc["config_groups"]["group_0"]["weights"], ok, got["reason"]))
    assert not wrong, f"{len(wrong)} of {len(configs)} disagree: " + "\n".join(map(str, wrong[:12]))
