"""NaN and infinity never reach a merge, a saved adapter or a loaded one; a Trainer run stops at the first one;
bad inputs (calibration batches, ranks) are refused before the user's model is touched, and a failing call gives
the model back as it was."""

from __future__ import annotations

import json
import math
import re
import resource

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, Trainer, TrainerControl, TrainerState, TrainingArguments

import peft_lota
from peft_lota import L4QConfig, L4QLayer, LotaConfig, LotaLayer, NonFiniteCallback, NonFiniteError
from tiny_models import Spec, adapter_layers, calibration_texts, load_gptq, logits, tiered

SPEC = Spec("llama", 4, True, False, "gptq")
X = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
CONFIGS = {"lota": lambda **kw: LotaConfig(r=4, omega=1, init_seed=0, **kw),
           "l4q": lambda **kw: L4QConfig(r=4, init_seed=0, **kw)}


def quantized_buffers(model) -> dict:
    return {n: t.clone() for n, t in model.state_dict().items() if n.endswith(("qweight", "qzeros", "scales"))}


# ---- merge and save ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, attr, value", [
    ("lota", "lota_A", math.nan), ("lota", "lota_B", math.inf), ("lota", "lota_scales", math.nan),
    ("l4q", "l4q_A", math.nan), ("l4q", "l4q_B", -math.inf), ("l4q", "l4q_scales", math.nan)])
def test_merge_and_save_refuse_a_non_finite_adapter_tensor_naming_it(gptq_dir, tmp_path, method, attr, value):
    model = get_peft_model(load_gptq(gptq_dir(SPEC)), CONFIGS[method]())
    layer = adapter_layers(model)[3]
    with torch.no_grad():
        getattr(layer, attr)["default"][0, 1] = value  # one entry: a NaN latent alone would merge as 0
    before = quantized_buffers(model)
    for merge in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(NonFiniteError, match=re.escape(f"{layer._current_key}.{attr}.default holds")):
            merge()
    assert not any(m.merged for m in adapter_layers(model))  # refused before any layer was written
    assert all(torch.equal(t, before[n]) for n, t in quantized_buffers(model).items())
    with pytest.raises(NonFiniteError, match=re.escape(f"{layer._current_key}.{attr}.default holds")):
        model.save_pretrained(tmp_path / "adapter")
    assert not (tmp_path / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("method", ["lota", "l4q"])
def test_a_merge_that_would_write_non_finite_scales_or_codes_is_refused(gptq_dir, method):
    model = get_peft_model(load_gptq(gptq_dir(SPEC)), CONFIGS[method]())
    layer = adapter_layers(model)[0]
    with torch.no_grad():
        if method == "lota":  # finite multipliers of the scales, whose product overflows
            layer.lota_scales["default"][0, 0] = 1e37
        else:  # finite factors whose product B A overflows float32: codes round(inf - inf) would be written
            layer.l4q_A["default"].fill_(1e20)
            layer.l4q_B["default"][:, 0] = 1e20
            layer.l4q_B["default"][:2, 1] = -1e20
    what = "the scales a merge would write" if method == "lota" else "the codes a merge of adapter 'default'"
    with pytest.raises(NonFiniteError, match=re.escape(f"{layer._current_key}: {what}")):
        model.merge_and_unload()
    assert not any(m.merged for m in adapter_layers(model))


def test_a_diverged_training_run_never_reaches_a_checkpoint(gptq_dir, tmp_path):
    model = get_peft_model(load_gptq(gptq_dir(SPEC)), LotaConfig(r=4, omega=1, init_seed=0))  # latent, scales
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    (model(input_ids=X, labels=X).loss * math.inf).backward()  # an overflowing loss: inf/NaN gradients
    opt.step()
    model.eval()
    with pytest.raises(NonFiniteError, match=r"lota_(A|B|scales)\.default holds"):
        model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(NonFiniteError, match=r"lota_(A|B|scales)\.default holds"):
        model.merge_and_unload()
    assert not any(m.merged for m in adapter_layers(model))


def test_the_export_guard_refuses_a_checkpoint_with_a_non_finite_tensor():
    from peft_lota.tuner import refuse_non_finite_checkpoint

    tensors = {"x.qweight": torch.zeros(4, 4, dtype=torch.int32), "x.scales": torch.ones(2, 4, dtype=torch.float16)}
    refuse_non_finite_checkpoint(tensors)  # fine
    tensors["x.scales"][1, 2] = math.inf
    with pytest.raises(NonFiniteError, match=r"Checkpoint tensor x\.scales holds 0 NaN and 1 infinite .* save refused"):
        refuse_non_finite_checkpoint(tensors)


# ---- load ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, suffix", tiered([("lota", "lota_A_latent"), ("lota", "lota_scales_latent"),
                                                   ("l4q", "l4q_A"), ("l4q", "l4q_scales")],
                                                  [("lota", "lota_scales_latent"), ("l4q", "l4q_A")], unpack=True,
                                                  ids=lambda c: "-".join(c)))
