"""llama.cpp's GGUF: a model whose linear layers keep the file's own blocks, and the same file written back.

The legacy block types read here are each a uniform integer grid per block of 32 consecutive inputs of one output row,
with fp16 parameters (ggml's layouts; the tests check every one against the `gguf` package's dequantization):

    type  bytes  layout                                  weight              codes   zero
    Q4_0  18     fp16 d, 16 bytes of nibbles             d * (q - 8)         0..15   8
    Q4_1  20     fp16 d, fp16 m, 16 bytes of nibbles     d * q + m           0..15   0, offset m
    Q5_0  22     fp16 d, 4 bytes of 5th bits, nibbles    d * (q - 16)        0..31   16
    Q5_1  24     fp16 d, fp16 m, 5th bits, nibbles       d * q + m           0..31   0, offset m
    Q8_0  34     fp16 d, 32 int8                         d * q               q + 128 128

(nibbles: byte j holds element j in its low half and element j + 16 in its high half; 5th bits: bit i of the
little-endian uint32 is element i's.) A code moved by one inside its range, a new fp16 `d`, are written exactly.
The K-quants Q4_K and Q6_K (super-blocks of 256, `KQuant` below) are read and written too, codes only: their scales
are 6- or 8-bit integers under one fp16 value per super-block, not free values a trained scale could take.
The weight is computed as gguf and ggml's reference dequantization compute it: the product `d * (q - zero)` in
float32 (exact: `d` has 11 significant bits) and the offset `m` added last. That float32 weight, cast to the
model's dtype, is what transformers' GGUF loader builds, so a merged layer's output equals the reloaded model's.

A model is loaded with `load_gguf(path)`: transformers' GGUF loader builds it (its config, its names, its row
permutation of Llama's q/k), then every linear layer whose tensor is of one of these types becomes a `GGUFLinear`
holding the tensor's raw blocks (rows in the model's order). Other tensors (the embedding, norms, layers of
other types: Q5_K, IQ*, ...) stay as transformers built them, frozen: a save copies them from the file.
Saving (`write_gguf`, or `save_pretrained` of a merged model) copies the source file and overwrites the data of
the adapted tensors in place: metadata, tensor order and every other byte stay the input's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import torch
from torch import nn

from .base import Format, MissingLibraryError, WritesOwnFile, QuantState, QuantWeights, group_layout, nk_linear

logger = logging.getLogger(__name__)

NAME = "gguf"
BLOCK = 32


@dataclass(frozen=True)
class BlockType:
    """One ggml block type this module reads and writes (the table in the module docstring)."""

    name: str
    nbytes: int  # bytes per block of 32 weights
    bits: int
    zero: int  # the fixed zero point of the codes
    has_min: bool  # an fp16 offset m after d

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    @property
    def _qs(self) -> int:  # where the low bits start in a block
        return 2 + 2 * self.has_min + 4 * (self.bits == 5)

    def decode(self, raw: torch.Tensor):
        """raw uint8 [N, blocks * nbytes] -> (codes uint8 [N, K], d fp16 [N, blocks], m fp16 [N, blocks] or None)."""
        N = raw.shape[0]
        b = raw.reshape(N, -1, self.nbytes)
        d = b[..., 0:2].contiguous().view(torch.float16).squeeze(-1)
        m = b[..., 2:4].contiguous().view(torch.float16).squeeze(-1) if self.has_min else None
        qs = b[..., self._qs:]
        if self.bits == 8:
            codes = (qs.view(torch.int8).to(torch.int16) + 128).to(torch.uint8)
        else:
            codes = torch.cat([qs & 0x0F, qs >> 4], dim=-1)
            if self.bits == 5:
                qh = b[..., self._qs - 4:self._qs]
                shifts = torch.arange(8, dtype=torch.uint8, device=raw.device)
                high = ((qh.unsqueeze(-1) >> shifts) & 1).reshape(N, -1, BLOCK)
                codes = codes | (high << 4)
        return codes.reshape(N, -1), d, m

    def encode(self, codes: torch.Tensor, d: torch.Tensor, m: Optional[torch.Tensor]) -> torch.Tensor:
        """The inverse of decode: codes uint8 [N, K] in 0..maxq, d (and m) fp16 [N, blocks] -> raw uint8."""
        N = codes.shape[0]
        q = codes.reshape(N, -1, BLOCK)
        parts = [d.to(torch.float16).contiguous().unsqueeze(-1).view(torch.uint8)]
        if self.has_min:
            parts.append(m.to(torch.float16).contiguous().unsqueeze(-1).view(torch.uint8))
        if self.bits == 8:
            parts.append((q.to(torch.int16) - 128).to(torch.int8).view(torch.uint8))
        else:
            if self.bits == 5:
                weights = (1 << torch.arange(8, dtype=torch.int32, device=codes.device))
                high = (q >> 4).reshape(N, -1, 4, 8).to(torch.int32)
                parts.append((high * weights).sum(-1).to(torch.uint8))
            low = q & 0x0F
            parts.append(low[..., :16] | (low[..., 16:] << 4))
        return torch.cat(parts, dim=-1).reshape(N, -1)


    # What GGUFWeights asks of every block type
    group = BLOCK  # weights per scale
    block = BLOCK  # weights per block
    trains_scales = True  # each group's scale is an fp16 value a merge may rewrite

    def grid(self, raw: torch.Tensor):
        """(codes uint8 [N, K], scales float32 [N, groups], offsets float32 [N, groups] or None) of raw blocks."""
        codes, d, m = self.decode(raw)
        return codes, d.float(), None if m is None else m.float()

    def write(self, raw: torch.Tensor, codes: torch.Tensor, scales: Optional[torch.Tensor],
              offsets: Optional[torch.Tensor] = None) -> torch.Tensor:
        """These blocks with new codes [N, K] (and new fp16 scales, offsets [N, groups]), everything else kept."""
        _, d, m = self.decode(raw)
        if offsets is not None and m is None:
            raise ValueError(f"{self.name} blocks store no offset: a merge cannot write one.")
        return self.encode(codes, d if scales is None else scales, m if offsets is None else offsets)


class KQuant:
    """A K-quant super-block of 256 weights (ggml's Q4_K, Q6_K): integer sub-block scales (and mins) under fp16 `d`
    (and `dmin`), so each sub-block's scale is a float32 product `d * sc` and its offset `-(dmin * min)`; a code
    moved by one is exact, the scales are not free values (codes only: `trains_scales` False).

        Q4_K  144 bytes: fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles
              w = d * sc_j * q - dmin * min_j over sub-blocks of 32; q in 0..15
        Q6_K  210 bytes: 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 int8 scales, fp16 d
              w = d * sc_j * (q - 32) over sub-blocks of 16; q in 0..63
    """

    block = 256
    trains_scales = False
    has_min = False

    def __init__(self, name: str, nbytes: int, bits: int, zero: int, group: int, has_min: bool, pieces, code_bytes):
        self.name, self.nbytes, self.bits, self.zero, self.group, self.has_min = name, nbytes, bits, zero, group, has_min
        self.code_bytes = code_bytes  # (first, end) of the bytes holding codes
        # per element of a super-block: (byte, shift, width) of its low bits, and of its high bits (or None)
        self.pieces = pieces

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def _index(self, device):
        return [None if p is None else (torch.tensor(p[0], device=device), torch.tensor(p[1], dtype=torch.int32,
                device=device), torch.tensor(p[2], dtype=torch.int32, device=device)) for p in self.pieces]

    def codes(self, raw: torch.Tensor) -> torch.Tensor:
        N = raw.shape[0]
        b = raw.reshape(N, -1, self.nbytes)
        out, low_bits = None, 0
        for piece in self._index(raw.device):
            if piece is None:
                continue
            byte, shift, width = piece
            part = (b[..., byte] >> shift.to(torch.uint8)) & ((1 << width) - 1).to(torch.uint8)
            out = part if out is None else out | (part << low_bits)
            low_bits = int(width[0])
        return out.reshape(N, -1)

    def grid(self, raw: torch.Tensor):
        N = raw.shape[0]
        b = raw.reshape(N, -1, self.nbytes)
        if self.name == "Q4_K":
            d = b[..., 0:2].contiguous().view(torch.float16).float()
            dmin = b[..., 2:4].contiguous().view(torch.float16).float()
            s = b[..., 4:16].to(torch.int32)
            dd, mm, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
            sc = torch.cat([dd & 0x3F, (md & 0x0F) | ((dd >> 2) & 0x30)], dim=-1).float()
            mn = torch.cat([mm & 0x3F, (md >> 4) | ((mm >> 2) & 0x30)], dim=-1).float()
            return self.codes(raw), (d * sc).reshape(N, -1), (-(dmin * mn)).reshape(N, -1)
        sc = b[..., 192:208].contiguous().view(torch.int8).float()
        d = b[..., 208:210].contiguous().view(torch.float16).float()
        return self.codes(raw), (d * sc).reshape(N, -1), None

    def write(self, raw: torch.Tensor, codes: torch.Tensor, scales: Optional[torch.Tensor],
              offsets: Optional[torch.Tensor] = None) -> torch.Tensor:
        if scales is not None or offsets is not None:
            raise ValueError(f"{self.name} scales are integers under one fp16 value per 256 weights: a merge writes "
                             "its codes only.")
        N = raw.shape[0]
        q = codes.reshape(N, -1, self.block).to(torch.int32)
        acc = torch.zeros(N, q.shape[1], self.nbytes, dtype=torch.int32, device=raw.device)
        low_bits = 0
        for piece in self._index(raw.device):
            if piece is None:
                continue
            byte, shift, width = piece
            part = ((q >> low_bits) & ((1 << width) - 1)) << shift
            acc.index_add_(2, byte, part)
            low_bits = int(width[0])
        out = raw.reshape(N, -1, self.nbytes).clone()
        first, end = self.code_bytes
        out[..., first:end] = acc[..., first:end].to(torch.uint8)
        return out.reshape(N, -1)


def _q4_k_pieces():
    e = range(256)
    return [([16 + 32 * (i // 64) + i % 32 for i in e], [0 if i % 64 < 32 else 4 for i in e], [4] * 256), None]


def _q6_k_pieces():
    e = range(256)
    low = ([64 * (i // 128) + i % 64 for i in e], [4 * ((i % 128) // 64) for i in e], [4] * 256)
    high = ([128 + 32 * (i // 128) + i % 32 for i in e], [2 * ((i % 128) // 32) for i in e], [2] * 256)
    return [low, high]


BLOCK_TYPES = {t.name: t for t in (BlockType("Q4_0", 18, 4, 8, False), BlockType("Q4_1", 20, 4, 0, True),
                                  BlockType("Q5_0", 22, 5, 16, False), BlockType("Q5_1", 24, 5, 0, True),
                                  BlockType("Q8_0", 34, 8, 128, False),
                                  KQuant("Q4_K", 144, 4, 0, 32, True, _q4_k_pieces(), (16, 144)),
                                  KQuant("Q6_K", 210, 6, 32, 16, False, _q6_k_pieces(), (0, 192)))}


def _require_gguf():
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise MissingLibraryError('reading and writing GGUF files needs the `gguf` package, which is not installed: '
                                  'pip install ".[gguf]" from a clone of peft_lota (or pip install gguf).') from None
    return gguf


# ---- the layer -------------------------------------------------------------------------------------------

class GGUFLinear(nn.Module):
    """A linear layer holding one GGUF tensor's raw blocks (`qblocks`, uint8 [out_features, row bytes], rows in the
    model's order) and computing what transformers' GGUF loader computes from them: F.linear with the float32
    dequantized weight cast to the input's dtype."""

    def __init__(self, qblocks: torch.Tensor, qtype: str, in_features: int, out_features: int,
                 bias: Optional[torch.Tensor], tensor_name: str, row_order: Optional[torch.Tensor]):
        super().__init__()
        self.in_features, self.out_features, self.qtype = in_features, out_features, qtype
        self.tensor_name = tensor_name  # the tensor's name in the file
        self.register_buffer("qblocks", qblocks)
        self.register_buffer("bias", bias)
        # the file's row of each of our rows (transformers' q/k permutation), or None: the same order
        self.row_order = row_order
        self._peft_lota_weights = GGUFWeights(self)

    @property
    def block_type(self) -> BlockType:
        return BLOCK_TYPES[self.qtype]

    @property
    def bits(self) -> int:
        return self.block_type.bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self._peft_lota_weights.read()
        return nk_linear(x, state.weight().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.qtype}, {self.tensor_name}"


def is_gguf_layer(module: nn.Module) -> bool:
    return isinstance(module, GGUFLinear)


class GGUFWeights(QuantWeights):
    """Codes, scales `d` and offsets `m` of a GGUFLinear, in the [K, N] orientation of QuantState.

    Scales are handed over widened to float32 (the products are float32, as gguf computes them) with
    `scale_dtype` fp16: trained scales are rounded to what the file stores."""

    format_name = NAME
    fixed_zero_points = True
    fuses_bias = True  # the reloaded layer is an nn.Linear: the bias inside its addmm

    def __init__(self, layer: GGUFLinear):
        super().__init__(layer)
        self.in_features, self.out_features, self.bits = layer.in_features, layer.out_features, layer.bits
        self._cache = None

    @property
    def device(self) -> torch.device:
        return self.layer.qblocks.device

    def zero_range(self) -> tuple[int, int]:
        z = self.layer.block_type.zero
        return z, z

    @property
    def trains_scales(self) -> bool:
        """Whether each group's scale is a free fp16 value a merge may write (not in K-quants)."""
        return self.layer.block_type.trains_scales

    def grid_settings(self) -> dict:
        bt = self.layer.block_type
        return {"bits": self.bits, "group_size": bt.group, "sym": not bt.has_min}

    def read(self) -> QuantState:
        blocks = self.layer.qblocks
        cached = self._cache
        # Decoded once per buffer: a merge swaps the storage (restore), an in-place write bumps the version, a dtype or
        # device move replaces the bias. The cache holds an alias of the storage it decoded, so no other buffer can
        # take its address meanwhile. (Tensors made under inference_mode have no version: decoded every time.)
        version = None if blocks.is_inference() else blocks._version
        if (cached is not None and version is not None and cached[0].data_ptr() == blocks.data_ptr()
                and cached[1] == version and cached[2].bias is self.layer.bias):
            return cached[2]
        bt = self.layer.block_type
        codes, scales, offsets = bt.grid(blocks)
        G, K, N = scales.shape[1], self.in_features, self.out_features
        g_idx = torch.arange(K, device=blocks.device) // bt.group
        zeros = torch.full((G, N), bt.zero, dtype=torch.int16, device=blocks.device)
        state = QuantState(codes.t().contiguous(), zeros, scales.t().contiguous(), g_idx, bt.maxq,
                           self.layer.bias, layout=group_layout(g_idx, G), linear=nk_linear,
                           zero_range=(bt.zero, bt.zero), scale_dtype=torch.float16,
                           offsets=None if offsets is None else offsets.t().contiguous())
        self._cache = (blocks.data, version, state)
        return state

    def encode(self, codes: torch.Tensor, zeros: torch.Tensor, scales: Optional[torch.Tensor] = None,
               offsets: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        bt = self.layer.block_type
        if not bool((zeros.to(torch.int32) == bt.zero).all()):
            raise ValueError(f"GGUF's {bt.name} blocks have a fixed zero point ({bt.zero}); an update that moves zero "
                             "points cannot be written into them.")
        if int(codes.max()) > bt.maxq:
            raise ValueError(f"codes above {bt.maxq} cannot be written into {bt.name} blocks.")
        s16, m16 = (self._fp16(t, what) for t, what in ((scales, "scales"), (offsets, "offsets")))
        return {"qblocks": bt.write(self.layer.qblocks, codes.t().contiguous().to(self.device), s16, m16)}

    def _fp16(self, t: Optional[torch.Tensor], what: str) -> Optional[torch.Tensor]:
        """[G, N] float values as the blocks' fp16 [N, G], refused unless exactly fp16 values."""
        if t is None:
            return None
        t16 = t.detach().t().to(torch.float16).to(self.device)
        if not torch.equal(t16.float(), t.detach().t().float().to(self.device)):
            raise ValueError(f"{what} that are not fp16 values cannot be written into GGUF blocks exactly.")
        return t16

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {"qblocks": self.layer.qblocks.data}

    def restore(self, buffers: dict[str, torch.Tensor]) -> None:
        self.layer.qblocks.data = buffers["qblocks"]  # swaps the storage: no copy, the snapshot stays intact


def dispatch_gguf(module: nn.Module, name: str = "") -> Optional[GGUFWeights]:
    """The GGUFWeights of a GGUFLinear (one reader per layer, its decoded state cached), or None."""
    if not is_gguf_layer(module):
        return None
    return module._peft_lota_weights


# ---- loading a file --------------------------------------------------------------------------------------

@dataclass
class GGUFSource:
    """The file a model was loaded from, as a save needs it: where each tensor's bytes lie, and what identifies the
    file (a save refuses a source that changed since the load)."""

    path: Path
    identity: tuple
    tensors: dict = field(default_factory=dict)  # name -> (type name, data offset, n bytes)
    frozen: dict = field(default_factory=dict)  # model parameter/buffer name -> GGUF tensor name (copied as they are)
    arch: str = ""
    dtype: torch.dtype = torch.float32  # what the model was loaded in
    tied: dict = field(default_factory=dict)  # parameter the file does not hold -> the frozen one it is tied to


def _identity(path: Path) -> tuple:
    st = path.stat()
    return st.st_size, st.st_mtime_ns, st.st_ino


def _row_order(processor, tensor, n_rows: int) -> Optional[torch.Tensor]:
    """The file row each of the model's rows comes from, as transformers' tensor processor reorders a weight
    (Llama's q/k); None if it keeps the order. Raises ValueError if it does more than reorder whole rows."""
    import numpy as np

    probe = np.arange(n_rows, dtype=np.float64).reshape(n_rows, 1)
    out = processor.process(weights=probe, name=tensor.name, tensor_key_mapping={}, parsed_parameters={"tensors": {}})
    w = np.asarray(out.weights)
    if out.name != tensor.name or w.shape != (n_rows, 1) or sorted(w[:, 0].tolist()) != list(range(n_rows)):
        raise ValueError(f"transformers transforms {tensor.name} beyond reordering its rows")
    order = torch.from_numpy(w[:, 0].astype("int64"))
    return None if torch.equal(order, torch.arange(n_rows)) else order


def _processor(config, arch: str):
    """transformers' tensor processor for this architecture (and model config): what reorders a tensor as its GGUF
    loader loads it."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    return TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config.to_dict())


def _name_map(model: nn.Module, arch: str):
    """{model tensor name: GGUF tensor name}: the names gguf's own table gives (what transformers' GGUF loader maps
    with)."""
    import gguf

    key = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), None)
    if key is None:
        raise ValueError(f"the gguf package does not know the architecture {arch!r}; upgrade gguf.")
    table = gguf.get_tensor_name_map(key, model.config.num_hidden_layers)
    names = {}
    for name in [*dict(model.named_parameters()), *dict(model.named_buffers())]:
        stem, _, suffix = name.rpartition(".")
        g = table.get_name(stem)
        if g is not None:
            names[name] = f"{g}.{suffix}"
    return names


def read_header(path: Path):
    """gguf's reader of the file (memory-mapped); a file it cannot parse is said to be damaged, with the way out."""
    gguf = _require_gguf()
    try:
        reader = gguf.GGUFReader(str(path))
        reader.fields["general.architecture"].contents()
    except (OSError, ValueError, KeyError) as err:  # (a cut or damaged file fails inside numpy's reshape)
        raise ValueError(f"{path} cannot be read as a GGUF file ({str(err).strip() or type(err).__name__}): it is "
                         "damaged or incomplete; copy it again.") from None
    return reader


def load_gguf(path, *, dtype: torch.dtype = torch.float32, **kwargs) -> nn.Module:
    """A causal LM from the GGUF file `path` whose linear layers keep the file's blocks (GGUFLinear), ready for
    a method to adapt. `dtype`: what the rest of the model (embedding, norms) and the activations run in.
    kwargs go to transformers' from_pretrained."""
    gguf = _require_gguf()
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file.")
    reader = read_header(path)
    source = GGUFSource(path.resolve(), _identity(path))
    for t in reader.tensors:
        source.tensors[t.name] = (t.tensor_type.name, int(t.data_offset), int(t.n_bytes))
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype, **kwargs)
    arch = str(reader.fields["general.architecture"].contents())
    processor, to_gguf = _processor(model.config, arch), _name_map(model, arch)
    tensors = {t.name: t for t in reader.tensors}
    kept, frozen_types = 0, {}
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear:
            continue
        gname = to_gguf.get(f"{name}.weight")
        tensor = tensors.get(gname) if gname else None
        if tensor is None:  # a tied lm_head, or a layer the file does not hold
            continue
        qtype = tensor.tensor_type.name
        bt = BLOCK_TYPES.get(qtype)
        N, K = module.out_features, module.in_features
        if bt is None or K % bt.block or tuple(tensor.data.shape) != (N, K // bt.block * bt.nbytes):
            frozen_types[qtype] = frozen_types.get(qtype, 0) + 1
            continue
        try:
            order = _row_order(processor, tensor, N)
        except ValueError as e:
            logger.warning("peft_lota: keeping %s frozen: %s.", name, e)
            frozen_types[qtype] = frozen_types.get(qtype, 0) + 1
            continue
        raw = torch.from_numpy(tensor.data.copy())
        if order is not None:
            raw = raw[order]
        bias = None if module.bias is None else module.bias.detach().clone()
        layer = GGUFLinear(raw.to(module.weight.device), qtype, K, N, bias, gname, order)
        dense = layer._peft_lota_weights.read().weight().t().to(module.weight.dtype)
        if not torch.equal(dense, module.weight.detach()):  # the names or row order disagree with transformers'
            raise ValueError(f"{path}: {gname} does not decode to what transformers loaded as {name}.weight; "
                             "peft_lota cannot map this file's tensors to the model. Please report it.")
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        kept += 1
    if frozen_types:
        logger.warning("peft_lota: %s linear layer(s) of type(s) %s stay frozen (dequantized by transformers): "
                       "peft_lota adapts %s blocks.", sum(frozen_types.values()), ", ".join(sorted(frozen_types)),
                       "/".join(BLOCK_TYPES))
    if not kept:
        raise ValueError(f"{path} holds no linear layer of a type peft_lota adapts ({', '.join(BLOCK_TYPES)}); "
                         f"its layers are {', '.join(sorted(frozen_types)) or 'not found'}.")
    adapted = {m.tensor_name for m in model.modules() if isinstance(m, GGUFLinear)}
    source.frozen = {hf: g for hf, g in to_gguf.items() if g not in adapted and g in tensors}
    source.arch, source.dtype = arch, dtype
    # Parameters the file does not hold: a tied output head is the embedding's own tensor (a save checks it still is)
    named = dict(model.named_parameters(remove_duplicate=False))
    by_ptr = {t.data_ptr(): n for n, t in named.items() if n in source.frozen}
    source.tied = {n: by_ptr[t.data_ptr()] for n, t in named.items()
                   if n not in source.frozen and t.data_ptr() in by_ptr}
    model._peft_lota_gguf = source
    for p in model.parameters():
        p.requires_grad_(False)
    # transformers' GGUF quantizer has nothing left to do here (it dequantized at load) and would refuse what peft_lota
    # does itself: training (the stock Trainer asks it) and saving. The layers are ours now: save_pretrained writes
    # the GGUF file (an untrained model: the source's bytes).
    from ..export.attach import attach_export

    model.hf_quantizer, model.is_quantized = None, False
    return attach_export(model)


def model_is_gguf(model: nn.Module) -> bool:
    return getattr(model, "_peft_lota_gguf", None) is not None


# ---- writing a file --------------------------------------------------------------------------------------

def _file_rows(layer: GGUFLinear) -> torch.Tensor:
    """The layer's blocks in the file's row order."""
    raw = layer.qblocks.detach().cpu()
    if layer.row_order is None:
        return raw
    out = torch.empty_like(raw)
    out[layer.row_order] = raw
    return out


def _check_frozen(model: nn.Module, source: GGUFSource, reader) -> None:
    """A save copies every tensor but the GGUF layers' blocks from the source file: refuse if the model changed one
    of them (e.g. trained norms or modules_to_save), which the file would silently lose."""
    from gguf.quants import dequantize

    lost = ("a GGUF save writes the adapted linear layers' blocks and copies every other tensor from the source file, "
            "so this change would be lost. Train only the quantized layers (no modules_to_save or trained norms).")
    buffers = dict(model.named_buffers(remove_duplicate=False))
    params = {**buffers, **dict(model.named_parameters(remove_duplicate=False))}
    # what the file does not need to hold: the GGUF layers' blocks, and buffers no checkpoint saves (rotary tables)
    skipped = {f"{n}.qblocks" for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, GGUFLinear)}
    skipped |= {f"{n}.{b}" if n else b for n, m in model.named_modules(remove_duplicate=False)
                for b in m._non_persistent_buffers_set}
    for name in params:
        if name in skipped or name in source.frozen:
            continue
        tied = source.tied.get(name)
        if tied is None or not torch.equal(params[name].detach().cpu(), params[tied].detach().cpu()):
            raise ValueError(f"{name} is not a tensor of the source file" + (
                f" any more (it was {tied}, and now differs from it)" if tied else "") + f": {lost}")
    processor = _processor(model.config, source.arch)
    tensors = {t.name: t for t in reader.tensors}
    for hf, gname in source.frozen.items():
        p = params.get(hf)
        if p is None:
            continue
        t = tensors[gname]
        w = processor.process(weights=dequantize(t.data, t.tensor_type), name=gname, tensor_key_mapping={},
                              parsed_parameters={"tensors": {}}).weights
        expected = torch.from_numpy(w.copy())
        if expected.numel() != p.numel():
            raise ValueError(f"{hf} has {tuple(p.shape)} values, the file's {gname} {tuple(t.shape)}: {lost}")
        # as loaded (in the load's dtype), then as the model holds it now (a later .to(dtype) is no change)
        expected = expected.to(source.dtype).to(p.dtype).reshape(p.shape)
        if not torch.equal(expected, p.detach().cpu()):
            raise ValueError(f"{hf} differs from the file's {gname}: {lost}")


