"""LoTA and L4Q on bitsandbytes LLM.int8 models (BitsAndBytesConfig(load_in_8bit=True), loaded on CPU).

bitsandbytes' own matmul (int8 activations and outlier columns in eval mode) runs on the adapted codes, so a fresh
adapter is the stock model bit for bit and the merged model is the adapter model bit for bit, in eval mode
(tests/test_contract.py, with every other format).
"""

from __future__ import annotations


import pytest
import torch
from peft import PeftModel, get_peft_model

pytest.importorskip("bitsandbytes")

from peft_lota import LotaConfig  # noqa: E402
from peft_lota.formats import bnb_int8, dispatch  # noqa: E402
from tiny_models import X, adapter_layers, load_int8, train_steps  # noqa: E402


def logits(model, x=X):
    model.eval()  # bitsandbytes' int8 matmul (int8 activations, outlier columns) is the eval-mode one
    with torch.no_grad():
        return model(input_ids=x).logits


def test_read_is_bitsandbytes_dequantization(fp_dir):
    import bitsandbytes.functional as BF

    model = load_int8(fp_dir("llama"))
    layers = bnb_int8.int8_layers(model)
    assert len(layers) == 14
    for name, layer in layers:
        state = dispatch(layer, name).read()
        cb, scb = bnb_int8._cb(layer), bnb_int8._scb(layer)
        # bitsandbytes' training path (MatMul8bitFp) multiplies CB by SCB * (1/127): exactly what we read
        assert torch.equal(state.weight().t(), cb.float() * scb.unsqueeze(1).mul(1.0 / 127.0)), name
        assert torch.allclose(state.weight().t(), BF.int8_vectorwise_dequant(cb, scb), rtol=1e-6, atol=0), name


def test_saved_adapter_reloads_onto_the_int8_base(fp_dir, tmp_path):
    path = fp_dir("llama")
    model = get_peft_model(load_int8(path), LotaConfig(r=8, init_seed=0))
    train_steps(model, X)
    expected = logits(model)
    model.save_pretrained(tmp_path / "adapter")
    again = PeftModel.from_pretrained(load_int8(path), tmp_path / "adapter")
    assert torch.equal(logits(again), expected)


def test_offset_modes_are_refused_before_anything_is_injected(fp_dir):
    model = load_int8(fp_dir("llama"))
    with pytest.raises(ValueError, match="offset='none'"):
        get_peft_model(model, LotaConfig(r=4, offset="integer"))
    assert not adapter_layers(model)


def test_a_saved_int8_checkpoint_is_adapted_merged_and_saved_again(fp_dir, tmp_path):
    path = fp_dir("qwen2")
    load_int8(path).save_pretrained(tmp_path / "int8")  # a pre-quantized LLM.int8 checkpoint, as users download them
    base = load_int8(tmp_path / "int8", quantize=False)
    model = get_peft_model(base, LotaConfig(r=8, init_seed=0))
    train_steps(model, X)
    expected = logits(model)
    merged = model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")  # transformers alone cannot re-save a model loaded pre-quantized
    assert torch.equal(logits(load_int8(tmp_path / "merged", quantize=False)), expected)
