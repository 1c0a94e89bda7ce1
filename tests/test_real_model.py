"""End to end on a real pretrained model: SmolLM2-135M-Instruct (examples/real_model.py), its first 2 of 30 layers.

The real tokenizer, chat template, embeddings and widths (576 and 1536: not multiples of 128), quantized by
gptqmodel's own GPTQ (v1, 4-bit, symmetric, group 64). LoTA and L4Q with their defaults train a few steps on chat
examples through a stock Trainer, merge, save; stock transformers reloads the checkpoint with identical codes,
scales and logits; from full precision, L4Q and calibration at group 128 end the 576-wide rows in a short group.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

import peft_lota
from peft_lota import L4QConfig, LotaConfig
from peft_lota.formats import quantized_tensors
from tiny_models import assert_kernel_reads_weights, load_gptq, logits

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import real_model  # noqa: E402

pytestmark = pytest.mark.slow  # minutes: `pytest -m "not slow"` leaves it out

LAYERS = 2
CHATS = [("What is the capital of France?", "Paris."), ("Spell 'cat' backwards.", "tac"),
         ("What is 2 + 3?", "5"), ("Name a primary colour.", "Red."), ("Translate 'bonjour' to English.", "Hello."),
         ("What is the opposite of hot?", "Cold."), ("How many legs does a spider have?", "Eight."),
         ("Which planet is called the red planet?", "Mars.")]


def chat_examples(tokenizer) -> list[dict]:
    """Chat-formatted examples, the loss on the assistant's answer only (as an instruction fine-tune does)."""
    out = []
    for question, answer in CHATS:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                               add_generation_prompt=True)
        ids_prompt = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids_answer = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        out.append({"input_ids": ids_prompt + ids_answer, "labels": [-100] * len(ids_prompt) + ids_answer})
    return out


@pytest.mark.parametrize("variant", ["gptq-4b-sym", "gptq-4b-sym-g128"])  # g128: 576 = 4 x 128 + a group of 64
@pytest.mark.parametrize("method", ["lota", "l4q"])
def test_real_model_trains_merges_and_reloads_exactly(real_root, tmp_path, method, variant):
    real_gptq = real_model.quantized(variant, real_root, layers=LAYERS, calib=16)
    tokenizer = AutoTokenizer.from_pretrained(real_gptq)
    assert tokenizer.chat_template and len(tokenizer) == 49152
    config = json.loads((real_gptq / "config.json").read_text())
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (576, 1536, LAYERS)
    qc = config["quantization_config"]
    assert (qc["bits"], qc["group_size"], qc["sym"], qc["checkpoint_format"]) == (
        4, real_model.VARIANTS[variant].get("group_size", 64), True, "gptq")

    model = get_peft_model(peft_lota.load_model(real_gptq), LotaConfig(init_seed=0) if method == "lota"
                           else L4QConfig(init_seed=0))
    ids = torch.tensor([chat_examples(tokenizer)[0]["input_ids"]])
    base = logits(model, ids)
    lr = 1e-2 if method == "lota" else 5e-2  # high, so that 4 steps move codes
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=4,
                             learning_rate=lr, report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
                             disable_tqdm=True, seed=0)
    Trainer(model=model, args=args, train_dataset=chat_examples(tokenizer),
            data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True)).train()
    model.eval()
    expected = logits(model, ids)
    assert not torch.equal(expected, base)
    layers = [m for m in model.modules() if isinstance(m, (peft_lota.LotaLayer, peft_lota.L4QLayer))]
    assert len(layers) == 7 * LAYERS
    assert sum(int((m.get_delta_codes("default") != 0).sum()) for m in layers) > 0

    merged = model.merge_and_unload()
    assert torch.equal(logits(merged, ids), expected)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = load_gptq(tmp_path / "merged")  # stock from_pretrained with the layout-keeping kernel
    mine, theirs = quantized_tensors(merged), quantized_tensors(reloaded)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert torch.equal(logits(reloaded, ids), expected)
    try:  # the default kernel of a plain load, whichever this CPU gets
        stock = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    except NotImplementedError as err:  # gptqmodel's AVX-512 CPU kernel refuses groups that do not divide the width
        assert "must be divisible" in str(err) and variant.endswith("g128")
        with pytest.raises(NotImplementedError, match="must be divisible"):  # the base checkpoint too: upstream's
            AutoModelForCausalLM.from_pretrained(real_gptq, dtype=torch.float32)
        return
    assert_kernel_reads_weights(stock, reloaded)


@pytest.mark.parametrize("how", ["L4QConfig", "calibrate"])
def test_a_new_grid_whose_groups_do_not_divide_the_width_ends_in_a_short_group(real_root, tmp_path, how):
    """From full precision, L4Q and calibration build the grid themselves: group 128 on the 576-wide layers gives four
    groups of 128 and one of 64 (GPTQ's g_idx = k // 128), merged, saved and reloaded exactly."""
    fp = real_model.float_checkpoint(real_root, layers=LAYERS)
    model = AutoModelForCausalLM.from_pretrained(fp, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(fp)
    ids = torch.tensor([chat_examples(tokenizer)[0]["input_ids"]])
    if how == "L4QConfig":
        peft = get_peft_model(model, L4QConfig(init_seed=0, bits=4, group_size=128))
        expected = logits(peft, ids)
        merged = peft.merge_and_unload()
    else:
        merged = peft_lota.calibrate(model, [ids], bits=4, group_size=128, epochs=1, progress=False)
        expected = logits(merged, ids)
    layer = merged.model.layers[0].self_attn.q_proj
    assert layer.scales.shape[0] == 5 and torch.equal(layer.g_idx.long(), torch.arange(576) // 128)
    assert torch.equal(logits(merged, ids), expected)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = load_gptq(tmp_path / "merged")
    mine, theirs = quantized_tensors(merged), quantized_tensors(reloaded)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert torch.equal(logits(reloaded, ids), expected)
