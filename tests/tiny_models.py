"""The tests' shared module: tiny Llama/Qwen2 checkpoints of every format built offline on CPU, their loaders, the
format x method contract (`adapt_merge_save_reload`), the fixture matrices and their inner-loop subsets (`tiered`),
and the helpers several test files use.

Importable without pytest. Everything is seeded: the same Spec gives the same checkpoint on the
same versions of torch/transformers/gptqmodel/Python (the tokenizer is trained on the running
Python's own standard library source, so its vocabulary follows the Python version).
"""

from __future__ import annotations

import glob
import json
import os
import random
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # gptqmodel's thread pool fails on 2 cores without it
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch a hub

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))  # real_model: the shared quantizers

VOCAB = 512
HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS = 128, 384, 2, 4, 2  # all in/out features are multiples of 128
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
_MARKER = "BUILD_COMPLETE"  # written last: a directory without it is a crashed build and is redone
_STDLIB = os.path.dirname(os.__file__)
# transformers' GPTQConfig accepts only these. gptqmodel 7.7's own API does quantize 5/6/7 bits, but
# writes them as format "gptq_p" (a planar layout, not the continuous bit stream), which
# transformers 5.23 then refuses to load ("Only support quantization to [2,3,4,8] bits").
BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class Spec:
    arch: str = "llama"  # "llama" (no bias) | "qwen2" (bias on q/k/v projections)
    bits: int = 4  # 2, 3, 4 or 8; see BITS for why not 5/6/7
    sym: bool = False
    desc_act: bool = False  # act-order: g_idx is a permutation of the group ids, not sorted
    fmt: str = "gptq_v2"  # "gptq_v2" (transformers GPTQConfig) | "gptq" (v1, gptqmodel's own API)
    group_size: int = 32  # or -1 (one group per output column)

    def __post_init__(self):
        assert self.arch in ("llama", "qwen2"), self.arch
        assert self.bits in BITS, f"bits={self.bits}: use one of {BITS}"
        assert self.fmt in ("gptq", "gptq_v2"), self.fmt
        assert self.group_size == -1 or (HIDDEN % self.group_size == 0 and INTERMEDIATE % self.group_size == 0
                                         and self.group_size % 32 == 0), self.group_size

    def slug(self) -> str:
        g = "gall" if self.group_size == -1 else f"g{self.group_size}"
        return (f"{self.arch}-{self.bits}b-{'sym' if self.sym else 'asym'}-{'act' if self.desc_act else 'noact'}"
                f"-{'v2' if self.fmt == 'gptq_v2' else 'v1'}-{g}")


# A covering design: every pair of values of any two factors among bits x sym x desc_act x fmt x arch
# occurs in at least one spec (checked in tests/test_fixtures.py), plus group_size -1 twice.
# Asymmetric group-32 specs contain zero points 0 and maxq (so their v1 files carry borrows, see
# test_fixtures.v1_to_v2_zeros); the group_size -1 asym spec has none.
SPECS_MATRIX: list[Spec] = [
    Spec("llama", 2, False, False, "gptq_v2"),
    Spec("qwen2", 2, True, True, "gptq"),
    Spec("llama", 2, True, True, "gptq", group_size=-1),
    Spec("qwen2", 3, False, True, "gptq_v2"),
    Spec("llama", 3, True, False, "gptq"),
    Spec("llama", 4, False, True, "gptq"),
    Spec("qwen2", 4, True, False, "gptq_v2"),
    Spec("qwen2", 8, False, False, "gptq"),
    Spec("llama", 8, True, True, "gptq_v2"),
    Spec("qwen2", 4, False, False, "gptq_v2", group_size=-1),
]
# The specs the inner loop (`pytest -m "not slow"`) runs: between them 2/3/4 bits, sym and asym, act-order and not,
# v1 and v2, group 32 and -1, Llama and Qwen2 (bias). The full suite (`make test`) runs the whole matrix.
FAST_SPECS = (Spec("qwen2", 3, False, True, "gptq_v2"), Spec("llama", 2, True, True, "gptq", group_size=-1),
              Spec("qwen2", 4, True, False, "gptq_v2"))