def write_patched(source: GGUFSource, out: Path, patches: Iterable[tuple[int, bytes]]) -> None:
    """Write a copy of the source file with `patches` ((offset, bytes): blocks of the same size) written over it to
    `out`, atomically: a temporary file in `out`'s folder, fsynced, then renamed over `out`. `patches` may be a
    generator (the streaming merge computes them while the copy is open); the source must not have changed since it
    was read, checked before the rename."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.peft_lota-", dir=out.parent)
    try:
        with os.fdopen(fd, "r+b") as f, open(source.path, "rb") as src:
            shutil.copyfileobj(src, f, 1 << 24)
            for offset, data in patches:
                f.seek(offset)
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if _identity(source.path) != source.identity:
            raise ValueError(f"{source.path} changed while it was being read: run again on a file nothing writes to.")
        if out.exists():
            logger.warning("peft_lota: replacing %s.", out)
            with contextlib.suppress(OSError):
                os.chmod(tmp, out.stat().st_mode & 0o7777)
        else:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        dfd = os.open(out.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def write_gguf(model: nn.Module, out_path) -> Path:
    """Write `model` (loaded by load_gguf, merged) as a GGUF file at `out_path`, atomically: the source file's bytes
    with the adapted tensors' data replaced. Refuses the source file itself as the output."""
    gguf = _require_gguf()
    source: GGUFSource = getattr(model, "_peft_lota_gguf", None)
    if source is None:
        raise ValueError("This model was not loaded from a GGUF file by peft_lota.load_gguf; nothing to write as GGUF.")
    out = Path(out_path)
    if out.exists() and out.is_dir():
        raise ValueError(f"{out} is a directory; give the path of the .gguf file to write.")
    if not source.path.is_file() or _identity(source.path) != source.identity:
        raise ValueError(f"{source.path}, which the model was loaded from, changed or disappeared since: a GGUF save "
                         "copies its untouched tensors from it. Load the model again.")
    if out.exists() and os.path.samefile(out, source.path):  # (links to it included)
        raise ValueError(f"{out} is the file the model was loaded from: write the merged model to another path.")
    layers = [m for m in model.modules() if isinstance(m, GGUFLinear)]
    from peft.tuners.tuners_utils import BaseTunerLayer

    if hasattr(model, "peft_config") or any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise ValueError("This model still holds PEFT adapter layers. Call `merge_and_unload()` first and save the "
                         "model it returns.")
    reader = gguf.GGUFReader(str(source.path))
    _check_frozen(model, source, reader)
    patches = []
    for layer in layers:
        qtype, offset, nbytes = source.tensors[layer.tensor_name]
        raw = _file_rows(layer).numpy()
        if qtype != layer.qtype or raw.nbytes != nbytes:
            raise ValueError(f"{layer.tensor_name}: the layer's blocks no longer match the file's tensor.")
        if not (raw.reshape(-1) == reader.data[offset:offset + nbytes]).all():
            patches.append((offset, raw.tobytes()))
    del reader
    write_patched(source, out, patches)
    logger.info("peft_lota: wrote %s (%d of %d GGUF layers changed).", out, len(patches), len(layers))
    return out


