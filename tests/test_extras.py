"""Install only what your format needs: peft_lota imports and works without gptqmodel (the gptq and awq extras),
and a checkpoint whose format needs a missing library is refused with the line that installs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import CtSpec, Spec

pytestmark = pytest.mark.slow  # child processes that import torch: ~25 s

ROOT = Path(__file__).resolve().parents[1]

# Runs in a child process in which gptqmodel and optimum cannot be imported (as if not installed).
BLOCKED = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("gptqmodel", "optimum"):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None
sys.meta_path.insert(0, Block())
"""


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKED + code], capture_output=True, text=True, timeout=600,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT / "tests")})


def test_compressed_tensors_works_without_gptqmodel_and_gptq_says_what_to_install(ct_dir, gptq_dir):
    ct, gptq = ct_dir(CtSpec()), gptq_dir(Spec("llama", 4, True, False, "gptq"))
    proc = _run(f"""
import torch, peft_lota
from peft import get_peft_model
model = get_peft_model(peft_lota.load_model({str(ct)!r}), peft_lota.LotaConfig(r=4, init_seed=0))
x = torch.randint(0, 512, (1, 8))
before = model(input_ids=x).logits
merged = model.merge_and_unload()
assert torch.equal(merged(input_ids=x).logits, before)
assert not any(m.startswith("gptqmodel") for m in sys.modules)
try:
    peft_lota.load_model({str(gptq)!r})
except peft_lota.formats.MissingLibraryError as err:
    print("REFUSED:", err)
""")
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("REFUSED:"))
    assert 'pip install ".[gptq]"' in line and "gptqmodel and optimum" in line and "--no-build-isolation" in line


def test_the_command_line_refuses_a_gptq_checkpoint_in_one_line_without_gptqmodel(gptq_dir, tmp_path):
    gptq = gptq_dir(Spec("llama", 4, True, False, "gptq"))
    proc = _run(f"""
from peft_lota import cli
sys.exit(cli.main(["convert", {str(gptq)!r}, {str(tmp_path / "out")!r}, "--to", "awq"]))
""")
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and 'pip install ".[gptq]"' in err[-1], proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()