def tiered(items, fast, ids=None, unpack: bool = False) -> list:
    """`items` as pytest params: those in `fast` run in every tier, the others only in the full suite (marked slow),
    so that the inner loop runs one of each kind and `make test` the whole matrix. `unpack`: each item is a tuple of
    the values of several argument names."""
    import pytest

    ids = ids or (lambda x: x.slug() if hasattr(x, "slug") else str(x))
    return [pytest.param(*(x if unpack else (x,)), id=ids(x), marks=() if x in fast else pytest.mark.slow)
            for x in items]


def calibration_texts(n: int = 16, seed: int = 0, chars: int = 400) -> list[str]:
    """`n` snippets of about `chars` characters of stdlib source, chosen reproducibly."""
    files = sorted(glob.glob(os.path.join(_STDLIB, "*.py")))
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        text = Path(rng.choice(files)).read_text(encoding="utf-8", errors="replace")
        if len(text) <= chars:
            continue
        start = rng.randrange(len(text) - chars)
        out.append(text[start:start + chars])
    return out


def build_tokenizer(save_dir=None):
    """Byte-level BPE with a 512-token vocabulary, trained offline on stdlib source."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    files = sorted(glob.glob(os.path.join(_STDLIB, "*.py")))[:24]  # ~0.6 MB: plenty for 256 merges
    tok.train(files, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")
    if save_dir is not None:
        fast.save_pretrained(str(save_dir))
    return fast


def _fill_weights(model, seed: int) -> None:
    """Replace linear weights by heavy-tailed values with per-row offsets and per-column scales.

    Gaussian i.i.d. weights put every asymmetric zero point near maxq/2. Real checkpoints have
    outlier input channels (which is what makes act-order matter) and rows whose values lean to one
    side; this gives GPTQ non-trivial Hessian orderings and a spread of zero points.
    """
    g = torch.Generator().manual_seed(seed)
    for name, mod in sorted(model.named_modules()):
        if isinstance(mod, torch.nn.Linear) and "lm_head" not in name:
            out_f, in_f = mod.weight.shape
            # Student t(4) noise, built from normals because StudentT.sample takes no generator
            z = torch.randn(out_f, in_f, generator=g)
            chi = torch.randn(4, out_f, in_f, generator=g).pow(2).sum(0) / 4
            noise = z / chi.sqrt()
            col = torch.exp(0.5 * torch.randn(1, in_f, generator=g))  # log-normal input-channel scales
            row = torch.exp(0.3 * torch.randn(out_f, 1, generator=g))
            offset = 0.7 * torch.randn(out_f, 1, generator=g)
            w = 0.02 * row * (col * noise + offset)
            with torch.no_grad():
                mod.weight.copy_(w)
                if mod.bias is not None:
                    mod.bias.copy_(0.02 * torch.randn(out_f, generator=g))


def _build_float(spec: Spec, fp_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                  num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                  max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                  pad_token_id=3)
    config = LlamaConfig(**common) if spec.arch == "llama" else Qwen2Config(**common)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _fill_weights(model, seed=1234 + (spec.arch == "qwen2"))  # same float model for every llama spec
    if spec.arch == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    model.save_pretrained(str(fp_dir))


def _quantize_v2(spec: Spec, fp_dir: Path, out: Path, tok) -> None:
    from transformers import AutoModelForCausalLM, GPTQConfig

    extra = {"act_group_aware": False} if spec.group_size == -1 else {}
    qcfg = GPTQConfig(bits=spec.bits, group_size=spec.group_size, sym=spec.sym, desc_act=spec.desc_act,
                      dataset=calibration_texts(), tokenizer=tok, **extra)
    model = AutoModelForCausalLM.from_pretrained(str(fp_dir), quantization_config=qcfg, dtype=torch.float32)
    model.save_pretrained(str(out))


def _quantize_v1(spec: Spec, fp_dir: Path, out: Path, tok) -> None:
    from gptqmodel import GPTQModel, QuantizeConfig

    extra = {"act_group_aware": False} if spec.group_size == -1 else {}
    qcfg = QuantizeConfig(bits=spec.bits, group_size=spec.group_size, sym=spec.sym, desc_act=spec.desc_act,
                          format="gptq", offload_to_disk=False, **extra)
    model = GPTQModel.load(str(fp_dir), qcfg, device="cpu", dtype=torch.float32)
    model.quantize(calibration_texts(), batch_size=1)
    model.save(str(out))


def _build_cached(spec, root, quantize) -> Path:
    """Build (or reuse) `root/spec.slug()`: the float model of `spec.arch` and its tokenizer in a scratch folder,
    then quantize(fp_dir, out, tokenizer) writes the checkpoint; a marker written last says it is complete."""
    out = Path(root) / spec.slug()
    if (out / _MARKER).exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    fp_dir = Path(root) / f"_float-{spec.slug()}"
    shutil.rmtree(fp_dir, ignore_errors=True)
    # One thread: these matmuls are tiny, and two threads on a shared 2-core machine made a
    # build 4x slower (34 s instead of 8 s) from oversubscription.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tok = build_tokenizer(fp_dir)
        _build_float(Spec(spec.arch), fp_dir)
        quantize(fp_dir, out, tok)
        tok.save_pretrained(str(out))
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(fp_dir, ignore_errors=True)
    (out / _MARKER).write_text(json.dumps(spec.__dict__))
    return out


def build_gptq_checkpoint(spec: Spec, root) -> Path:
    """Build (or reuse) the checkpoint for `spec` under `root/spec.slug()` and return its path."""
    quantize = _quantize_v2 if spec.fmt == "gptq_v2" else _quantize_v1
    return _build_cached(spec, root, lambda fp_dir, out, tok: quantize(spec, fp_dir, out, tok))


@dataclass(frozen=True)
class AwqSpec:
    arch: str = "llama"
    bits: int = 4
    sym: bool = False
    group_size: int = 32

    def slug(self) -> str:
        return f"awq-{self.arch}-{self.bits}b-{'sym' if self.sym else 'asym'}-g{self.group_size}"


# The AWQ fixtures: 2/3/4/8 bits, symmetric and asymmetric, group 32 and 64, with and without bias (qwen2); the inner
# loop runs the two in AWQ_FAST.
AWQ_SPECS = (AwqSpec("llama", 4, False, 32), AwqSpec("qwen2", 4, True, 64), AwqSpec("llama", 2, False, 32),
             AwqSpec("llama", 3, False, 32), AwqSpec("qwen2", 8, False, 32))
AWQ_FAST = (AwqSpec("qwen2", 4, True, 64), AwqSpec("llama", 3, False, 32))


def build_awq_checkpoint(spec: AwqSpec, root) -> Path:
    """An AWQ (GEMM) checkpoint quantized by gptqmodel's own AWQ on CPU from the same float model as the GPTQ
    fixtures of its architecture (a few seconds)."""
    from gptqmodel import GPTQModel, QuantizeConfig
    from gptqmodel.quantization import FORMAT, METHOD

    def quantize(fp_dir, out, tok):
        qcfg = QuantizeConfig(bits=spec.bits, group_size=spec.group_size, sym=spec.sym, method=METHOD.AWQ,
                              format=FORMAT.GEMM, offload_to_disk=False)
        model = GPTQModel.load(str(fp_dir), qcfg, device="cpu", dtype=torch.float16)
        model.quantize(calibration_texts(), batch_size=1)
        model.save(str(out))

    return _build_cached(spec, root, quantize)


def load_awq(path, dtype=torch.float32, backend: str | None = "torch_awq"):
    """Load an AWQ checkpoint on CPU; backend=None is the stock default load (no quantization_config)."""
    from transformers import AutoModelForCausalLM, AwqConfig

    kwargs = {}
    if backend is not None:
        bits = json.loads((Path(path) / "config.json").read_text())["quantization_config"]["bits"]
        kwargs["quantization_config"] = AwqConfig(bits=bits, backend=backend)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You passed `quantization_config`")
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, device_map="cpu", **kwargs)


@dataclass(frozen=True)
class CtSpec:
    arch: str = "llama"
    bits: int = 4
    group_size: Optional[int] = 32  # None: the channel strategy (one scale per output row)

    def slug(self) -> str:
        return f"ct-{self.arch}-{self.bits}b-{'ch' if self.group_size is None else f'g{self.group_size}'}"


# The compressed-tensors fixtures: 4-bit groups of 32, 8-bit per channel with bias (qwen2), 2- and 3-bit groups of 64.
CT_SPECS = (CtSpec("llama", 4, 32), CtSpec("qwen2", 8, None), CtSpec("llama", 2, 64), CtSpec("llama", 3, 64))
CT_FAST = (CtSpec("qwen2", 8, None), CtSpec("llama", 2, 64))


def build_ct_checkpoint(spec: CtSpec, root) -> Path:
    """A compressed-tensors pack-quantized checkpoint (symmetric, what llm-compressor's W4A16 writes) made with
    compressed-tensors' own functions (examples/real_model.py, which builds the real model's the same way) from the
    same float model as the GPTQ fixtures."""
    from real_model import compressed_tensors_checkpoint

    return _build_cached(spec, root, lambda fp_dir, out, tok: compressed_tensors_checkpoint(fp_dir, out, spec.bits,
                                                                                          spec.group_size))


def load_ct(path, dtype=torch.float32):
    """Load a compressed-tensors checkpoint the stock way (the layers stay compressed until the first forward)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, device_map="cpu")


X = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))  # the tests' usual input


def logits(model, x: torch.Tensor = X) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


def adapt_merge_save_reload(method: str, load, path, tensors, tmp_path, *, inputs=(X,), r: int = 4,
                            load_saved=None) -> tuple:
    """The contract every format keeps with every method (`method`: "lota" or "l4q"), on a checkpoint `path` that
    `load` loads the stock way: a fresh adapter computes the base model bit for bit; a few steps of training move
    codes; merge_adapter / unmerge_adapter round-trips the quantized tensors (`tensors(model)`: name -> tensor of the
    format) exactly; the merged model computes what the adapter model did; its save, reloaded the stock way
    (`load_saved`, else `load`), holds the same tensors and computes the same logits on every input.
    Returns (merged model, reloaded model, the saved quantization_config) for the format's own checks."""
    from peft import get_peft_model

    from peft_lota import L4QConfig, LotaConfig

    def plain(named: dict) -> dict:
        return {k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in named.items()}

    base_model = load(path)
    before = {k: v.detach().clone() for k, v in tensors(base_model).items()}
    base = [logits(base_model, x) for x in inputs]
    config = LotaConfig(r=r, init_seed=0) if method == "lota" else L4QConfig(r=r, init_seed=0)
    model = get_peft_model(load(path), config)
    assert all(torch.equal(logits(model, x), b) for x, b in zip(inputs, base))  # a fresh adapter is the base model
    train_steps(model, inputs[0])
    expected = [logits(model, x) for x in inputs]
    assert not torch.equal(expected[0], base[0])
    assert sum(int((m.get_delta_codes("default") != 0).sum()) for m in adapter_layers(model)) > 0

    model.merge_adapter()
    assert torch.equal(logits(model, inputs[0]), expected[0])
    model.unmerge_adapter()
    after = plain(tensors(model))
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    merged = model.merge_and_unload()
    assert all(torch.equal(logits(merged, x), e) for x, e in zip(inputs, expected))
    merged.save_pretrained(tmp_path / "merged")
    assert torch.equal(logits(merged, inputs[0]), expected[0])  # saving leaves the merged model as it was
    config_file = tmp_path / "merged" / "config.json"  # (a GGUF save writes its one file)
    qc = json.loads(config_file.read_text())["quantization_config"] if config_file.exists() else None
    reloaded = (load_saved or load)(tmp_path / "merged")
    mine, theirs = tensors(merged), tensors(reloaded)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert all(torch.equal(logits(reloaded, x), e) for x, e in zip(inputs, expected))
    return merged, reloaded, qc


