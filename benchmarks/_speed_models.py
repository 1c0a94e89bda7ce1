"""Random but valid GPTQ and AWQ checkpoints for the speed benchmark (bench_speed.py), written without calibration.

Speed and memory do not depend on the values of the codes, so these checkpoints skip GPTQ
calibration (slow at realistic widths on CPU): codes are uniform random, zero points symmetric
(2**(bits-1), stored the classic way as z - 1: format "gptq", v1), scales fp16 chosen so that each
dequantized weight matrix has a standard deviation of about 1/sqrt(in_features), g_idx without
act-order. The result is a standard GPTQ checkpoint that stock `AutoModelForCausalLM.from_pretrained`
loads with any kernel, and whose logits are finite. Embeddings, norms and the output head are
ordinary float tensors. AWQ (GEMM layout, `fmt="awq"`): the same codes and scales in AWQ's buffers,
symmetric (zero_point false). compressed-tensors (`fmt="ct"`): the same in `pack-quantized` tensors (codes
packed along the input dimension, symmetric, scales in the model's dtype), as llm-compressor's W4A16 writes them.
LLM.int8 (`fmt="int8"`, 8 bits): uniform int8 rows in [-127, 127] and float32 row scales (SCB), as bitsandbytes
saves them.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from peft_lota.formats import awq, gptq

FORMAT_NAMES = {"gptq": "GPTQ", "awq": "AWQ", "ct": "compressed-tensors", "int8": "LLM.int8"}
MARKER = "BUILD_COMPLETE"  # written last: a folder without it is a crashed build and is redone
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class ModelShape:
    """A Llama-architecture model; `name` says which real model its layer shapes come from."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    bits: int = 4
    group_size: int = 128
    dtype: str = "float32"  # the float dtype of the checkpoint (config.json "dtype"): what a stock load uses
    fmt: str = "gptq"  # "gptq" | "awq" | "ct" | "int8" (bitsandbytes LLM.int8; bits 8)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each projection of a decoder layer."""
        h, q, kv = self.hidden, self.hidden // self.heads * self.heads, self.hidden // self.heads * self.kv_heads
        return {"self_attn.q_proj": (h, q), "self_attn.k_proj": (h, kv), "self_attn.v_proj": (h, kv),
                "self_attn.o_proj": (q, h), "mlp.gate_proj": (h, self.intermediate),
                "mlp.up_proj": (h, self.intermediate), "mlp.down_proj": (self.intermediate, h)}

    def quantized_weights(self) -> int:
        return self.layers * sum(k * n for k, n in self.linear_shapes().values())

    def describe(self) -> str:
        return (f"{self.name}: {self.layers} layers, hidden {self.hidden}, intermediate {self.intermediate}, "
                f"{self.heads} heads / {self.kv_heads} KV heads, vocab {self.vocab}, {FORMAT_NAMES[self.fmt]} {self.bits}-bit "
                f"g{self.group_size}, {self.dtype} ({self.quantized_weights() / 1e6:.1f}M quantized weights)")


def _config(shape: ModelShape) -> dict:
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                      num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                      num_key_value_heads=shape.kv_heads, max_position_embeddings=4096, tie_word_embeddings=False,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0).to_dict()
    cfg["dtype"] = shape.dtype
    cfg["architectures"] = ["LlamaForCausalLM"]
    if shape.fmt == "int8":
        cfg["quantization_config"] = dict(quant_method="bitsandbytes", load_in_8bit=True, load_in_4bit=False,
                                          _load_in_8bit=True, _load_in_4bit=False, llm_int8_threshold=6.0,
                                          llm_int8_has_fp16_weight=False, llm_int8_skip_modules=None,
                                          llm_int8_enable_fp32_cpu_offload=False)
    elif shape.fmt == "ct":
        weights = dict(num_bits=shape.bits, type="int", symmetric=True, strategy="group", group_size=shape.group_size,
                       dynamic=False)
        cfg["quantization_config"] = dict(
            quant_method="compressed-tensors", format="pack-quantized", quantization_status="compressed",
            ignore=["lm_head"], config_groups={"group_0": dict(targets=["Linear"], weights=weights,
                                                               format="pack-quantized")})
    elif shape.fmt == "awq":
        cfg["quantization_config"] = dict(quant_method="awq", bits=shape.bits, group_size=shape.group_size,
                                          version="gemm", zero_point=False, desc_act=False)
    else:
        cfg["quantization_config"] = dict(quant_method="gptq", bits=shape.bits, group_size=shape.group_size,
                                          desc_act=False, sym=True, checkpoint_format="gptq", format="gptq",
                                          pack_dtype="int32", lm_head=False)
    return cfg