def test_loading_refuses_a_non_finite_adapter_tensor_naming_it(gptq_dir, tmp_path, method, suffix):
    path = gptq_dir(SPEC)
    get_peft_model(load_gptq(path), CONFIGS[method]()).save_pretrained(tmp_path / "adapter")
    file = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(file))
    key = next(k for k in tensors if k.endswith(suffix))
    tensors[key][0, 0] = math.nan
    save_file(tensors, str(file))
    with pytest.raises(NonFiniteError, match=re.escape(f"Adapter tensor {key}") + ".* load refused"):
        PeftModel.from_pretrained(load_gptq(path), tmp_path / "adapter")
    model = get_peft_model(load_gptq(path), CONFIGS[method]())
    with pytest.raises(NonFiniteError, match=re.escape(f"Adapter tensor {key}")):
        model.load_adapter(tmp_path / "adapter", adapter_name="other")


# ---- Trainer ------------------------------------------------------------------------------------------------

def _data(tokenizer, n=8, seq=16):
    ids = [t for text in calibration_texts(n=n, seed=1, chars=400) for t in tokenizer(text)["input_ids"]]
    return [{"input_ids": torch.tensor(ids[i * seq:(i + 1) * seq]), "labels": torch.tensor(ids[i * seq:(i + 1) * seq])}
            for i in range(n)]


def _nan_gradients_from_step_2(model) -> None:
    """From the second backward pass on, one LoTA tensor gets NaN gradients, as from an overflow."""
    calls = []

    def hook(grad):
        calls.append(1)
        return grad * math.nan if len(calls) >= 2 else grad

    adapter_layers(model)[0].lota_B["default"].register_hook(hook)


@pytest.mark.parametrize("callback", [True, False])
def test_a_trainer_run_stops_at_the_first_non_finite_step(gptq_dir, tokenizer, tmp_path, callback):
    model = get_peft_model(load_gptq(gptq_dir(SPEC)), LotaConfig(r=4, omega=1, init_seed=0))
    _nan_gradients_from_step_2(model)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=4, report_to=[],
                             use_cpu=True, save_strategy="steps", save_steps=1, logging_steps=1, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=_data(tokenizer),
                      callbacks=[NonFiniteCallback()] if callback else [])
    if callback:  # stopped before the optimizer step that would have made the parameters NaN
        with pytest.raises(NonFiniteError, match=r"stopped at step 1: the gradient of \S+\.lota_(A|B)\.default"):
            trainer.train()
        assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    else:  # a stock Trainer: its next checkpoint save is refused
        with pytest.raises(NonFiniteError, match=r"lota_(A|B|scales)\.default holds"):
            trainer.train()
    assert (tmp_path / "checkpoint-1" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "checkpoint-2" / "adapter_model.safetensors").exists()


def test_the_callback_stops_on_a_logged_non_finite_loss(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    state, callback = TrainerState(global_step=7), NonFiniteCallback()
    callback.on_log(args, state, TrainerControl(), logs={"loss": 2.5, "grad_norm": 1.0})  # fine
    with pytest.raises(NonFiniteError, match="step 7: the logged loss is nan"):
        callback.on_log(args, state, TrainerControl(), logs={"loss": math.nan})
    assert isinstance(peft_lota.LotaCallback(), NonFiniteCallback)  # t-SignSGD runs get the same checks


def test_fp16_loss_scaling_overflow_steps_are_not_stopped(tmp_path, monkeypatch):
    """fp16 mixed precision skips a step whose scaled gradients overflow, by design: not a divergence. accelerate
    launch --mixed_precision fp16 sets it through the environment, without TrainingArguments(fp16=True)."""
    model = torch.nn.Linear(2, 2)
    model.weight.grad = torch.full_like(model.weight, math.inf)
    state, callback = TrainerState(global_step=3), NonFiniteCallback()
    with pytest.raises(NonFiniteError, match="gradient of weight"):
        callback.on_pre_optimizer_step(TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True),
                                       state, TrainerControl(), model=model)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    callback.on_pre_optimizer_step(args, state, TrainerControl(), model=model)
    callback.on_log(args, state, TrainerControl(), logs={"loss": 2.5, "grad_norm": math.inf})


