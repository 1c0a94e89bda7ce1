"""Sharded training on torch's FSDP2 (`fully_shard`, 2 CPU processes on gloo) for LoTA and L4Q on GPTQ and AWQ.

accelerate runs FSDP on accelerators only (on CPU, `accelerate launch --use_fsdp` trains with DDP), so these tests
drive FSDP2 directly, as accelerate's FSDP2 plugin does on GPUs: every decoder layer and the root are
`fully_shard`ed, the optimizer is built on the sharded parameters, and checkpoints go through
torch.distributed.checkpoint. The packed integer codes are buffers, which FSDP2 leaves whole on every rank; the
adapter tensors are sharded and gathered for each forward.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import peft_lota
from peft_lota.tuner_layer import codes_moved
from tiny_models import AwqSpec, Spec, calibration_texts, train_steps

pytestmark = pytest.mark.slow  # minutes: `pytest -m "not slow"` leaves it out

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "fsdp2_worker.py"
GPTQ = Spec("llama", 2, False, False, "gptq_v2")  # in SPECS_MATRIX: built once per session
AWQ = AwqSpec("llama", 4, False, 32)
STEPS, STOP_AT, SEQ = 4, 2, 32
JOBS = [("lota", "gptq"), ("l4q", "gptq"), ("lota", "awq"), ("l4q", "awq")]


def _worker(args: list[str], sharded: bool, cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TORCHDYNAMO_DISABLE": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd = [*(launcher if sharded else [sys.executable]), str(WORKER), *args]
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.fixture(scope="module")
def runs(gptq_dir, awq_dir, tokenizer, tmp_path_factory):
    """Every job trained three ways: FSDP2 on 2 processes, FSDP2 stopped and resumed, and one process."""
    root = tmp_path_factory.mktemp("sharded")
    ids = [t for text in calibration_texts(n=32, seed=3, chars=600) for t in tokenizer(text)["input_ids"]]
    torch.save(torch.tensor(ids[:4 * STEPS * SEQ]).view(4 * STEPS, SEQ), root / "blocks.pt")
    paths = {"gptq": gptq_dir(GPTQ), "awq": awq_dir(AWQ)}
    jobs = [{"method": m, "format": f, "path": str(paths[f]), "out": str(root / f"{m}-{f}")} for m, f in JOBS]
    args = ["--jobs", json.dumps(jobs), "--blocks", str(root / "blocks.pt"), "--steps", str(STEPS),
            "--stop_at", str(STOP_AT)]
    _worker(args, sharded=True, cwd=root)
    _worker(args, sharded=False, cwd=root)
    return {(j["method"], j["format"]): Path(j["out"]) for j in jobs}


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "adapter_model.safetensors")


@pytest.mark.parametrize("method,fmt", JOBS)
def test_fsdp2_training_equals_one_process_and_resumes_exactly(runs, method, fmt):
    """Two FSDP2 ranks end with the adapter one process gets from the same steps, tensor for tensor, and so does a
    run saved and resumed through torch.distributed.checkpoint halfway. (FSDP2 halves each rank's gradient and adds
    them; the single process averages its two micro-batches' gradients the same way. LoTA's threshold is taken over
    the whole gradient, not a shard.)"""
    out = runs[(method, fmt)]
    single, full, resumed = (_adapter(out / d) for d in ("single", "full", "resumed"))
    assert single.keys() == full.keys() == resumed.keys() and single
    for name, tensor in single.items():
        assert torch.equal(full[name], tensor), name
        assert torch.equal(resumed[name], tensor), name
    adapter_config = json.loads((out / "full" / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == peft_lota.registry.method(method).name


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_adapter_saved_from_shards_merges_exactly(runs, gptq_dir, awq_dir, fmt):
    """The adapter gathered from the FSDP2 shards is a standard PEFT adapter: it loads on a fresh base, moves
    codes, and its merge gives the logits of the adapter model."""
    base = peft_lota.load_model(str(gptq_dir(GPTQ) if fmt == "gptq" else awq_dir(AWQ)))
    model = PeftModel.from_pretrained(base, str(runs[("lota", fmt)] / "full"))
    x = torch.arange(SEQ)[None] % 200 + 3
    model.eval()
    with torch.no_grad():
        adapted = model(input_ids=x).logits
        assert codes_moved(model)[0] > 0
        assert torch.equal(model.merge_and_unload()(input_ids=x).logits, adapted)


@pytest.mark.parametrize("method", ["lota", "l4q"])
def test_device_map_with_disk_offload_trains_and_merges_as_without(gptq_dir, tmp_path, method):
    """A model placed by a device map that offloads a decoder layer to disk (what device_map="auto" does when the
    devices are full) trains, merges and saves exactly as the same model held whole. The packed codes are buffers,
    which accelerate keeps on the execution device; the offloaded layer's float weights come back for its forward."""
    path = gptq_dir(GPTQ)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "cpu"}
    config = {"lota": lambda: peft_lota.LotaConfig(r=4, init_seed=0), "l4q": lambda: peft_lota.L4QConfig(r=4, init_seed=0)}
    x = torch.arange(SEQ)[None] % 200 + 3
    results = []
    for placement in (device_map, None):
        kwargs = {"device_map": placement, "offload_folder": str(tmp_path / "offload")} if placement else {}
        base = peft_lota.load_model(str(path), **kwargs)
        assert (placement is None) or base.model.layers[1].input_layernorm.weight.device.type == "meta"
        model = get_peft_model(base, config[method]())
        train_steps(model, x, steps=2)
        with torch.no_grad():
            adapted = model(input_ids=x).logits
            merged = model.merge_and_unload()
            assert torch.equal(merged(input_ids=x).logits, adapted)
        out = tmp_path / f"merged-{len(results)}"
        merged.save_pretrained(out)
        results.append((adapted, load_file(out / "model.safetensors")))
    (offloaded, saved_offloaded), (whole, saved_whole) = results
    assert torch.equal(offloaded, whole)
    assert saved_offloaded.keys() == saved_whole.keys()
    assert all(torch.equal(saved_offloaded[k], saved_whole[k]) for k in saved_whole)
