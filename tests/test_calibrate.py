"""Block-wise calibration (ApiQ, saliency) of a tiny full-precision model into an exact GPTQ checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import peft_lota
from peft_lota import L4QLayer
from peft_lota.formats import gptq
from tiny_models import calibration_texts, load_gptq


@pytest.fixture(scope="module")
def data(fp_dir):
    path = fp_dir("qwen2")  # bias on q/k/v
    tok = AutoTokenizer.from_pretrained(path)
    ids = [t for s in calibration_texts(n=16, seed=3, chars=800) for t in tok(s)["input_ids"]]
    batches = [torch.tensor(ids[i * 64:(i + 1) * 64])[None] for i in range(6)]
    return path, batches, torch.tensor(ids[:48])[None]


@pytest.mark.parametrize("saliency_reg", [False, True])
def test_calibration_lowers_every_block_error_and_reloads_exactly(data, tmp_path, saliency_reg):
    path, batches, x = data
    reports = []
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    merged = peft_lota.calibrate(model, batches, bits=2, group_size=32, r=4, epochs=3, saliency_reg=saliency_reg,
                                 on_block=reports.append, progress=False)
    assert [r.index for r in reports] == [0, 1]
    assert all(r.mse_after < 0.9 * r.mse_before for r in reports), reports
    if saliency_reg:
        assert all(set(r.stage_losses) == {"weights", "mixed", "outputs"} for r in reports)
    assert len(gptq.gptq_layers(merged)) == 14
    with torch.no_grad():
        expected = merged(input_ids=x).logits
    merged.save_pretrained(tmp_path / "calibrated")
    qc = json.loads((tmp_path / "calibrated" / "config.json").read_text())["quantization_config"]
    assert (qc["bits"], qc["group_size"], qc["sym"]) == (2, 32, False)
    with torch.no_grad():
        assert torch.equal(load_gptq(tmp_path / "calibrated")(input_ids=x).logits, expected)


def test_unmerged_calibration_is_an_l4q_model_to_fine_tune(data):
    path, batches, x = data
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    calibrated = peft_lota.calibrate(model, batches[:2], bits=3, group_size=64, r=4, epochs=1, merge=False,
                                     progress=False)
    assert sum(isinstance(m, L4QLayer) for m in calibrated.modules()) == 14
    calibrated.train()
    calibrated(input_ids=x, labels=x).loss.backward()  # L4Q fine-tuning goes on from here
    calibrated.eval()
    with torch.no_grad():
        before = calibrated(input_ids=x).logits
        assert torch.equal(calibrated.merge_and_unload()(input_ids=x).logits, before)


def test_bad_calibration_arguments_say_what_to_do(data):
    path, batches, _ = data
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with pytest.raises(ValueError, match="saliency_reg=True"):
        peft_lota.calibrate(model, batches, stages=("weights",))
    with pytest.raises(ValueError, match="no calibration batches"):
        peft_lota.calibrate(model, [])
