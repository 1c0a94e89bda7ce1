"""Checks that the tiny GPTQ fixtures are what they claim to be.

The oracle in (c) dequantizes the raw safetensors with a reference written here from the format
definition (independent of gptqmodel and of peft_lota.formats), rebuilds the float model from it and
compares logits with the GPTQ model as gptqmodel's TorchLinear runs it.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tiny_models import FAST_SPECS, SPECS_MATRIX, Spec, load_gptq, tiered

QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


def unpack_stream(words: np.ndarray, bits: int) -> np.ndarray:
    """Unpack int32 words along the last axis, read as one little-endian bit stream of `bits`-bit codes."""
    stream = np.unpackbits(np.ascontiguousarray(words, dtype="<i4").view(np.uint8), axis=-1, bitorder="little")
    fields = stream.reshape(*stream.shape[:-1], -1, bits).astype(np.int64)
    return (fields << np.arange(bits)).sum(-1)


def v1_to_v2_zeros(qzeros: np.ndarray, bits: int) -> np.ndarray:
    """Zero points of a v1 (`z - 1` on disk) qzeros tensor, decoded the way gptqmodel 7.7 loads them.

    For 2/4/8 bits gptqmodel adds 1 to every field with one integer add per int32 word
    (0x55555555, 0x11111111, 0x01010101), so a stored field of maxq (z = 0) carries into the next
    field: exactly the inverse of the word-wise subtraction its v2->v1 export does. 3-bit fields
    straddle words, so there it adds 1 to each field modulo 2**bits. A reader that adds 1 per field
    at 2/4/8 bits gets the field above each z = 0 one too small (test_zero_points_span_the_grid).
    """
    if bits in (2, 4, 8):
        ones = sum(1 << s for s in range(0, 32, bits))
        words = ((qzeros.astype(np.int64) & 0xFFFFFFFF) + ones) & 0xFFFFFFFF
        return unpack_stream(words.astype(np.uint32).view(np.int32), bits)
    return (unpack_stream(qzeros, bits) + 1) % (1 << bits)


def read_quantized(path: Path):
    """(tensors, quantization_config, {layer prefix: (codes [K,N], zeros [G,N], scales [G,N], g_idx [K])})."""
    tensors = {k: v.float().numpy() if v.is_floating_point() else v.numpy()
               for k, v in load_file(str(path / "model.safetensors")).items()}
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    bits, v1 = qc["bits"], qc.get("checkpoint_format", qc.get("format")) == "gptq"
    layers = {}
    for key in tensors:
        if key.endswith(".qweight"):
            p = key[: -len(".qweight")]
            codes = unpack_stream(tensors[key].T, bits).T  # packed along the input (row) dimension
            qz = tensors[p + ".qzeros"]
            zeros = v1_to_v2_zeros(qz, bits) if v1 else unpack_stream(qz, bits)
            layers[p] = (codes, zeros, tensors[p + ".scales"], tensors[p + ".g_idx"].astype(np.int64))
    return tensors, qc, layers


def reference_float_model(path: Path):
    """Float model of the same architecture whose linear weights are the reference-dequantized ones."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tensors, _, layers = read_quantized(path)
    config = AutoConfig.from_pretrained(str(path))
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: torch.from_numpy(v.astype(np.float32)) for k, v in tensors.items() if not k.endswith(QUANT_SUFFIXES)}
    for p, (codes, zeros, scales, g_idx) in layers.items():
        # W[k, n] = s[g(k), n] * (q[k, n] - z[g(k), n]). TorchLinear forms this product in the
        # scales' dtype (fp16) before a float32 matmul; we round the same way. (The exact float32
        # product differs by up to half an fp16 ulp per weight, ~2e-4 on these logits.)
        w = scales[g_idx].astype(np.float16) * (codes - zeros[g_idx]).astype(np.float16)  # [K, N]
        state[p + ".weight"] = torch.from_numpy(np.ascontiguousarray(w.T, dtype=np.float32))
    model.load_state_dict(state, strict=True)  # strict: the checkpoint must cover the whole model
    return model.eval()