def adapter_layers(model) -> list:
    """The LoTA and L4Q layers of a model."""
    from peft_lota import L4QLayer, LotaLayer

    return [m for m in model.modules() if isinstance(m, (LotaLayer, L4QLayer))]


def train_steps(model, x: torch.Tensor, steps: int = 3, lr: float = 5e-2) -> None:
    """A few AdamW steps of language modelling on `x` (whatever is trainable), then eval mode."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


GGUF_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16")  # cycled over the 2-D tensors: each type appears


def _random_k_blocks(name: str, rows: int, cols: int, seed: int):
    """Raw K-quant blocks (Q4_K, Q6_K) of random codes and sub-block scales under small fp16 super-scales: the gguf
    package dequantizes these types but does not quantize them."""
    import numpy as np

    nbytes = {"Q4_K": 144, "Q6_K": 210}[name]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, cols // 256, nbytes), dtype=np.uint8)
    d = (np.abs(rng.standard_normal(raw.shape[:2] + (2,))) * 2e-3).astype(np.float16).view(np.uint8)
    if name == "Q4_K":
        raw[..., 0:4] = d.reshape(raw.shape[:2] + (4,))
    else:
        raw[..., 208:210] = d[..., :2]
    return raw.reshape(rows, -1)


def build_gguf(arch: str, root, types=GGUF_TYPES, tied: bool = False, dims=(HIDDEN, INTERMEDIATE)) -> Path:
    """The tiny float model of `arch` written as a GGUF file the way llama.cpp's converter writes one (Llama's q/k
    rows permuted, 1-D tensors in float32), its 2-D tensors quantized by the gguf package to `types` in turn (the
    embedding first); metadata as transformers' GGUF loader reads it (no tokenizer: the tests use token ids). `tied`:
    no output.weight (the head is the embedding, as in SmolLM2)."""
    import gguf
    import numpy as np
    from gguf.quants import quantize
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    path = Path(root) / f"tiny-{arch}-{'-'.join(types)}{'-tied' if tied else ''}-{dims[0]}.gguf"
    if path.exists():
        return path
    common = dict(vocab_size=VOCAB, hidden_size=dims[0], intermediate_size=dims[1], num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=512,
                  tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    config = LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _fill_weights(model, seed=1234 + (arch == "qwen2"))
    tmp = path.with_suffix(".tmp")
    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_context_length(512)
    w.add_embedding_length(dims[0])
    w.add_feed_forward_length(dims[1])
    w.add_block_count(LAYERS)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(VOCAB)
    w.add_rope_dimension_count(dims[0] // HEADS)
    table = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), LAYERS)
    i = 0
    for name, t in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        stem, _, suffix = name.rpartition(".")
        g = f"{table.get_name(stem)}.{suffix}"
        a = t.float().numpy()
        if arch == "llama" and suffix == "weight" and (".attn_q." in g or ".attn_k." in g):  # llama.cpp's permute
            n = HEADS if ".attn_q." in g else KV_HEADS
            a = a.reshape(n, 2, a.shape[0] // n // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)
        if a.ndim == 2:
            qtype = types[i % len(types)]
            i += 1
            if qtype == "F16":
                w.add_tensor(g, a.astype(np.float16))
            elif qtype in ("Q4_K", "Q6_K"):
                kind = getattr(gguf.GGMLQuantizationType, qtype)
                w.add_tensor(g, _random_k_blocks(qtype, *a.shape, seed=i), raw_dtype=kind)
            else:
                kind = getattr(gguf.GGMLQuantizationType, qtype)
                w.add_tensor(g, quantize(a, kind), raw_dtype=kind)
        else:
            w.add_tensor(g, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)
    return path


K_QUANTS = ("Q4_K", "Q6_K")  # super-blocks of 256: a model of its own, whose widths are multiples of 256
K_TYPES = ("Q8_0", "Q4_K", "Q6_K", "Q4_K", "Q6_K", "Q4_K", "Q6_K", "F16")


def gguf_blocks(model) -> dict:
    """{name: raw blocks} of a GGUF-loaded model's quantized layers."""
    return {n: t for n, t in model.named_buffers() if n.endswith("qblocks")}


