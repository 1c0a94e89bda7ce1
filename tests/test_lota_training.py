"""LoTA's training paths on real (tiny) GPTQ checkpoints: latent A, B under any optimizer (the default), the paper's
t-SignSGD (train_mode="ternary") refused when something else trains it, trained scales and wider steps merged
exactly, and Trainer runs (no optimizer passed, resume) for the latent path.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from transformers import Trainer, TrainingArguments

from peft_lota import LotaConfig, LotaLayer
from peft_lota.lota.layer import NotTernaryError
from tiny_models import FAST_SPECS, SPECS_MATRIX, Spec, X, calibration_texts, load_gptq, logits, tiered

SPEC = Spec("llama", 2, False, False, "gptq_v2")
SEQ = 32



def lota_layers(model):
    return [m for m in model.modules() if isinstance(m, LotaLayer)]


def codes_moved(model) -> int:
    return sum(int((layer.get_delta_codes(a) != 0).sum()) for layer in lota_layers(model) for a in layer.lota_A)


def blocks(tokenizer, n=24):
    ids = [t for text in calibration_texts(n=n, seed=1, chars=600) for t in tokenizer(text)["input_ids"]]
    return [{"input_ids": torch.tensor(ids[i * SEQ:(i + 1) * SEQ]), "labels": torch.tensor(ids[i * SEQ:(i + 1) * SEQ])}
            for i in range(n)]


def randomize(model, seed=0, scales=False):
    """Random latent values on both sides of the threshold, and random scale multipliers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lota_layers(model):
            t = layer.settings["default"].latent_threshold
            for p in (layer.lota_A["default"], layer.lota_B["default"]):
                p.copy_((torch.rand(p.shape, generator=g) * 4 - 2) * t)
            if scales:
                m = layer.lota_scales["default"]
                m.copy_(0.002 * (torch.rand(m.shape, generator=g) - 0.5))  # multipliers 0.9..1.1


@pytest.fixture(scope="module", params=tiered(SPECS_MATRIX, FAST_SPECS))
def spec_dir(request, gptq_dir):
    return request.param, gptq_dir(request.param)


def test_trained_scales_and_wide_steps_merge_and_reload_exactly(spec_dir, tmp_path):
    spec, path = spec_dir
    base = load_gptq(path)
    scales_before = [m.scales.clone() for m in base.modules() if hasattr(m, "qweight")]
    model = get_peft_model(base, LotaConfig(r=8, omega=1, max_step=3, train_scales=True, init_seed=0))
    randomize(model, scales=True)
    expected = logits(model)
    D = torch.cat([layer.get_delta_codes("default").flatten() for layer in lota_layers(model)])
    assert int(D.abs().max()) > 1  # wider steps were taken
    merged = model.merge_and_unload()
    assert torch.equal(logits(merged), expected)
    scales_after = [m.scales for m in merged.modules() if hasattr(m, "qweight")]
    assert any(not torch.equal(a, b) for a, b in zip(scales_before, scales_after))
    assert all(s.dtype == torch.float16 for s in scales_after)
    merged.save_pretrained(tmp_path / "merged")
    assert torch.equal(logits(load_gptq(tmp_path / "merged")), expected)


def test_delta_weight_with_trained_scales_is_the_weight_change(gptq_dir):
    model = get_peft_model(load_gptq(gptq_dir(SPEC)), LotaConfig(r=8, omega=1, train_scales=True, init_seed=0))
    randomize(model, scales=True)
    layer = lota_layers(model)[0]
    before = layer.quant.read().weight().float()
    delta = layer.get_delta_weight("default")
    model.merge_adapter()
    after = layer.quant.read().weight().float()
    assert torch.allclose((after - before).t(), delta, atol=2e-3)  # the stored weights are fp16-rounded


