"""The contract every format keeps with every method, checked once over the whole format x method matrix.

For each format (GPTQ, AWQ, compressed-tensors, LLM.int8, GGUF), each of its fixture checkpoints, and each method
(LotaConfig, L4QConfig): loaded the stock way, a fresh adapter computes the base model bit for bit; a few training
steps move codes; merge / unmerge gives the quantized tensors back exactly; the merged model computes what the adapter
model did; its save, reloaded the stock way, holds the same tensors and computes the same logits
(`tiny_models.adapt_merge_save_reload`). Then what the format's own checkpoint must say (its quantization_config, its
files, the kernel a user gets by default, the gguf package's reading of a written file).

The inner loop (`pytest -m "not slow"`) runs a few checkpoints of each format; `make test` runs them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from peft_lota import formats
from tiny_models import (AWQ_FAST, AWQ_SPECS, CT_FAST, CT_SPECS, FAST_SPECS, K_QUANTS, K_TYPES, SPECS_MATRIX, X,
                         adapt_merge_save_reload,
                         assert_kernel_reads_weights, build_gguf, check_written_gguf, gguf_blocks, gguf_dense,
                         load_awq, load_ct, load_gptq, load_int8, logits, tiered)

METHODS = ("lota", "l4q")


@dataclass(frozen=True)
class Checkpoint:
    """One fixture checkpoint of a format: `spec` is what its builder takes."""

    format: str
    spec: object

    def slug(self) -> str:
        if self.format == "gguf":
            return f"gguf-{self.spec[0]}" + ("" if self.spec[1] is None else "-kquants")
        if self.format == "bitsandbytes-int8":
            return f"int8-{self.spec[0]}"
        return self.spec.slug() if self.format != "gptq" else f"gptq-{self.spec.slug()}"  # (awq-..., ct-...)


# ---- how each format's checkpoints are built, loaded, compared, and what their save must say ---------------------

def _gptq_check(spec, method, merged, reloaded, qc, path, folder, caplog):
    assert qc["quant_method"] == "gptq" and qc.get("backend") in (None, "auto")
    assert (folder / "quantize_config.json").exists()
    if spec.group_size != -1:  # the stock CPU int4 kernel only runs groups of 32..256 (the base model fails too)
        assert_kernel_reads_weights(load_gptq(folder, backend=None), reloaded)  # whatever kernel a user gets


def _awq_check(spec, method, merged, reloaded, qc, path, folder, caplog):
    assert qc["quant_method"] == "awq" and qc["version"] == "gemm" and qc.get("backend") in (None, "auto")
    assert (folder / "quantize_config.json").exists()
    if spec.sym and method == "l4q":  # L4Q keeps zero points: a symmetric checkpoint stays symmetric
        assert qc["zero_point"] is False
    # Whatever kernel a user gets by default (it depends on the CPU) reads the same weights, layer by layer.
    assert_kernel_reads_weights(load_awq(folder, backend=None), reloaded)


def _ct_check(spec, method, merged, reloaded, qc, path, folder, caplog):
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed"


def _int8_check(spec, method, merged, reloaded, qc, path, folder, caplog):
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_8bit"] is True


def _gguf_check(spec, method, merged, reloaded, qc, path, folder, caplog):
    from peft_lota.formats.gguf import GGUFLinear, gguf_dequantizes_to, load_gguf

    written = folder / path.name
    assert check_written_gguf(path, written, merged) > 0 and gguf_dequantizes_to(merged, written) == []
    assert torch.equal(logits(gguf_dense(written)), logits(merged))  # transformers' own GGUF loader agrees
    base = {m.tensor_name: m for m in load_gguf(path).modules() if isinstance(m, GGUFLinear)}
    for layer in (m for m in merged.modules() if isinstance(m, GGUFLinear) and m.tensor_name.startswith("blk.")):
        _, d0, m0 = layer.block_type.grid(base[layer.tensor_name].qblocks)
        _, d1, m1 = layer.block_type.grid(layer.qblocks)
        if layer.qtype in K_QUANTS:  # scales are integers under one fp16 per 256 weights: kept, codes move
            assert torch.equal(d0, d1) and (m0 is None or torch.equal(m0, m1)), layer.tensor_name
        elif method == "lota":  # trains the fp16 d of every type, and Q4_1/Q5_1's offsets m too
            assert not torch.equal(d0, d1) and (m0 is None or not torch.equal(m0, m1)), layer.tensor_name
        else:  # L4Q learns the scales and keeps the file's offsets out of its rounding
            assert not torch.equal(d0, d1) and (m0 is None or torch.equal(m0, m1)), layer.tensor_name
    assert ("keeps its scales" in caplog.text) == (spec[1] is not None)  # said once, where a K-quant is kept


@dataclass(frozen=True)
class Route:
    fixture: str  # the conftest factory that builds a checkpoint from its spec
    load: Callable
    check: Callable  # what the format's own save must say: check(spec, method, merged, reloaded, qc, path, ...)
    tensors: Callable = formats.quantized_tensors
    kwargs: Callable = lambda path: {}  # noqa: E731  (adapt_merge_save_reload's options for this checkpoint)


def _load_gguf(path):
    from peft_lota.formats.gguf import load_gguf

    return load_gguf(path)


ROUTES = {
    "gptq": Route("gptq_dir", load_gptq, _gptq_check),
    "awq": Route("awq_dir", load_awq, _awq_check),
    # stock loading: compressed on load, decompressed to dense weights on the first forward. A short batch too:
    # small matmuls are where two memory layouts of one weight round differently.
    "compressed-tensors": Route("ct_dir", load_ct, _ct_check, kwargs=lambda path: {"inputs": (X, X[:1, :5])}),
    # bitsandbytes' own int8 matmul runs on the adapted codes; the save reloads with its stored quantization_config
    "bitsandbytes-int8": Route("fp_dir", load_int8, _int8_check,
                               kwargs=lambda path: {"r": 8, "load_saved": lambda p: load_int8(p, quantize=False)}),
    # a GGUF save writes its one file, named as the source, into the folder
    "gguf": Route("gguf_root", _load_gguf, _gguf_check, tensors=gguf_blocks,
                  kwargs=lambda path: {"load_saved": lambda folder: _load_gguf(folder / path.name)}),
}


CHECKPOINTS = [
    *(Checkpoint("gptq", s) for s in SPECS_MATRIX),
    *(Checkpoint("awq", s) for s in AWQ_SPECS),
    *(Checkpoint("compressed-tensors", s) for s in CT_SPECS),
    *(Checkpoint("bitsandbytes-int8", (a,)) for a in ("llama", "qwen2")),
    *(Checkpoint("gguf", s) for s in (("llama", None), ("qwen2", None), ("llama", K_TYPES))),
]
# In the inner loop: three GPTQ specs between them covering its matrix, and one or two of every other format.
FAST = {*(Checkpoint("gptq", s) for s in FAST_SPECS), *(Checkpoint("awq", s) for s in AWQ_FAST),
        *(Checkpoint("compressed-tensors", s) for s in CT_FAST), Checkpoint("bitsandbytes-int8", ("qwen2",)),
        Checkpoint("gguf", ("qwen2", None)), Checkpoint("gguf", ("llama", K_TYPES))}


def test_the_matrix_covers_every_format_in_both_tiers():
    assert {c.format for c in CHECKPOINTS} == {c.format for c in FAST} == {f.name for f in formats.FORMATS}


def _path(checkpoint: Checkpoint, request):
    factory = request.getfixturevalue(ROUTES[checkpoint.format].fixture)
    if checkpoint.format == "gguf":
        arch, types = checkpoint.spec
        return build_gguf(arch, factory, **({} if types is None else dict(types=types, dims=(256, 512))))
    return factory(checkpoint.spec[0] if checkpoint.format == "bitsandbytes-int8" else checkpoint.spec)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("checkpoint", tiered(CHECKPOINTS, FAST, ids=Checkpoint.slug))
def test_every_format_keeps_the_contract_with_every_method(checkpoint, method, request, tmp_path, caplog,
                                                           monkeypatch):
    import peft_lota.l4q.layer
    import peft_lota.lota.layer

    for module in (peft_lota.lota.layer, peft_lota.l4q.layer):  # "keeps its scales" is said once per process
        monkeypatch.setattr(module, "_FIXED_SCALES_SAID", set())
    missing = formats.by_name(checkpoint.format).missing_libraries()
    if missing:  # (a venv with only some formats' libraries: `pip install ".[compressed-tensors,test]"`)
        pytest.skip(f"{checkpoint.format} needs {', '.join(lib for lib, _ in missing)}, not installed")
    route, spec = ROUTES[checkpoint.format], checkpoint.spec
    path = _path(checkpoint, request)
    if checkpoint.format == "gguf" and spec[1] is not None:  # the K-quant mix holds K-quant layers, loaded exactly
        from peft_lota.formats.gguf import GGUFLinear

        model = route.load(path)
        assert {m.qtype for m in model.modules() if isinstance(m, GGUFLinear)} >= set(K_QUANTS)
        assert torch.equal(logits(model), logits(gguf_dense(path)))
    merged, reloaded, qc = adapt_merge_save_reload(method, route.load, path, route.tensors, tmp_path,
                                                   **route.kwargs(path))
    assert (qc is None) == (checkpoint.format == "gguf")  # a transformers config, except GGUF's file of its own
    route.check(spec, method, merged, reloaded, qc, path, tmp_path / "merged", caplog)