def gguf_dense(path):
    """transformers' own (dequantizing) load of a GGUF file: the oracle for what a file computes."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)


def check_written_gguf(source, written, merged) -> int:
    """Every byte before the tensor data, and every tensor the merge did not change, is the source's; the gguf package
    dequantizes every written tensor of a GGUF layer to the merged layer's own weight (rows in the file's order).
    Returns how many tensors changed."""
    import gguf
    import numpy as np
    from gguf.quants import dequantize

    from peft_lota.formats.gguf import GGUFLinear

    r0, r1 = gguf.GGUFReader(str(source)), gguf.GGUFReader(str(written))
    start = r0.tensors[0].data_offset
    assert os.path.getsize(source) == os.path.getsize(written)
    with open(source, "rb") as a, open(written, "rb") as b:
        assert a.read(start) == b.read(start)  # header, metadata, tensor infos
    layers = {m.tensor_name: m for m in merged.modules() if isinstance(m, GGUFLinear)}
    changed = 0
    for t0, t1 in zip(r0.tensors, r1.tensors):
        assert (t0.name, t0.tensor_type, t0.data_offset) == (t1.name, t1.tensor_type, t1.data_offset)
        if t0.name not in layers:
            assert np.array_equal(t0.data, t1.data), t0.name
            continue
        changed += not np.array_equal(t0.data, t1.data)
        layer = layers[t0.name]
        ours = layer._peft_lota_weights.read().weight().t()  # [N, K], the model's row order
        if layer.row_order is not None:
            ours = ours[torch.argsort(layer.row_order)]
        assert torch.equal(torch.from_numpy(dequantize(t1.data, t1.tensor_type)), ours), t0.name
    return changed


def load_int8(path, quantize=True):
    """A model loaded in LLM.int8 on CPU (`quantize`: BitsAndBytesConfig(load_in_8bit=True) on a float checkpoint;
    else a saved LLM.int8 checkpoint, with its own quantization_config)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {"quantization_config": BitsAndBytesConfig(load_in_8bit=True)} if quantize else {}
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, device_map="cpu", **kwargs)


