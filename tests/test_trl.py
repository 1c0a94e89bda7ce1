"""TRL's SFTTrainer with peft_config=LotaConfig(...) / L4QConfig(...): it builds the PEFT model and its own optimizer,
and the result merges exactly. TRL is an optional extra (pip install ".[trl]" from a clone)."""

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
