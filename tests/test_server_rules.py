"""The GPU servers' rows of the kernel table (`peft-lota inspect` / `merge` / `convert`) against the servers' own rules.

vLLM and SGLang do not install beside this project's pinned torch, so each test asks a Python that has the server:
PEFT_LOTA_VLLM_PYTHON / PEFT_LOTA_SGLANG_PYTHON name that interpreter (a venv made with `pip install vllm==0.34.0` or
`pip install sglang==0.5.23`), or the server is installed here. Skipped otherwise. tests/vllm_probe.py and
tests/sglang_probe.py feed each checkpoint config, as peft_lota writes it, to the server's quantization config classes
(and the Marlin checks its layers make as they are built, on an answered-as-H100 device); the table must say "can
serve" exactly where the server accepts, name the method it picks, and the version it follows.
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

HERE = Path(__file__).resolve().parent
SERVERS = {"vLLM": ("PEFT_LOTA_VLLM_PYTHON", "vllm", HERE / "vllm_probe.py"),
           "SGLang": ("PEFT_LOTA_SGLANG_PYTHON", "sglang", HERE / "sglang_probe.py")}


def _server_python(server: str) -> str | None:
    variable, module, _ = SERVERS[server]
    if os.environ.get(variable):
        return os.environ[variable]
    return sys.executable if importlib.util.find_spec(module) else None


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


def _row(server: str, qc: dict) -> tuple[str, bool]:
    rows = [(name, ok) for name, _, ok in formats.config_format(qc).kernels(qc) if name.startswith(server + " ")]
    assert len(rows) == 1, rows
    return rows[0]


@pytest.mark.parametrize("server", sorted(SERVERS))
def test_kernel_table_follows_the_server(server):
    python = _server_python(server)
    variable, module, probe = SERVERS[server]
    if python is None:
        pytest.skip(f"no {server} here: set {variable} to a Python that has `pip install {module}`")
    configs = _configs()
    proc = subprocess.run([python, str(probe), json.dumps(configs)], capture_output=True, text=True, timeout=900,
                          cwd=HERE.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    wrong = []
    for qc, got in zip(configs, answer["results"]):
        name, ok = _row(server, qc)
        assert answer["version"].startswith(name.split()[1]) and got["method"] in name, (name, answer["version"], got)
        if ok != got["accepted"]:
            wrong.append((formats.config_format(qc).name, {k: qc.get(k) for k in ("bits", "group_size", "sym",
                          "desc_act", "checkpoint_format", "zero_point")} if "bits" in qc
                          else qc["config_groups"]["group_0"]["weights"], ok, got["reason"]))
    assert not wrong, f"{len(wrong)} of {len(configs)} disagree: " + "\n".join(map(str, wrong[:12]))