def build_float_checkpoint(arch: str, root) -> Path:
    """The full-precision model the GPTQ fixtures of `arch` are quantized from, saved with its tokenizer."""
    out = Path(root) / f"float-{arch}"
    if (out / _MARKER).exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    _build_float(Spec(arch), out)
    build_tokenizer(out)
    (out / _MARKER).write_text(arch)
    return out


def load_gptq(path, backend: str | None = "gptq_torch", dtype=torch.float32):
    """Load a GPTQ checkpoint on CPU; backend=None is the stock default load (no quantization_config).

    "gptq_torch" gives gptqmodel's TorchLinear: standard buffer layout, trainable, all bit widths.
    """
    from transformers import AutoModelForCausalLM, GPTQConfig

    kwargs = {}
    if backend is not None:
        bits = json.loads((Path(path) / "config.json").read_text())["quantization_config"]["bits"]
        kwargs["quantization_config"] = GPTQConfig(bits=bits, backend=backend)
    with warnings.catch_warnings():
        # Expected: only `backend` is taken from our GPTQConfig, the rest comes from config.json.
        warnings.filterwarnings("ignore", message="You passed `quantization_config`")
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, device_map="cpu", **kwargs)


def assert_kernel_reads_weights(stock, reference) -> None:
    """Each quantized layer of `stock` (loaded with whatever kernel a user gets by default) reads the weights of
    `reference`'s layer of the same name (a layout-keeping load of the same checkpoint).

    Which default kernel runs depends on the CPU (dequantize and a float32 matmul; ATen's int4pack GEMM with bf16
    arithmetic where the CPU has AVX-512/AMX), so no logits tolerance holds on every machine. Each layer runs on the
    identity instead (minus its output on zeros, the bias): that yields its weight rows, within the kernel's own
    rounding. The bound allows bf16 rounding (2^-8, relative) of the weight, the bias, and of a zero-point offset of
    up to 8 steps (int4pack computes s * (q - 8) + (8 - z) * s), doubled; a code read wrongly moves its weight by a
    whole step s, more than that below 8 bits (a weight of 0 must come back as 0 +- s/16)."""
    from peft_lota.formats import dispatch, is_quantized_layer

    ours = {n: m for n, m in reference.named_modules() if is_quantized_layer(m)}
    assert ours
    dtype = next(p for p in stock.parameters() if p.is_floating_point()).dtype
    for name, ref in ours.items():
        layer = stock.get_submodule(name)
        eye = torch.eye(ref.in_features, dtype=dtype)
        with torch.no_grad():
            bias = layer(torch.zeros_like(eye[:1])).float()
            got = layer(eye).float() - bias
        state = dispatch(ref, name).read()
        want = state.weight().float()  # [in, out]
        step = state.scales.float()[state.g_idx]
        bound = 2.0 ** -7 * (want.abs() + bias.abs() + 8 * step.abs()) + 1e-6
        assert ((got - want).abs() <= bound).all(), (name, type(layer).__name__, float((got - want).abs().max()))


# ---- shared by the test modules: adapters, file snapshots, command-line output -----------------------------------

CLI_SPEC = Spec("llama", 4, True, False, "gptq")  # symmetric 4-bit: the fast kernels can serve it


