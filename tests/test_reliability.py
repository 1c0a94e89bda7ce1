"""Misuse and faults: every one is refused with a message that says what to do, or handled exactly.

(Saving: tests/test_export.py. Bad configuration values: test_lota_gptq.py, test_l4q.py.)
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainingArguments

import peft_lota
from peft_lota import L4QConfig, LotaCallback, LotaConfig, LotaLayer, create_lota_optimizer
from tiny_models import Spec, calibration_texts, load_gptq, logits

ROOT = Path(__file__).resolve().parents[1]
X = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
A2 = Spec("llama", 2, False, False, "gptq_v2")  # groups of 32
A2_ALL = Spec("llama", 2, True, True, "gptq", group_size=-1)  # same shapes and bits, one group per column
B4 = Spec("qwen2", 4, True, False, "gptq_v2")


def trained_adapter(path, tmp_path, config) -> Path:
    model = get_peft_model(load_gptq(path), config)
    with torch.no_grad():
        for layer in [m for m in model.modules() if isinstance(m, LotaLayer)]:
            layer.lota_B["default"].copy_(torch.randint(-1, 2, layer.lota_B["default"].shape).float())
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


# ---- loading an adapter ------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["lota", "l4q"])
def test_an_adapter_loads_only_onto_the_base_it_was_made_for(gptq_dir, tmp_path, method):
    config = LotaConfig(r=4, omega=1, init_seed=0) if method == "lota" else L4QConfig(r=4, init_seed=0)
    model = get_peft_model(load_gptq(gptq_dir(A2)), config)
    saved = json.loads(json.dumps(config.base_layers))
    assert len(saved) == 14 and saved["model.layers.0.self_attn.q_proj"][:5] == ["gptq", 128, 128, 2, 4]
    model.save_pretrained(tmp_path / "adapter")
    assert PeftModel.from_pretrained(load_gptq(gptq_dir(A2)), tmp_path / "adapter")  # its own base: fine
    for other, what in ((A2_ALL, "1 groups"), (B4, "4-bit")):  # other groups; other bits and checkpoint
        with pytest.raises(ValueError, match=f"made for a base whose layer .* is GPTQ 2-bit .*; this model's is .*{what}"):
            PeftModel.from_pretrained(load_gptq(gptq_dir(other)), tmp_path / "adapter")


@pytest.mark.parametrize("train_mode", ["ternary", "latent"])  # latent: checked although the latents are loaded
def test_a_corrupt_or_misshapen_adapter_file_is_refused(gptq_dir, tmp_path, train_mode):
    path = gptq_dir(A2)
    adapter = trained_adapter(path, tmp_path, LotaConfig(r=4, omega=1, init_seed=0, train_mode=train_mode))
    file = adapter / "adapter_model.safetensors"
    tensors = load_file(str(file))
    key = next(k for k in tensors if k.endswith("lota_B"))
    bad = dict(tensors)
    bad[key] = tensors[key].clone()
    bad[key][0] = 0xFF  # 2-bit code 3: not a ternary value
    save_file(bad, str(file))
    with pytest.raises(ValueError, match="invalid 2-bit codes"):
        PeftModel.from_pretrained(load_gptq(path), adapter)
    bad[key] = tensors[key][:-1].clone()  # too short for this model's layer
    save_file(bad, str(file))
    with pytest.raises(ValueError, match="another shape or another rank"):
        PeftModel.from_pretrained(load_gptq(path), adapter)


@pytest.mark.slow
def test_loading_without_import_needs_the_opt_in_hook(gptq_dir, tmp_path):
    adapter = trained_adapter(gptq_dir(A2), tmp_path, LotaConfig(r=4, omega=1, init_seed=0))
    load = ("from peft import AutoPeftModelForCausalLM; from transformers import GPTQConfig; "
            f"m = AutoPeftModelForCausalLM.from_pretrained({str(adapter)!r}, "
            "quantization_config=GPTQConfig(bits=2, backend='gptq_torch')); print(type(m).__name__)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    plain = subprocess.run([sys.executable, "-c", load], env=env, capture_output=True, text=True, timeout=300)
    assert plain.returncode != 0 and "KeyError: 'LOTA'" in plain.stderr  # PEFT's own error: no plugin discovery
    hooked = subprocess.run([sys.executable, "-c", "import peft_lota_autoload; peft_lota_autoload.activate(); " + load],
                            env=env, capture_output=True, text=True, timeout=300)
    assert hooked.returncode == 0 and "PeftModelForCausalLM" in hooked.stdout, hooked.stderr[-2000:]


# ---- resuming ------------------------------------------------------------------------------------------------

def _blocks(tokenizer, n=24, seq=32):
    ids = [t for text in calibration_texts(n=n, seed=1, chars=600) for t in tokenizer(text)["input_ids"]]
    return [{"input_ids": torch.tensor(ids[i * seq:(i + 1) * seq]), "labels": torch.tensor(ids[i * seq:(i + 1) * seq])}
            for i in range(n)]


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_resume_without_optimizer_state_is_exact_or_refused(gptq_dir, tokenizer, tmp_path, momentum, caplog):
    path, data = gptq_dir(A2), _blocks(tokenizer)

    def run(out, **kw):
        model = get_peft_model(load_gptq(path), LotaConfig(r=4, omega=1, init_seed=0, train_mode="ternary"))
        opt = create_lota_optimizer(model, ternary_kwargs={"q_start": 0.5, "q_mid": 0.6, "q_end": 0.7,
                                                           "momentum": momentum})
        args = dict(output_dir=str(out), per_device_train_batch_size=4, max_steps=6, report_to=[], use_cpu=True,
                    save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0, data_seed=0)
        args.update(kw)
        return model, Trainer(model=model, args=TrainingArguments(**args), train_dataset=data,
                              optimizers=(opt, None), callbacks=[LotaCallback()])

    def state(model):
        return {n: p.detach().clone() for n, p in model.named_parameters() if ".lota_" in n}

    model, trainer = run(tmp_path / "full")
    trainer.train()
    full = state(model)
    model, trainer = run(tmp_path / "halves", save_strategy="steps", save_steps=3)
    trainer.train()
    (tmp_path / "halves" / "checkpoint-3" / "optimizer.pt").unlink()
    model, trainer = run(tmp_path / "halves")
    if momentum:
        with pytest.raises(ValueError, match="optimizer.pt"):
            trainer.train(resume_from_checkpoint=str(tmp_path / "halves" / "checkpoint-3"))
        return
    with caplog.at_level(logging.WARNING, logger="peft_lota"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "halves" / "checkpoint-3"))
    assert "resumes at step 3" in caplog.text
    assert all(torch.equal(full[k], v) for k, v in state(model).items())


# ---- smaller misuses -------------------------------------------------------------------------------------------

def test_config_mistakes_fail_at_config_time():
    with pytest.raises(ValueError, match="target_modules is empty"):
        LotaConfig(target_modules=[])
    with pytest.raises(ValueError, match="init_seed must be an integer"):
        LotaConfig(init_seed="x")
    with pytest.raises(ValueError, match="init_seed must be an integer"):
        L4QConfig(init_seed="x")


def test_a_failing_get_peft_model_leaves_the_model_as_it_was(gptq_dir):
    model = load_gptq(gptq_dir(A2))
    before = logits(model, X)
    with pytest.raises(TypeError, match="cannot adapt module"):  # q_proj fine, lm_head (not GPTQ) fails after it
        get_peft_model(model, LotaConfig(r=4, target_modules=["q_proj", "lm_head"]))
    assert not any(isinstance(m, LotaLayer) for m in model.modules())
    assert torch.equal(logits(model, X), before)


@pytest.mark.parametrize("method", ["lota", "l4q"])
def test_training_through_a_merged_adapter_and_saving_an_unloaded_one_say_what_to_do(gptq_dir, tmp_path, method):
    config = LotaConfig(r=4, omega=1, init_seed=0) if method == "lota" else L4QConfig(r=4, init_seed=0)
    model = get_peft_model(load_gptq(gptq_dir(A2)), config)
    model.merge_adapter()
    model.train()
    with pytest.raises(RuntimeError, match="unmerge_adapter"):
        model(input_ids=X, labels=X).loss.backward()
    model.unmerge_adapter()
    model(input_ids=X, labels=X).loss.backward()  # fine again
    model.merge_and_unload()
    with pytest.raises(ValueError, match="merge_and_unload"):
        model.save_pretrained(tmp_path / "empty")
    assert not (tmp_path / "empty" / "adapter_model.safetensors").exists()


def test_trainer_clipping_turned_off_is_a_warning(gptq_dir, tokenizer, tmp_path, caplog):
    model = get_peft_model(load_gptq(gptq_dir(A2)), LotaConfig(r=4, omega=1, train_mode="ternary"))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                             disable_tqdm=True, per_device_train_batch_size=2)
    trainer = Trainer(model=model, args=args, train_dataset=_blocks(tokenizer, n=4),
                      optimizers=(create_lota_optimizer(model), None), callbacks=[LotaCallback()])
    with caplog.at_level(logging.WARNING, logger="peft_lota"):
        trainer.train()
    assert any(r.levelno == logging.WARNING and "max_grad_norm 1.0 -> 0.0" in r.message for r in caplog.records)
    assert peft_lota  # (imported for registration)