def test_adapter_without_latents_is_small_and_loads_as_the_same_model(gptq_dir, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    model = get_peft_model(load_gptq(gptq_dir(SPEC)), LotaConfig(r=8, omega=2, train_scales=True, init_seed=0))
    randomize(model, scales=True)
    expected = logits(model)
    model.save_pretrained(tmp_path / "full")
    model.peft_config["default"].save_latents = False
    model.save_pretrained(tmp_path / "ship")
    full = load_file(tmp_path / "full" / "adapter_model.safetensors")
    ship = load_file(tmp_path / "ship" / "adapter_model.safetensors")
    assert not any(k.endswith("_latent") for k in ship.keys()) and any(k.endswith("_latent") for k in full.keys())
    assert set(ship) == {k for k in full if "_latent" not in k}
    assert all(torch.equal(ship[k], full[k]) for k in ship)
    size = {d: (tmp_path / d / "adapter_model.safetensors").stat().st_size for d in ("full", "ship")}
    assert size["full"] - size["ship"] >= sum(4 * v.numel() for k, v in full.items() if "_latent" in k)
    reloaded = PeftModel.from_pretrained(load_gptq(gptq_dir(SPEC)), tmp_path / "ship")
    assert torch.equal(logits(reloaded), expected)
    merged = reloaded.merge_and_unload()
    assert torch.equal(logits(merged), expected)


def test_ternary_mode_refuses_values_another_optimizer_wrote(gptq_dir, tmp_path):
    model = get_peft_model(load_gptq(gptq_dir(SPEC)), LotaConfig(r=4, omega=1, train_mode="ternary", init_seed=0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(input_ids=X, labels=X).loss.backward()
    opt.step()  # what a Trainer without our optimizer does
    for call in (lambda: model(input_ids=X), lambda: model.save_pretrained(tmp_path / "a"),
                 lambda: model.merge_and_unload()):
        with pytest.raises(NotTernaryError, match="create_lota_optimizer"):
            call()


def test_default_trainer_trains_latent_lota_with_its_own_optimizer(gptq_dir, tokenizer, tmp_path):
    """Nothing LoTA-specific passed to Trainer: its AdamW trains the latent A, B, codes move and the loss drops.

    (At a rate of 2e-3 an entry passes the default latent_threshold, 1e-3, in a step: codes move within 20 steps.)"""
    path = gptq_dir(SPEC)
    model = get_peft_model(load_gptq(path), LotaConfig(init_seed=0))
    data = blocks(tokenizer)
    before = logits(model)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=20, learning_rate=2e-3,
                             report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True,
                             seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    assert codes_moved(model) > 0 and not torch.equal(logits(model), before)
    ids = torch.stack([d["input_ids"] for d in data[:8]])
    with torch.no_grad():
        model.eval()
        loss_after = model(input_ids=ids, labels=ids).loss
        with model.disable_adapter():
            loss_before = model(input_ids=ids, labels=ids).loss
    assert loss_after < loss_before


def test_latent_resume_from_checkpoint_is_exact(gptq_dir, tokenizer, tmp_path):
    path = gptq_dir(SPEC)
    data = blocks(tokenizer)

    def trainer(out, **kw):
        model = get_peft_model(load_gptq(path), LotaConfig(r=4, omega=1, train_scales=True, init_seed=0))
        args = dict(output_dir=str(out), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=6,
                    learning_rate=2e-3, report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
                    disable_tqdm=True, seed=0, data_seed=0)
        args.update(kw)
        return model, Trainer(model=model, args=TrainingArguments(**args), train_dataset=data)

    def state(model):
        return {n: p.detach().clone() for n, p in model.named_parameters() if ".lota_" in n}

    model, t = trainer(tmp_path / "full")
    t.train()
    full = state(model)
    model, t = trainer(tmp_path / "halves", save_strategy="steps", save_steps=3)
    t.train()
    model, t = trainer(tmp_path / "halves")
    t.train(resume_from_checkpoint=str(tmp_path / "halves" / "checkpoint-3"))
    resumed = state(model)
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
    assert codes_moved(model) > 0
    # the checkpoint holds the latent values (what made the resume exact) next to the packed ternary ones
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "halves" / "checkpoint-3" / "adapter_model.safetensors"))
    assert any(k.endswith("lota_A_latent") for k in saved) and any(k.endswith("lota_scales") for k in saved)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_factors_change_nothing_until_a_code_moves(gptq_dir, tokenizer, dtype):
    """The ablation's premise: while no code moves, LoTA's defaults train the scales exactly as a run with the
    ternary factors frozen does (same forward, same scale gradients), under autocast too. Only the clipping norm,
    which the factors' gradients join, may part them: clipped over the scales alone, the two are bit-identical."""
    path, data = gptq_dir(SPEC), blocks(tokenizer, n=16)

    def run(frozen):
        torch.manual_seed(0)
        model = get_peft_model(load_gptq(path), LotaConfig(r=8, train_scales=True, init_seed=0))
        if frozen:
            for layer in lota_layers(model):
                layer.lota_A["default"].requires_grad_(False)
                layer.lota_B["default"].requires_grad_(False)
        scales = [p for n, p in model.named_parameters() if ".lota_scales." in n]
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.0)
        for i in range(0, 16, 4):
            ids = torch.stack([d["input_ids"] for d in data[i:i + 4]])
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                model(input_ids=ids, labels=ids).loss.backward()
            torch.nn.utils.clip_grad_norm_(scales, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        assert codes_moved(model) == 0  # (the rate keeps the factors below their threshold)
        return torch.cat([p.detach().flatten() for p in scales])

    defaults, frozen = run(False), run(True)
    assert defaults.abs().max() > 0 and torch.equal(defaults, frozen)