def _layer_tensors(shape: ModelShape, i: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    maxq = 2**shape.bits - 1
    out = {f"model.layers.{i}.input_layernorm.weight": torch.ones(shape.hidden),
           f"model.layers.{i}.post_attention_layernorm.weight": torch.ones(shape.hidden)}
    for name, (K, N) in shape.linear_shapes().items():
        p = f"model.layers.{i}.{name}."
        groups = K // shape.group_size
        # Every int32 pattern is a valid packing of 32/bits codes: uniform random words = uniform codes.
        step = K**-0.5 / (maxq / 12**0.5)  # uniform codes have a std of maxq/sqrt(12) steps
        scales = (step * (0.75 + 0.5 * torch.rand(groups, N, generator=g))).half()
        if shape.fmt == "int8":  # CB int8 [N, K] (in [-127, 127]), SCB float32 [N]: each row's absolute maximum
            out[p + "weight"] = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
            out[p + "SCB"] = (127 * K**-0.5 / (127 / 3**0.5) * (0.75 + 0.5 * torch.rand(N, generator=g))).float()
            out[p + "weight_format"] = torch.tensor(0, dtype=torch.uint8)
            continue
        if shape.fmt == "ct":  # [N, K*b/32], packed along the input dimension; scales [N, G] in the model's dtype
            out[p + "weight_packed"] = torch.randint(-2**31, 2**31 - 1, (N, K * shape.bits // 32), generator=g,
                                                     dtype=torch.int32)
            out[p + "weight_scale"] = scales.t().contiguous().to(getattr(torch, shape.dtype))
            out[p + "weight_shape"] = torch.tensor([N, K])
            continue
        if shape.fmt == "awq":  # packed along the output dimension, raw zero points
            out[p + "qweight"] = torch.randint(-2**31, 2**31 - 1, (K, N * shape.bits // 32), generator=g,
                                               dtype=torch.int32)
            out[p + "qzeros"] = awq.pack_columns(torch.full((groups, N), 2**(shape.bits - 1), dtype=torch.uint8),
                                                 shape.bits)
            out[p + "scales"] = scales
            continue
        out[p + "qweight"] = torch.randint(-2**31, 2**31 - 1, (K * shape.bits // 32, N), generator=g, dtype=torch.int32)
        out[p + "qzeros"] = gptq.pack_qzeros(torch.full((groups, N), 2**(shape.bits - 1) - 1, dtype=torch.uint8),
                                              shape.bits)  # v1 stores z - 1
        out[p + "scales"] = scales
        out[p + "g_idx"] = torch.arange(K, dtype=torch.int32) // shape.group_size
    return out


def write_random_gptq(shape: ModelShape, out: Path, seed: int = 0) -> Path:
    """Write (or reuse) the checkpoint of `shape` in `out`: one safetensors shard per decoder layer."""
    from safetensors.torch import save_file

    out = Path(out)
    if (out / MARKER).exists() and json.loads((out / MARKER).read_text()) == asdict(shape):
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(_config(shape), indent=2))
    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, shape.dtype)
    shards = {"model.embed_tokens.weight": (torch.randn(shape.vocab, shape.hidden, generator=g) * 0.02).to(dtype),
              "lm_head.weight": (torch.randn(shape.vocab, shape.hidden, generator=g) * 0.02).to(dtype),
              "model.norm.weight": torch.ones(shape.hidden, dtype=dtype)}
    weight_map = {}
    for i in range(-1, shape.layers):  # one layer in memory at a time
        name = "model-base.safetensors" if i < 0 else f"model-layer{i:03d}.safetensors"
        tensors = shards if i < 0 else _layer_tensors(shape, i, g)
        tensors = {k: (v.to(dtype) if v.is_floating_point() and v.dtype != torch.float16 and not k.endswith(".SCB")
                       else v) for k, v in tensors.items()}  # GPTQ/AWQ scales stay fp16, LLM.int8's SCB float32
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    (out / MARKER).write_text(json.dumps(asdict(shape)))
    return out