# ---- calibration: batches checked first, the model given back on failure ----------------------------------------

@pytest.fixture(scope="module")
def fp_model(fp_dir):
    path = fp_dir("llama")
    return lambda: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _state(model) -> dict:
    return {"modules": dict(model.named_modules()), "flags": {n: p.requires_grad for n, p in model.named_parameters()},
            "training": model.training, "attrs": set(vars(model)), "logits": logits(model, X)}


def _assert_same(model, before):
    after = _state(model)
    assert after["modules"].keys() == before["modules"].keys()
    assert all(after["modules"][n] is m for n, m in before["modules"].items())
    assert after["flags"] == before["flags"] and after["training"] == before["training"]
    assert after["attrs"] == before["attrs"]  # no peft_config left behind
    assert not any(isinstance(m, L4QLayer) for m in model.modules())
    assert torch.equal(after["logits"], before["logits"])


@pytest.mark.parametrize("batch, message", [
    (torch.zeros(1, 0, dtype=torch.long), r"has shape \(1, 0\); pass non-empty input_ids"),
    (torch.rand(1, 8), "is a torch.float32; pass token ids"),
    (torch.full((1, 8), 600), r"holds token ids 600..600, outside this model's vocabulary 0..511"),
    (torch.full((1, 8), -1), r"holds token ids -1..-1, outside")])
def test_calibration_batches_are_checked_before_the_model_is_touched(fp_model, batch, message):
    model = fp_model()
    model.train()
    before = _state(model)
    good = torch.randint(0, 512, (1, 8))
    with pytest.raises(ValueError, match=f"calibrate: batch 1 {message}"):
        peft_lota.calibrate(model, [good, batch], bits=2, group_size=32, r=4, epochs=1, progress=False)
    _assert_same(model, before)


@pytest.mark.parametrize("where", ["a block", "the merge"])
def test_a_calibration_that_fails_later_gives_the_model_back_as_it_was(fp_model, monkeypatch, where):
    model = fp_model()
    before, config = _state(model), model.config.to_dict()

    def stop(*args):
        raise RuntimeError("stopped")

    if where == "the merge":  # after the unload: GPTQ layers in the model, a quantization_config in its config
        monkeypatch.setattr("peft_lota.export.attach_export", stop)
    with pytest.raises(RuntimeError, match="stopped"):
        peft_lota.calibrate(model, [torch.randint(0, 512, (1, 16))], bits=2, group_size=32, r=4, epochs=1,
                            progress=False, on_block=stop if where == "a block" else None)
    _assert_same(model, before)
    assert model.config.to_dict() == config


# ---- adapter configs checked against the base before allocating ----------------------------------------------

def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


@pytest.mark.parametrize("method", ["lota", "l4q"])
def test_a_huge_rank_is_refused_before_anything_is_allocated(gptq_dir, tmp_path, method):
    path = gptq_dir(SPEC)
    get_peft_model(load_gptq(path), CONFIGS[method]()).save_pretrained(tmp_path / "adapter")
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "r": 2 ** 24}))
    base = load_gptq(path)
    before, peak = logits(base, X), _peak_rss()
    message = (r"r=16777216 is too large for layer model\.layers\.0\.\S+: r must be at most "
               r"min\(in_features=128, out_features=(64|128)\) = (64|128)\. Lower r")
    with pytest.raises(ValueError, match=message):  # (the factors would take 8 GiB per layer)
        PeftModel.from_pretrained(base, tmp_path / "adapter")
    with pytest.raises(ValueError, match=message):
        get_peft_model(base, LotaConfig(r=2 ** 24, omega=1) if method == "lota" else L4QConfig(r=2 ** 24))
    assert _peak_rss() - peak < 256 << 20
    assert not adapter_layers(base) and torch.equal(logits(base, X), before)


def test_a_rank_one_layer_cannot_take_fails_after_others_were_adapted_and_leaves_the_model(gptq_dir):
    base = load_gptq(gptq_dir(SPEC))
    before = logits(base, X)
    targets = r".*layers\.0\.self_attn\.(q|o)_proj|.*layers\.1\.self_attn\.k_proj"  # [128, 128], then [128, 64]
    with pytest.raises(ValueError, match=r"r=100 is too large for layer model\.layers\.1\.self_attn\.k_proj"):
        get_peft_model(base, LotaConfig(r=100, target_modules=targets))
    assert not any(isinstance(m, LotaLayer) for m in base.modules())
    assert torch.equal(logits(base, X), before)
