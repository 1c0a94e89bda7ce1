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


def test_the_calibrate_command_writes_a_verified_checkpoint_and_compares_with_a_baseline(fp_dir, gptq_dir, tmp_path):
    from peft_lota.scripts import calibrate as command
    from tiny_models import Spec

    text = tmp_path / "calib.txt"
    text.write_text("\n\n".join(calibration_texts(n=16, seed=3, chars=800)))
    baseline = gptq_dir(Spec("qwen2", 2, False, False, "gptq_v2", 32))  # GPTQ of the same float model
    out = tmp_path / "calibrated"
    summary = command.main(["--model_name_or_path", str(fp_dir("qwen2")), "--output_dir", str(out), "--calib_file",
                            str(text), "--eval_file", str(text), "--samples", "8", "--seq_len", "32", "--epochs", "1",
                            "--r", "4", "--group_size", "32", "--baseline", str(baseline)])
    assert summary["merged_equals_calibrated"] and summary["reloaded_equals_merged"]
    # a random tiny model: the baseline's perplexity is measured, its gap to full precision may be of either sign
    assert 1 < summary["ppl_baseline"] < 1e4 and "baseline_gap_closed" in summary
    assert json.loads((out / "calibration_summary.json").read_text())["ppl_calibrated"] == summary["ppl_calibrated"]
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 2
    with pytest.raises(SystemExit):  # a baseline needs evaluation text: said, not ignored
        command.main(["--model_name_or_path", str(fp_dir("qwen2")), "--output_dir", str(tmp_path / "x"),
                      "--calib_file", str(text), "--baseline", str(baseline)])
