"""Fine-tuning a real (tiny) GPTQ model with LoTA (the paper's t-SignSGD) and L4Q through a stock Trainer.

bf16 autocast, gradient accumulation, gradient checkpointing, resume_from_checkpoint, and
`accelerate launch` with two CPU processes running examples/finetune.py. (LoTA's default latent mode
under a Trainer: tests/test_lota_training.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from transformers import Trainer, TrainingArguments

import peft_lota
from peft_lota import L4QConfig, L4QLayer, LotaCallback, LotaConfig, LotaLayer, create_lota_optimizer
from tiny_models import Spec, calibration_texts, load_gptq

pytestmark = pytest.mark.slow  # minutes: `pytest -m "not slow"` leaves it out

ROOT = Path(__file__).resolve().parents[1]
SPEC = Spec("llama", 2, False, False, "gptq_v2")  # in SPECS_MATRIX: built once per session
SEQ = 32
# An aggressive schedule so that a few steps move codes in a 2-layer model (the defaults update 5%..0.01%).
FAST = {"q_start": 0.5, "q_mid": 0.6, "q_end": 0.7}


def lota_layers(model):
    return [m for m in model.modules() if isinstance(m, LotaLayer)]


def blocks(tokenizer, n=24):
    """`n` blocks of SEQ tokens of real text (stdlib source), as a list of Trainer examples."""
    ids = [t for text in calibration_texts(n=n, seed=1, chars=600) for t in tokenizer(text)["input_ids"]]
    out = []
    for i in range(n):
        block = torch.tensor(ids[i * SEQ:(i + 1) * SEQ])
        out.append({"input_ids": block, "labels": block.clone()})
    return out


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".lota_" in n or ".l4q_" in n}


def make_trainer(path, data, out_dir, **kw):
    model = get_peft_model(load_gptq(path), LotaConfig(r=4, omega=1, init_seed=0, train_mode="ternary"))
    args = dict(output_dir=str(out_dir), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                max_steps=6, report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
                disable_tqdm=True, seed=0, data_seed=0, dataloader_num_workers=0)
    args.update(kw)
    trainer = Trainer(model=model, args=TrainingArguments(**args), train_dataset=data,
                      optimizers=(create_lota_optimizer(model, ternary_kwargs=FAST), None), callbacks=[LotaCallback()])
    return model, trainer


@pytest.fixture(scope="module")
def setup(gptq_dir, tokenizer):
    return gptq_dir(SPEC), blocks(tokenizer)


def test_bf16_accumulation_and_checkpointing_train_identically(setup, tmp_path):
    """Gradient checkpointing recomputes the same forward: with it, training ends bit-identical."""
    path, data = setup
    results = []
    for checkpointing in (False, True):
        model, trainer = make_trainer(path, data, tmp_path / str(checkpointing), bf16=True,
                                      activation_checkpointing=checkpointing)
        trainer.train()
        assert trainer.optimizer.optimizer.ternary.param_groups[0]["total_steps"] == trainer.state.max_steps == 6
        results.append((adapter_state(model), model))
    (plain, model), (checkpointed, _) = results
    assert plain.keys() == checkpointed.keys()
    assert all(torch.equal(plain[k], checkpointed[k]) for k in plain)
    assert all(bool(((t == 0) | (t.abs() == 1)).all()) for t in plain.values())
    moved = sum(int((layer.get_delta_codes("default") != 0).sum()) for layer in lota_layers(model))
    assert moved > 0

    # Under bf16 autocast too, the merged model computes exactly what the adapter model computes.
    x = data[0]["input_ids"][None]
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        adapted = model(input_ids=x).logits
        merged = model.merge_and_unload()
        assert torch.equal(merged(input_ids=x).logits, adapted)


def test_lota_trainer_builds_t_signsgd_where_the_trainer_builds_its_optimizer(setup, tmp_path):
    """LotaTrainer (what FSDP needs: transformers refuses an optimizer passed in) trains exactly as a stock Trainer
    given create_lota_optimizer and LotaCallback."""
    path, data = setup
    model, trainer = make_trainer(path, data, tmp_path / "stock")
    trainer.train()
    expected = adapter_state(model)
    model = get_peft_model(load_gptq(path), LotaConfig(r=4, omega=1, init_seed=0, train_mode="ternary"))
    args = TrainingArguments(output_dir=str(tmp_path / "lota_trainer"), per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, max_steps=6, report_to=[], use_cpu=True, save_strategy="no",
                             logging_strategy="no", disable_tqdm=True, seed=0, data_seed=0, dataloader_num_workers=0)
    trainer = peft_lota.LotaTrainer(model=model, args=args, train_dataset=data, lota_kwargs={"ternary_kwargs": FAST})
    assert trainer.optimizer is None  # built in create_optimizer, on the parameters the Trainer trains
    trainer.train()
    assert sum(isinstance(c, LotaCallback) for c in trainer.callback_handler.callbacks) == 1
    got = adapter_state(model)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


def test_fresh_adapter_under_bf16_autocast_is_bit_identical(setup):
    path, data = setup
    x = data[0]["input_ids"][None]
    base = load_gptq(path)
    model = get_peft_model(load_gptq(path), LotaConfig(r=4, init_seed=0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model(input_ids=x).logits, base(input_ids=x).logits)


def test_resume_from_checkpoint_ends_with_the_same_adapter(setup, tmp_path):
    path, data = setup
    model, trainer = make_trainer(path, data, tmp_path / "full")
    trainer.train()
    full = adapter_state(model)

    model, trainer = make_trainer(path, data, tmp_path / "halves", save_strategy="steps", save_steps=3)
    trainer.train()  # writes checkpoint-3 (and checkpoint-6), a run we then pretend was cut at step 3
    assert all(torch.equal(full[k], v) for k, v in adapter_state(model).items())

    model, trainer = make_trainer(path, data, tmp_path / "halves")
    fresh = adapter_state(model)
    trainer.train(resume_from_checkpoint=str(tmp_path / "halves" / "checkpoint-3"))
    resumed = adapter_state(model)
    assert trainer.optimizer.optimizer.ternary.param_groups[0]["step"] == 6
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert not all(torch.equal(full[k], fresh[k]) for k in full)  # the run did train


def make_l4q_trainer(path, data, out_dir, **kw):
    model = get_peft_model(load_gptq(path), L4QConfig(r=4, init_seed=0))
    args = dict(output_dir=str(out_dir), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                max_steps=6, learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
                logging_strategy="no", disable_tqdm=True, seed=0, data_seed=0, dataloader_num_workers=0)
    args.update(kw)
    return model, Trainer(model=model, args=TrainingArguments(**args), train_dataset=data)  # the Trainer's AdamW


def test_l4q_trains_under_a_stock_trainer_bf16_accumulation_checkpointing_and_resume(setup, tmp_path):
    path, data = setup
    results = []
    for checkpointing in (False, True):
        model, trainer = make_l4q_trainer(path, data, tmp_path / str(checkpointing), bf16=True,
                                          activation_checkpointing=checkpointing)
        trainer.train()
        results.append(adapter_state(model))
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
    moved = sum(int((m.get_delta_codes("default") != 0).sum()) for m in model.modules() if isinstance(m, L4QLayer))
    assert moved > 0
    x = data[0]["input_ids"][None]
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        adapted = model(input_ids=x).logits
        assert torch.equal(model.merge_and_unload()(input_ids=x).logits, adapted)

    model, trainer = make_l4q_trainer(path, data, tmp_path / "full")
    trainer.train()
    full = adapter_state(model)
    model, trainer = make_l4q_trainer(path, data, tmp_path / "halves", save_strategy="steps", save_steps=3)
    trainer.train()
    model, trainer = make_l4q_trainer(path, data, tmp_path / "halves")
    trainer.train(resume_from_checkpoint=str(tmp_path / "halves" / "checkpoint-3"))
    assert all(torch.equal(full[k], v) for k, v in adapter_state(model).items())


@pytest.mark.parametrize("method", ["lota", "l4q"])
def test_accelerate_launch_two_cpu_processes(setup, tmp_path, tokenizer, method):
    """examples/finetune.py under `accelerate launch` with 2 processes (gloo): DDP keeps the ranks' ternary
    adapters identical, the main process merges, and the saved checkpoint reloads exactly."""
    path, _ = setup
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": t}) + "\n" for t in calibration_texts(n=32, seed=2, chars=500)))
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    # --multi_gpu picks the torchrun launcher; with --use_cpu each process then joins a gloo process group.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "examples" / "finetune.py"),
           "--model_name_or_path", str(path), "--train_file", str(train), "--validation_split_percentage", "20",
           "--block_size", str(SEQ), "--output_dir", str(out), "--max_steps", "4", "--per_device_train_batch_size", "2",
           "--r", "4", "--init_seed", "0", "--method", method,
           *(["--omega", "1", "--train_mode", "ternary", "--q_start", "0.5", "--q_mid", "0.6", "--q_end", "0.7"]
             if method == "lota" else ["--learning_rate", "5e-2"]),
           "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true", "--use_cpu", "true"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "lota_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["distributed_backend"] == "gloo" and summary["ranks_agree"] is True
    assert summary["steps"] == 4 and summary["codes_moved"] > 0
    assert summary["merged_equals_adapter"] and summary["reloaded_buffers_equal"] and summary["reloaded_logits_equal"]
    assert (out / "adapter_model.safetensors").exists() and (Path(summary["merged_dir"]) / "config.json").exists()
    peft_type = peft_lota.LOTA_PEFT_TYPE if method == "lota" else peft_lota.L4Q_PEFT_TYPE
    assert peft_type.value == json.loads((out / "adapter_config.json").read_text())["peft_type"]
