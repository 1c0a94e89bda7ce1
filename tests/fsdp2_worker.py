"""LoTA / L4Q training of a tiny quantized model sharded with torch's FSDP2 (`fully_shard`), for test_sharded.py.

Run under `torchrun --nproc_per_node 2` (gloo on CPU) it shards every decoder layer and the root, and for each job:
  1. trains `--steps` steps and saves the adapter, gathered from the shards, as a standard PEFT adapter (`full/`);
  2. trains a fresh model `--stop_at` steps, saves model and optimizer with torch.distributed.checkpoint, builds
     another fresh model and optimizer (as a restarted job would), loads the checkpoint and trains to the end
     (`resumed/`).
Run alone (no torchrun) it is the single-process reference: the same steps, each rank's micro-batch in turn, and
their gradients averaged as FSDP2 averages the ranks' (each halved, then added), saved to `single/`. (Halving the
loss instead would be the same arithmetic only if the backward ran in float32 throughout: AWQ's kernel computes in
float16, where halving a subnormal gradient rounds.)

Each step's global batch is 4 blocks; rank r takes blocks 2r and 2r+1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peft import get_peft_model  # noqa: E402

from peft_lota import L4QConfig, LotaConfig, create_lota_optimizer  # noqa: E402
from peft_lota.sharded import gather_adapter, is_sharded, load_adapter  # noqa: E402
from tiny_models import load_awq, load_gptq  # noqa: E402

MICRO = 2
# a fast schedule, so that 4 steps move codes in a tiny model; momentum, so that the resume restores optimizer state
LOTA = dict(q_start=0.5, q_mid=0.6, q_end=0.7, momentum=0.5)


def build(job: dict, steps: int, sharded: bool):
    """A fresh adapted model (sharded when asked) and its optimizer."""
    base = (load_gptq if job["format"] == "gptq" else load_awq)(job["path"])
    # LoTA also trains a copy of the final norm (modules_to_save): t-SignSGD and AdamW in one optimizer, both resumed
    config = (LotaConfig(r=4, omega=1, init_seed=0, train_mode="ternary", modules_to_save=["norm"])
              if job["method"] == "lota" else L4QConfig(r=4, init_seed=0))
    model = get_peft_model(base, config)
    if sharded:
        from torch.distributed.fsdp import fully_shard

        blocks = set(base._no_split_modules)
        for module in model.modules():
            if type(module).__name__ in blocks:
                fully_shard(module)
        fully_shard(model)
        from torch.distributed.tensor import DTensor

        adapter = [p for n, p in model.named_parameters() if p.requires_grad]
        assert adapter and all(isinstance(p, DTensor) for p in adapter), "fully_shard left the adapter unsharded"
    if job["method"] == "lota":  # the paper's t-SignSGD; created after fully_shard, on the sharded parameters
        optimizer = create_lota_optimizer(model, ternary_kwargs=LOTA, total_steps=steps)
    else:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    return model, optimizer


def train(model, optimizer, blocks: torch.Tensor, start: int, stop: int, sharded: bool) -> None:
    for step in range(start, stop):
        batch = blocks[4 * step:4 * step + 4]
        if sharded:  # FSDP2 averages the ranks' gradients
            x = batch[MICRO * dist.get_rank():MICRO * (dist.get_rank() + 1)]
            model(input_ids=x, labels=x).loss.backward()
        else:
            grads = []
            for i in range(2):
                x = batch[MICRO * i:MICRO * (i + 1)]
                model(input_ids=x, labels=x).loss.backward()
                grads.append({p: p.grad for p in model.parameters() if p.grad is not None})
                optimizer.zero_grad(set_to_none=True)
            for p, g in grads[0].items():
                p.grad = g / 2 + grads[1][p] / 2
        optimizer.step()
        optimizer.zero_grad()


def save_adapter(model, job: dict, out: Path, sharded: bool) -> None:
    """The trained adapter as a standard PEFT adapter directory. Sharded, the way finetune.py does it: gathered from
    the shards, loaded on rank 0 into an unsharded model built the same way, saved from there."""
    if sharded:
        assert is_sharded(model)
        state = gather_adapter(model)
        if dist.get_rank() == 0:
            model, _ = build(job, 1, sharded=False)
            load_adapter(model, state)
        else:
            assert state == {}
        dist.barrier()
    if not sharded or dist.get_rank() == 0:
        model.save_pretrained(out)


def checkpoint_state(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def run_job(job: dict, blocks: torch.Tensor, steps: int, stop_at: int, sharded: bool) -> None:
    out = Path(job["out"])
    model, optimizer = build(job, steps, sharded)
    train(model, optimizer, blocks, 0, steps, sharded)
    save_adapter(model, job, out / ("full" if sharded else "single"), sharded)
    if not sharded:
        return

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    model, optimizer = build(job, steps, sharded)
    train(model, optimizer, blocks, 0, stop_at, sharded)
    dcp.save(checkpoint_state(model, optimizer), checkpoint_id=str(out / "dcp"))
    model, optimizer = build(job, steps, sharded)  # a restarted job: new model, new optimizer
    state = checkpoint_state(model, optimizer)
    dcp.load(state, checkpoint_id=str(out / "dcp"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    train(model, optimizer, blocks, stop_at, steps, sharded)
    save_adapter(model, job, out / "resumed", sharded)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", required=True, help="a JSON list of {method, format, path, out}")
    ap.add_argument("--blocks", required=True, help="a .pt file: [4 * steps, seq] token ids")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--stop_at", type=int, default=2)
    args = ap.parse_args()
    sharded = "RANK" in os.environ
    if sharded:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    blocks = torch.load(args.blocks)
    for job in json.loads(args.jobs):
        run_job(job, blocks, args.steps, args.stop_at, sharded)
    if sharded:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
