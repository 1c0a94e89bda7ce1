"""TRL's SFTTrainer and GRPOTrainer with peft_config=LotaConfig(...) / L4QConfig(...): they build the PEFT model and
their own optimizer, and the result merges exactly (GRPO: every merge / unmerge round of TRL's weight sync too). TRL is
an optional extra (pip install ".[trl]" from a clone)."""

from __future__ import annotations

import pytest
import torch

import peft_lota
from tiny_models import Spec, calibration_texts, load_gptq

trl = pytest.importorskip("trl")


@pytest.mark.parametrize("method", ["lota", "l4q"])
def test_sft_trainer_trains_and_the_merge_is_exact(gptq_dir, tokenizer, tmp_path, method):
    from datasets import Dataset
    from transformers import AutoTokenizer

    path = gptq_dir(Spec("llama", 2, False, False, "gptq_v2"))
    config = peft_lota.LotaConfig(r=8, init_seed=0) if method == "lota" else peft_lota.L4QConfig(r=4, init_seed=0)
    data = Dataset.from_dict({"text": calibration_texts(n=32, seed=4, chars=300)})
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, report_to=[],
                         use_cpu=True, save_strategy="no", logging_steps=1, max_length=64, disable_tqdm=True,
                         learning_rate=1e-3 if method == "lota" else 5e-2, seed=0)
    trainer = trl.SFTTrainer(model=load_gptq(path), args=args, train_dataset=data, peft_config=config,
                             processing_class=AutoTokenizer.from_pretrained(path))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    model = trainer.model
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    layers = [m for m in model.modules() if isinstance(m, (peft_lota.LotaLayer, peft_lota.L4QLayer))]
    assert len(layers) == 14 and sum(int((m.get_delta_codes("default") != 0).sum()) for m in layers) > 0
    x = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    model.eval()
    # SFTConfig trains in bf16 by default, and accelerate leaves the trained model's forward under bf16 autocast:
    # the merged model and its reload are compared under the same autocast.
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(input_ids=x).logits
        merged = model.merge_and_unload()
        assert torch.equal(merged(input_ids=x).logits, expected)
        merged.save_pretrained(tmp_path / "merged")
        assert torch.equal(load_gptq(tmp_path / "merged")(input_ids=x).logits, expected)


class _SyncCycle:
    """A TrainerCallback doing, before every step, what TRL's vLLM weight sync does with a PEFT model
    (merge_adapter(), read the weights, unmerge_adapter()), and checking that each round is exact."""

    def __init__(self, layers_of):
        self.layers_of, self.rounds = layers_of, 0

    def __call__(self, model):
        layers = self.layers_of(model)
        before = [layer.quant.read() for layer in layers]
        x = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(self.rounds))
        with torch.no_grad():
            expected = model(input_ids=x).logits
            model.merge_adapter()
            merged = model(input_ids=x).logits
            state = {k: v.clone() for k, v in model.base_model.model.state_dict().items()}
            model.unmerge_adapter()
            restored = model(input_ids=x).logits
        for layer, b in zip(layers, before):
            a = layer.quant.read()
            assert torch.equal(a.codes, b.codes) and torch.equal(a.zeros, b.zeros) and torch.equal(a.scales, b.scales)
        assert torch.equal(merged, expected) and torch.equal(restored, expected)
        self.rounds += 1
        return state, expected, x


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lota", "l4q"])
def test_grpo_trainer_trains_and_every_weight_sync_round_trips(gptq_dir, tmp_path, method):
    """TRL's GRPOTrainer (generation by transformers, no vLLM) with LotaConfig / L4QConfig on a GPTQ base: it trains on
    a reward, and the merge / unmerge cycle TRL's vLLM sync runs every step returns the base codes bit for bit; the
    merged weights are a checkpoint of the base's format (they load into a fresh copy of it and compute the same)."""
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback

    path = gptq_dir(Spec("llama", 4, True, False, "gptq"))
    config = peft_lota.LotaConfig(r=8, init_seed=0) if method == "lota" else peft_lota.L4QConfig(r=4, init_seed=0)
    data = Dataset.from_dict({"prompt": [f"Question {i}: name a colour." for i in range(8)]})

    def reward(completions, **kwargs):  # anything with a spread between completions gives GRPO an advantage
        return [sum(c.count(ch) for ch in "aeiou") / (1 + len(c)) for c in completions]

    layers_of = lambda m: [x for x in m.modules() if isinstance(x, (peft_lota.LotaLayer, peft_lota.L4QLayer))]  # noqa: E731
    cycle = _SyncCycle(layers_of)

    class EveryStep(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            cycle(model)

    args = trl.GRPOConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, num_generations=4,
                          max_completion_length=8, use_cpu=True, bf16=False, gradient_checkpointing=False,
                          report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
                          learning_rate=1e-3 if method == "lota" else 5e-2)
    trainer = trl.GRPOTrainer(model=load_gptq(path), reward_funcs=reward, args=args, train_dataset=data,
                              peft_config=config, processing_class=AutoTokenizer.from_pretrained(path),
                              callbacks=[EveryStep()])
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    model = trainer.model
    assert cycle.rounds == 3
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    model.eval()
    state, expected, x = cycle(model)
    # what the merged model holds, under the base checkpoint's names, is a checkpoint of its format
    plain = {k.replace(".base_layer", ""): v for k, v in state.items()
             if not any(t in k for t in (".lota_", ".l4q_"))}
    fresh = load_gptq(path)
    assert any(not torch.equal(v, plain[k]) for k, v in fresh.state_dict().items())  # the fine-tune is in them
    fresh.load_state_dict(plain, strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=x).logits, expected)
    # TRL's sync reads named_parameters(): a GPTQ layer's codes and scales are buffers, not among them
    sent = {n for n, _ in model.named_parameters()}
    assert not any(n.endswith(("qweight", "scales")) for n in sent)