def gguf_dequantizes_to(model: nn.Module, path) -> list[str]:
    """The tensors of the GGUF file `path` that the gguf package's own dequantization does not turn into `model`'s
    GGUFLinear weights exactly (rows in the file's order): empty when the file computes the model. A check by code
    that is not ours."""
    gguf = _require_gguf()
    from gguf.quants import dequantize

    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    wrong = []
    for layer in (m for m in model.modules() if isinstance(m, GGUFLinear)):
        t = tensors.get(layer.tensor_name)
        ours = layer._peft_lota_weights.read().weight().t()  # [N, K] in the model's row order
        if layer.row_order is not None:
            ours = ours[torch.argsort(layer.row_order)]
        if t is None or not torch.equal(torch.from_numpy(dequantize(t.data, t.tensor_type)).reshape(ours.shape), ours):
            wrong.append(layer.tensor_name)
    return wrong


def write_folder(model: nn.Module, folder: Path) -> dict:
    """A merged GGUF model's save_pretrained: the GGUF file, under the source's name, into `folder`; its facts."""
    source: GGUFSource = model._peft_lota_gguf
    target = Path(folder).parent / source.path.name  # (saves stage inside the target folder: export/transaction.py)
    if target.exists() and os.path.samefile(target, source.path):
        raise ValueError(f"{Path(folder).parent} holds {source.path.name}, the file the model was loaded from, which "
                         "this save would replace: save into another folder.")
    write_gguf(model, Path(folder) / source.path.name)
    types = sorted({m.qtype for m in model.modules() if isinstance(m, GGUFLinear)})
    return {"format": "gguf", "bits": "/".join(str(BLOCK_TYPES[t].bits) for t in types),
            "group_size": "/".join(str(BLOCK_TYPES[t].group) for t in types),
            "desc_act": False, "sym": not any(BLOCK_TYPES[t].has_min for t in types), "checkpoint_format": "gguf",
            "loaders": f"llama.cpp (and Ollama, LM Studio, llama-cpp-python), transformers with gguf_file=; "
                       f"adapted blocks: {', '.join(types)}.", "kernels": ["llama.cpp"], "fast_path_note": None,
            "gguf_file": source.path.name}