def saved_adapter(base: Path, out: Path, method: str) -> Path:
    """A LoTA or L4Q adapter on the GPTQ checkpoint `base` whose B factors are random (it moves codes), saved."""
    from peft import get_peft_model

    from peft_lota import L4QConfig, LotaConfig

    config = LotaConfig(r=4, omega=1, init_seed=0) if method == "lota" else L4QConfig(r=4, init_seed=0)
    model = get_peft_model(load_gptq(base), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("lota_B.default", "l4q_B.default")):
                p.copy_(torch.randint(-1, 2, p.shape).float() if method == "lota" else torch.randn(p.shape) * 0.05)
    model.save_pretrained(out)
    return out


def lota_layers(model) -> list:
    from peft_lota import LotaLayer

    return [m for m in model.modules() if isinstance(m, LotaLayer)]


def randomize(model, seed=0, adapter="default") -> None:
    """Random ternary A and B: with r=4, omega=1 a good share of codes move (and hit the grid edges)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lota_layers(model):
            for p in (layer.lota_A[adapter], layer.lota_B[adapter]):
                p.copy_(torch.randint(-1, 2, p.shape, generator=g).float())


def adapted(path, offset="none", seed=0, **kw):
    """A LoTA model on the GPTQ checkpoint `path` with random ternary factors (`randomize`)."""
    from peft import get_peft_model

    from peft_lota import LotaConfig

    config = LotaConfig(r=kw.pop("r", 4), omega=kw.pop("omega", 1), offset=offset, init_seed=0, **kw)
    model = get_peft_model(load_gptq(path), config)
    randomize(model, seed)
    return model


def ternary_reference(state, A, B, x, omega, offset, max_step=1, scales=None):
    """LoTA's forward written directly with autograd (the straight-through estimate is `D + P - P.detach()`): the
    reference the fused kernels are checked against.

    scales: trained scales (float32, may require grad), used rounded to state.scales' dtype with an STE.
    """
    from peft_lota.lota import ternary

    P = A @ B
    D = ternary.delta_codes(P.detach(), state.codes, omega, state.maxq, max_step).float()
    g = state.g_idx
    if scales is None:
        s = state.scales.float()[g]
    else:
        s = (scales + (scales.detach().to(state.scales.dtype).float() - scales.detach()))[g]
    codes = state.codes.float() + D + (P - P.detach())
    zeros = state.zeros.float()
    if offset == "none":
        w = s * (codes - zeros[g])
    else:
        mu = ternary.group_mean(P - omega * D, g, state.counts) / omega
        if offset == "float":
            w = s * (codes - zeros[g] + mu[g])
        else:
            z_int = ternary.shift_zeros(state.zeros, mu.detach(), state.zero_range).float()
            w = s * (codes - z_int[g] + (mu - mu.detach())[g])
    return x @ w + state.bias


def snapshot(*folders) -> dict:
    """Every file (and symlink target) under the folders, byte for byte."""
    import hashlib

    out = {}
    for folder in folders:
        for p in sorted(Path(folder).rglob("*")):
            out[str(p)] = os.readlink(p) if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest() \
                if p.is_file() else "dir"
    return out


def one_line(err: str) -> str:
    """`err`, asserted to be one line and no traceback (how the command line says a mistake)."""
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def no_loading(monkeypatch) -> None:
    """Make any model load fail the test: a mistake must be refused before anything loads."""
    from peft_lota import inputs as checks

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the mistake was refused")

    monkeypatch.setattr(checks, "load_checked", refuse)


def checkpoint_tensors(folder: Path) -> dict:
    """{name: tensor} of every safetensors file of a checkpoint folder."""
    from safetensors import safe_open

    out = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def reshard(src: Path, dst: Path, parts: int = 3) -> Path:
    """A copy of a single-file checkpoint cut into `parts` shards with an index (layers split across shards)."""
    from safetensors.torch import save_file

    from peft_lota.stream import INDEX

    dst.mkdir()
    tensors = checkpoint_tensors(src)
    names = sorted(tensors)
    step = -(-len(names) // parts)
    weight_map = {}
    for i in range(parts):
        shard = f"model-{i + 1:05d}-of-{parts:05d}.safetensors"
        chunk = names[i * step:(i + 1) * step]
        save_file({k: tensors[k] for k in chunk}, str(dst / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in chunk})
    (dst / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        if (src / name).is_file():
            (dst / name).write_bytes((src / name).read_bytes())
    return dst