def test_matrix_is_a_covering_design():
    factors = [lambda s: s.bits, lambda s: s.sym, lambda s: s.desc_act, lambda s: s.fmt, lambda s: s.arch]
    levels = [{2, 3, 4, 8}, {False, True}, {False, True}, {"gptq", "gptq_v2"}, {"llama", "qwen2"}]
    for (f, lf), (g, lg) in itertools.combinations(zip(factors, levels), 2):
        seen = {(f(s), g(s)) for s in SPECS_MATRIX}
        assert seen == set(itertools.product(lf, lg))
    assert any(s.group_size == -1 for s in SPECS_MATRIX)
    assert len({s.slug() for s in SPECS_MATRIX}) == len(SPECS_MATRIX)


@pytest.mark.parametrize("spec", [s for s in SPECS_MATRIX if not s.sym and s.group_size == 32], ids=Spec.slug)
def test_zero_points_span_the_grid(spec, gptq_dir):
    # Asymmetric group-32 fixtures contain zero points 0 and maxq (groups whose values all share a
    # sign), the edge cases of any code arithmetic. In v1 files those z = 0 groups show gptqmodel's
    # word-wise borrow: decoding field by field disagrees with gptqmodel right above them.
    tensors, _, layers = read_quantized(gptq_dir(spec))
    zeros = np.concatenate([z.ravel() for _, z, _, _ in layers.values()])
    assert zeros.min() == 0 and zeros.max() == (1 << spec.bits) - 1
    if spec.fmt == "gptq":
        per_field = np.concatenate([(unpack_stream(tensors[p + ".qzeros"], spec.bits) + 1).ravel() % (1 << spec.bits)
                                    for p in layers])
        assert (per_field != zeros).any()


@pytest.mark.parametrize("spec", tiered(SPECS_MATRIX, FAST_SPECS))
def test_fixture_checkpoint_loads_as_its_spec_with_standard_gptq_buffers(spec, gptq_dir, tokenizer):
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    path = gptq_dir(spec)
    model = load_gptq(path, backend="gptq_torch").eval()

    # (a) the config says what the spec asked for
    qc = model.config.quantization_config
    assert (qc.bits, qc.sym, qc.desc_act, qc.group_size) == (spec.bits, spec.sym, spec.desc_act, spec.group_size)
    raw = json.loads((path / "config.json").read_text())["quantization_config"]
    assert raw.get("checkpoint_format", raw.get("format")) == spec.fmt

    # (b) every projection is a TorchLinear holding the standard GPTQ buffers
    attn = model.model.layers[0].self_attn
    assert (attn.q_proj.bias is not None) == (spec.arch == "qwen2")
    assert (attn.o_proj.bias is not None) is False
    qlayers = {n: m for n, m in model.named_modules() if isinstance(m, TorchLinear)}
    assert len(qlayers) == 7 * model.config.num_hidden_layers
    for name, m in qlayers.items():
        buffers = dict(m.named_buffers(recurse=False))
        assert {"qweight", "qzeros", "scales", "g_idx"} <= buffers.keys(), name
        g_idx = m.g_idx.long()
        if spec.group_size == -1:
            assert (g_idx == 0).all()
        elif spec.desc_act:
            assert (g_idx.diff() < 0).any(), f"{name}: act-order g_idx should not be sorted"
        else:
            assert torch.equal(g_idx, torch.arange(m.in_features) // spec.group_size)

    # (c) logits agree with a float model built from the reference dequantization of the files
    ids = tokenizer(["def f(x):\n    return x + 1\n", "import os\nprint(os.sep)\n\n"], return_tensors="pt", padding=True)
    with torch.no_grad():
        got = model(**ids).logits
        want = reference_float_model(path)(**ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