def describe_file(path) -> list[tuple[str, object]]:
    """(key, value) rows that say what a GGUF file holds and what peft_lota adapts in it (the command line's
    inspect), from its header alone."""
    gguf = _require_gguf()
    reader = gguf.GGUFReader(str(path))
    counts: dict = {}
    for t in reader.tensors:
        if len(t.shape) == 2:
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    name = reader.fields.get("general.name")
    adapted = {k: v for k, v in counts.items() if k in BLOCK_TYPES}
    frozen = {k: v for k, v in counts.items() if k not in BLOCK_TYPES}
    return [("kind", "GGUF file"), ("model", name.contents() if name is not None else "-"),
            ("architecture", reader.fields["general.architecture"].contents()),
            ("2-D tensors peft_lota adapts", ", ".join(f"{v} {k}" for k, v in sorted(adapted.items())) or "none"),
            ("2-D tensors kept as they are", (", ".join(f"{v} {k}" for k, v in sorted(frozen.items())) or "none")
             + (" (embeddings, and layers of types peft_lota does not read)" if frozen else "")),
            ("size", os.path.getsize(path))]


def prepare_gguf_model(model: nn.Module) -> int:
    """Nothing to change in a model load_gguf built; a GGUF model transformers loaded by itself holds dense layers
    (every block dequantized), which no update can merge into: refused with the way to load it."""
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if method == NAME and not model_is_gguf(model):
        raise ValueError("This model was loaded from a GGUF file by transformers, which dequantizes every block: "
                         "load it with `peft_lota.load_gguf(path)`, which keeps the file's blocks, to train and merge "
                         "it exactly.")
    return 0


class GgufFormat(WritesOwnFile, Format):
    name, quant_method = NAME, NAME
    requires = (("gguf", "gguf"),)
    is_layer, dispatch = staticmethod(is_gguf_layer), staticmethod(dispatch_gguf)
    prepare_model, model_is = staticmethod(prepare_gguf_model), staticmethod(model_is_gguf)
    write_folder = staticmethod(write_folder)

    def checkpoint(self, model):
        raise ValueError("A GGUF model is written as a GGUF file (save_pretrained(folder) or peft_lota.formats.gguf."
                         "write_gguf), not as a safetensors checkpoint.")

    def load_config(self, qc):
        return None  # transformers dequantizes a GGUF file at load; load_gguf keeps its blocks

    def kernels(self, qc):
        return [("llama.cpp", "cpu, cuda, metal", True)]

    def describe(self, qc):
        return [("kind", "GGUF file")]


FORMAT = GgufFormat()
