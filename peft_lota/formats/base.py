"""What every PEFT method sees of a quantized linear layer, whatever format stores it.

A uniform integer grid, group-wise (each group of input rows shares a scale and a zero point), `K = in_features`,
`N = out_features`, in the formats' own orientation `[K, N]`:

    codes   Q  uint8 [K, N]   integer codes in [0, maxq]
    zeros   z  int   [G, N]   true zero points (GPTQ's "v2" convention)
    scales  s  float [G, N]   in the dtype the checkpoint stores (fp16 for GPTQ)
    g_idx      long  [K]      group of each input row (act-order permutes it)
    weight     W[k, n] = s[g[k], n] * (Q[k, n] - z[g[k], n])

`QuantState` carries these for one layer, read from its packed buffers by the layer's
`QuantWeights` (one implementation per format, each in its own file beside this one); methods work on
a QuantState and hand codes, zeros and scales back to `QuantWeights.encode`, never touching a packed
tensor. A `Format` subclass describes one format to the rest of the package (dispatch, model preparation,
checkpoint writing; the mixins `BuildsLayers`, `Streams`, `WritesOwnFile` for what only some can do), so that adding
a format means adding a file, not editing if/else chains.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, Optional

import torch
from torch import nn


def group_counts(g_idx: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Rows per group, float [G]."""
    return torch.bincount(g_idx, minlength=num_groups).to(torch.float32)


def contiguous_group_rows(g_idx: torch.Tensor, num_groups: int):
    """Group size if g_idx is k // group_size with equal, full groups (no act-order), else None."""
    K = g_idx.numel()
    if num_groups < 1 or K % num_groups:
        return None
    gs = K // num_groups
    expected = torch.arange(K, device=g_idx.device) // gs
    return gs if torch.equal(g_idx.to(expected.dtype), expected) else None


def group_layout(g_idx: torch.Tensor, num_groups: int):
    """(rows per group, contiguous group size or None) of a g_idx."""
    return group_counts(g_idx, num_groups), contiguous_group_rows(g_idx, num_groups)


def dequantize(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """`s[g] * (Q - z[g])` with the op order and dtypes of gptqmodel's TorchLinear.

    The integer difference is formed first and multiplied by the scales in their own dtype
    (fp16 for standard checkpoints), so a weight computed here is bit-identical to the one the
    stock kernel computes from the same codes: this is what makes a merged model's logits equal
    the adapter model's.
    """
    dtype = torch.int16  # holds Q - z for every width; int8 (gptqmodel's choice below 8 bits) gives the same values
    return scales[g_idx] * (codes.to(dtype) - zeros.to(dtype)[g_idx])


def model_quantization_config(model: nn.Module) -> Optional[dict]:
    """A transformers model's quantization_config as a dict, or None."""
    qcfg = getattr(getattr(model, "config", None), "quantization_config", None)
    if qcfg is None:
        return None
    return dict(qcfg) if isinstance(qcfg, dict) else qcfg.to_dict()


def nk_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], **grid) -> torch.Tensor:
    """nn.Linear's product (formats that decompress to a dense layer): `F.linear` on W [N, K] as a contiguous
    tensor, the bias inside."""
    if bias is not None and bias.dtype != x.dtype:  # autocast's cast, which our autograd functions run without
        bias = bias.to(x.dtype)
    return torch.nn.functional.linear(x, weight.t().contiguous(), bias)


def add_bias(out: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """gptqmodel TorchLinear's bias: cast to the output's dtype, then added."""
    return out if bias is None else out + bias.to(out.dtype)


def matmul_add(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], **grid) -> torch.Tensor:
    """x @ W [K, N], then the bias as gptqmodel's kernels add it: the matmul of the GPTQ and AWQ kernels.

    `grid` (codes, zeros, scales of W) is for kernels that compute from the codes themselves (LLM.int8)."""
    return add_bias(torch.matmul(x, weight), bias)


class QuantState:
    """One quantized layer's codes, zeros, scales, g_idx and bias, read once per call from its buffers.

    Codes are given either whole (`codes`, uint8 [K, N]) or as `codes_rows(k0, k1)`, which decodes
    rows k0..k1-1 on demand (k0, k1 multiples of `row_align`), so that fast paths decode one
    row chunk at a time. `codes` is then decoded whole on first use (reference paths only).
    """

    __slots__ = ("_codes", "codes_rows", "zeros", "scales", "g_idx", "counts", "maxq", "bias", "in_features",
                 "row_align", "group_rows", "linear", "zero_range", "offsets", "scale_dtype")

    def __init__(self, codes, zeros, scales, g_idx, maxq, bias=None, *, codes_rows=None, in_features=None,
                 row_align: int = 1, layout=None, linear=matmul_add, zero_range=None, offsets=None, scale_dtype=None):
        self._codes, self.codes_rows = codes, codes_rows
        # linear(x, W [K, N], bias, codes=, zeros=, scales=): the stock kernel's own product, so that an adapted
        # layer's output is bit for bit the merged layer's (the same values in another layout can round differently)
        self.linear = linear
        if codes_rows is None:
            self.codes_rows = lambda k0, k1: codes[k0:k1]
        self.zeros, self.scales, self.g_idx = zeros, scales, g_idx
        self.maxq, self.bias = maxq, bias
        self.in_features = codes.shape[0] if in_features is None else in_features
        self.row_align = row_align
        # (lowest, highest) zero point the format's checkpoints can store: where a merge may move one
        self.zero_range = (0, maxq) if zero_range is None else zero_range
        # Formats whose weight is s * (Q - z) + m with a float offset m per group (GGUF's Q4_1, Q5_1, K-quants):
        # float32 [G, N], added last, as their dequantization does; None for the others.
        self.offsets = offsets
        # The dtype trained scales are rounded to: the one the checkpoint stores them in. Usually the scales' own;
        # GGUF hands its fp16 scales over widened to float32 (its products are float32, never rounded to fp16).
        self.scale_dtype = scales.dtype if scale_dtype is None else scale_dtype
        # (counts, group_rows) depend on g_idx only: a layer may pass them in, computed once (group_layout)
        self.counts, self.group_rows = layout if layout is not None else group_layout(g_idx, scales.shape[0])

    @property
    def codes(self) -> torch.Tensor:
        if self._codes is None:
            self._codes = self.codes_rows(0, self.in_features)
        return self._codes

    @property
    def layout(self):
        return self.counts, self.group_rows

    def replace(self, **changes) -> "QuantState":
        """A copy with some fields changed (codes, zeros, scales): e.g. the state after a merge step."""
        fields = dict(codes=self._codes, zeros=self.zeros, scales=self.scales, g_idx=self.g_idx, maxq=self.maxq,
                      bias=self.bias, offsets=self.offsets, scale_dtype=self.scale_dtype)
        fields.update(changes)
        rows = None if "codes" in changes else self.codes_rows
        return QuantState(fields.pop("codes"), **fields, codes_rows=rows, in_features=self.in_features,
                          row_align=self.row_align, layout=self.layout, linear=self.linear, zero_range=self.zero_range)

    def weight(self) -> torch.Tensor:
        """The dequantized weight [K, N] in the scales' dtype, as the stock kernel computes it."""
        w = dequantize(self.codes, self.zeros, self.scales, self.g_idx)
        return w if self.offsets is None else w + self.offsets[self.g_idx]

    def group_blocks(self, t: torch.Tensor, k0: int, k1: int) -> torch.Tensor:
        """The rows of the per-group tensor `t` [G, N] that rows k0..k1-1 use, as [blocks, 1, N].

        Rows k0..k1-1 viewed as [blocks, (k1 - k0) / blocks, N] broadcast against it. Contiguous groups
        (no act-order) need no gather: the chunk lies in one group, or holds whole groups (row chunks
        are cut that way).
        """
        gs = self.group_rows
        if gs is None:  # act-order: one block per row
            return t[self.g_idx[k0:k1]].unsqueeze(1)
        g0, g1 = k0 // gs, (k1 - 1) // gs + 1
        if g1 - g0 > 1 and (k0 % gs or (k1 - k0) % gs):
            raise ValueError(f"rows {k0}..{k1 - 1} straddle groups of {gs} rows; use row_chunks().")
        return t[g0:g1].unsqueeze(1)


class QuantWeights:
    """Reads and writes the quantized weights of one layer of some format (one subclass per format).

    `read()` decodes the layer's buffers into a QuantState; `encode(...)` packs codes (and zeros,
    scales) into new raw buffers in the format's own layout, without touching the layer;
    `snapshot()` / `restore()` swap whole buffers in and out (aliases, never copies or in-place
    writes), which is how merges are applied and undone exactly.
    """

    format_name: str = "?"
    # True where the stock kernel adds the bias inside its matmul (nn.Linear's addmm): the state's `linear` then
    # gets the bias, instead of kernel_output
    fuses_bias: bool = False
    # True where the format stores no zero points (symmetric only): nothing may move them
    fixed_zero_points: bool = False
    # False where a group's scale is not a free value of its own (GGUF's K-quants: integers under one fp16 per 256
    # weights): methods then keep the scales and move codes only
    trains_scales: bool = True

    def __init__(self, layer: nn.Module):
        self.layer = layer

    # layer geometry
    in_features: int
    out_features: int
    bits: int

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    @property
    def device(self) -> torch.device:
        return next(iter(self.layer.buffers())).device

    def read(self) -> QuantState:
        raise NotImplementedError

    def zero_range(self) -> tuple[int, int]:
        """(lowest, highest) zero point this format's checkpoints store."""
        return 0, self.maxq

    def grid_settings(self) -> dict:
        """{"bits", "group_size", "sym"} of the layer's grid, as a quantizer config names them."""
        layer = self.layer
        return {"bits": self.bits, "group_size": layer.group_size, "sym": bool(layer.sym)}

    # How the format's stock kernel treats activations around its matmul, so that an adapted layer computes
    # exactly what the merged layer will. The defaults are gptqmodel's TorchLinear: the matmul runs in the
    # activations' dtype (or autocast's) and the bias is cast to the output's dtype.
    def kernel_input(self, x: torch.Tensor) -> torch.Tensor:
        """The activations as the kernel's matmul takes them (before autocast); may convert the layer's buffers
        in place exactly as the kernel itself would on this input."""
        return x

    def kernel_output(self, out: torch.Tensor, bias: Optional[torch.Tensor], input_dtype: torch.dtype) -> torch.Tensor:
        """The layer's output from the matmul's `out`: bias added as the kernel adds it."""
        return add_bias(out, bias)

    def encode(self, codes: torch.Tensor, zeros: torch.Tensor, scales: Optional[torch.Tensor] = None
               ) -> dict[str, torch.Tensor]:
        """New raw buffers holding these codes [K, N], true zeros [G, N] (and scales [G, N], if given). A format
        whose grid stores float offsets (QuantState.offsets) also takes `offsets=` [G, N]."""
        raise NotImplementedError

    def snapshot(self) -> dict[str, torch.Tensor]:
        """The raw buffers that `encode` produces, as they are now: aliases, not copies."""
        raise NotImplementedError

    def restore(self, buffers: dict[str, torch.Tensor]) -> None:
        """Make the layer hold these raw buffers (swapped in, not copied; never written to later)."""
        raise NotImplementedError


def problems_error(what: str, problems: list[str], hint: str) -> ValueError:
    """One error for every layer a format cannot use: the first three problems, how many more, and the way out."""
    more = f"\n(and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return ValueError(f"{what}:\n- " + "\n- ".join(problems[:3]) + more + "\n" + hint)


def layers_of(model: nn.Module, is_layer: Callable[[nn.Module], bool]) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if is_layer(m)]


def swap_layers(model: nn.Module, layers: list[tuple[str, nn.Module]], layout_problem, target: type, convert,
                what: str, hint: str) -> list[nn.Module]:
    """Move every layer to the format's layout-keeping, trainable `target` kernel (`convert(layer)` builds it,
    sharing the buffers), after checking them all: one unreadable layer refuses the model, and nothing is swapped.
    Returns the layers now in the model, in order."""
    problems = [p for n, m in layers if (p := layout_problem(n, m))]
    if problems:
        raise problems_error(f"peft_lota cannot use this model's {what} layers as loaded", problems, hint)
    out = []
    for name, module in layers:
        if type(module) is not target:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            module = convert(module)
            setattr(parent, child, module)
        out.append(module)
    return out


def checked_layers(model: nn.Module, layers: list[tuple[str, nn.Module]], layout_problem, bits: int, what: str,
                   hint: str) -> None:
    """What a checkpoint of a format needs of the model's layers: some, all readable, all of the config's width."""
    problems = [p for n, m in layers if (p := layout_problem(n, m))]
    if problems:
        raise problems_error(f"Cannot write a standard {what} checkpoint from this model", problems, hint)
    if not layers:
        raise ValueError(f"This model has no {what} layers peft_lota reads; nothing to write as a {what} checkpoint.")
    if any(m.bits != bits for _, m in layers):
        raise ValueError(f"Layers of several bit widths (config says {bits}); per-layer bits are not supported.")


def stamp_quantizer(qc: dict) -> dict:
    """qc with `meta.quantizer` naming this peft_lota version once (the tools that made a checkpoint, in order)."""
    from ..version import __version__

    meta = dict(qc.get("meta") or {})
    meta["quantizer"] = [q for q in (meta.get("quantizer") or []) if not q.startswith("peft_lota:")]
    meta["quantizer"].append(f"peft_lota:{__version__}")
    qc["meta"] = meta
    return qc


def gptqmodel_kernels(modules: tuple[str, ...], names: tuple[str, ...], supports) -> list[tuple[str, str, bool]]:
    """(kernel, devices, can serve) for gptqmodel's kernel classes `names`, found in its qlinear `modules` (a kernel
    whose extras are missing is not listed); `supports(cls)` reads the class's own SUPPORTS_* declarations."""
    import importlib

    classes = {}
    for module in modules:
        try:
            mod = importlib.import_module(f"gptqmodel.nn_modules.qlinear.{module}")
        except Exception:  # noqa: BLE001 - a kernel whose extras are missing is just not listed
            continue
        classes.update({n: c for n in names if isinstance(c := getattr(mod, n, None), type)})
    return [(f"gptqmodel {n}", ", ".join(str(getattr(d, "value", d)) for d in getattr(classes[n], "SUPPORTS_DEVICES", [])),
             bool(supports(classes[n]))) for n in names if n in classes]


class PackedBufferWeights(QuantWeights):
    """A layer whose codes, zeros and scales live in the registered buffers `qweight`, `qzeros` and `scales` (gptqmodel's
    GPTQ and AWQ kernels); a format says how it packs them (`pack_codes`, `pack_zeros`)."""

    def __init__(self, layer: nn.Module):
        super().__init__(layer)
        self.in_features, self.out_features, self.bits = layer.in_features, layer.out_features, layer.bits

    def pack_codes(self, codes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pack_zeros(self, zeros: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, codes: torch.Tensor, zeros: torch.Tensor, scales: Optional[torch.Tensor] = None
               ) -> dict[str, torch.Tensor]:
        base = self.layer
        out = {"qweight": self.pack_codes(codes).to(base.qweight.device),
               "qzeros": self.pack_zeros(zeros).to(base.qzeros.device)}
        if scales is not None:
            out["scales"] = scales.detach().to(base.scales.dtype).to(base.scales.device).contiguous()
        return out

    def snapshot(self) -> dict[str, torch.Tensor]:
        base = self.layer
        return {"qweight": base.qweight.data, "qzeros": base.qzeros.data, "scales": base.scales.data}

    def restore(self, buffers: dict[str, torch.Tensor]) -> None:
        base = self.layer
        for name, value in buffers.items():
            # `.data =` swaps the storage of the registered buffer (whoever holds the buffer sees the new values)
            # without copying, and leaves the tensors of a snapshot untouched.
            getattr(base, name).data = value
        clear_kernel_caches(base)


def clear_kernel_caches(module: nn.Module) -> None:
    """gptqmodel kernels cache decoded zeros, g_idx or weights; drop them after the buffers change."""
    for clear in ("_stream_reset_cache", "clear_weight_cache"):
        if callable(getattr(module, clear, None)):
            getattr(module, clear)()


class MissingLibraryError(ValueError):
    """A checkpoint's format needs a library (gptqmodel, compressed-tensors, bitsandbytes) that is not installed."""


class Format(ABC):
    """One quantized format, as the rest of the package sees it: one subclass per file beside this one, whose single
    instance sits in `formats.FORMATS`. The methods below are what every format provides; what only some formats
    can do is a mixin (`BuildsLayers`, `Streams`, `WritesOwnFile`), so that a capability is a fact of the class, not a
    field left None. Methods receive and return plain values (modules, dicts): a format never names a PEFT method."""

    name: str  # how the package names it ("gptq", "awq", "compressed-tensors", "bitsandbytes-int8", "gguf")
    quant_method: str  # the `quant_method` of its transformers quantization_config ("gptq", "awq")
    # (import name, pip extra) of the libraries loading a checkpoint of this format needs: checked before a load, so
    # that a missing one is a line naming what to install, not an ImportError deep in transformers.
    requires: tuple = ()
    # Whether a reload keeps the scales in the dtype they were written in (a format that casts them to the model's
    # dtype at load rounds float32 scales trained for it).
    reload_keeps_scale_dtype: bool = True

    @abstractmethod
    def is_layer(self, module: nn.Module) -> bool:
        """Whether `module` is a layer of this format (in any kernel)."""

    @abstractmethod
    def dispatch(self, module: nn.Module, name: str) -> Optional[QuantWeights]:
        """The layer's QuantWeights, or None if `module` is not of this format; raises with instructions if it is,
        but in a layout that cannot be read."""

    @abstractmethod
    def prepare_model(self, model: nn.Module) -> int:
        """Make every layer of this format in `model` readable and trainable; returns how many layers it changed.
        Called once before adapters are injected."""

    @abstractmethod
    def model_is(self, model: nn.Module) -> bool:
        """Whether `model` (a transformers model) holds this format, from its config."""

    @abstractmethod
    def checkpoint(self, model: nn.Module) -> tuple[dict, dict, dict, dict]:
        """(state_dict, quantization_config, extra files {name: text}, facts for the model card) of a standard
        checkpoint of `model` in this format."""

    @abstractmethod
    def load_config(self, qc: dict) -> Any:
        """The transformers quantization config that loads a checkpoint of this format with its layout-keeping,
        trainable kernel."""

    @abstractmethod
    def kernels(self, qc: dict) -> list:
        """[(kernel, devices, can serve)] for a checkpoint's quantization_config."""

    @abstractmethod
    def describe(self, qc: dict) -> list:
        """(key, value) rows that say what a checkpoint is (the command line's inspect)."""

    def fast_path_note(self, qc: dict) -> Optional[str]:
        """Which GPU server (vLLM, SGLang) refuses the checkpoint, why, and the conversion it serves; or None."""
        return None

    def matches(self, qc: dict) -> bool:
        """Whether a quantization_config (dict) is of this format; by default, its quant_method is ours."""
        return qc.get("quant_method") == self.quant_method

    def __repr__(self) -> str:
        return f"<format {self.name}>"

    @property
    def can_stream(self) -> bool:
        """Whether a checkpoint of this format can be merged file by file, one layer at a time (stream.py)."""
        return isinstance(self, Streams)

    @property
    def title(self) -> str:
        """How messages name the format: "GPTQ", "AWQ", "compressed-tensors", "LLM.int8"."""
        return {"bitsandbytes-int8": "LLM.int8"}.get(self.name, self.name.upper() if len(self.name) <= 4 else self.name)

    @property
    def can_build(self) -> bool:
        """Whether new layers of this format can be built from codes, zeros and scales (a quantizer writes them)."""
        return isinstance(self, BuildsLayers)

    @property
    def writes_own_file(self) -> bool:
        """Whether its checkpoint is a file of its own rather than a transformers state dict (GGUF)."""
        return isinstance(self, WritesOwnFile)

    def missing_libraries(self) -> list:
        """[(import name, pip extra)] of `requires` that are not installed."""
        import importlib.util

        def installed(lib: str) -> bool:
            try:
                return importlib.util.find_spec(lib) is not None
            except (ImportError, ValueError):  # (a module set to None in sys.modules, a finder that refuses it)
                return False

        return [(lib, extra) for lib, extra in self.requires if not installed(lib)]

    def check_installed(self) -> None:
        """Raise MissingLibraryError with the install line if a library this format loads with is missing."""
        missing = self.missing_libraries()
        if missing:
            libs = " and ".join(lib for lib, _ in missing)
            extra = missing[0][1]
            raise MissingLibraryError(
                f"a {self.title} checkpoint loads through {libs}, which is not installed: pip install \".[{extra}]\" "
                "from a clone of peft_lota" + (" (after torch, with --no-build-isolation: gptqmodel is compiled "
                                               "against it)" if any(lib == "gptqmodel" for lib, _ in missing) else "")
                + ".")

    @property
    def can_hold_trained_scales(self) -> bool:
        """Whether new layers with trained float scales can be written in this format and reload unchanged."""
        return self.can_build and self.reload_keeps_scale_dtype



class BuildsLayers(ABC):
    """A format whose layers can be built from an integer grid (a method that quantizes a full-precision model,
    `convert`, `merge --format`)."""

    @abstractmethod
    def grid_problem(self, in_features: int, out_features: int, bits: int, group_size: int, sym: bool,
                     act_order: bool = False) -> Optional[str]:
        """Why a layer with this grid cannot be stored in this format, or None."""

    @abstractmethod
    def build_layer(self, codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                    bias: Optional[torch.Tensor], bits: int, group_size: int, sym: bool) -> nn.Module:
        """A layer of the format's trainable kernel holding exactly these codes [K, N], true zeros [G, N], scales
        [G, N] (stored dtype) and bias."""

    @abstractmethod
    def new_config(self, bits: int, group_size: int, sym: bool) -> dict:
        """The quantization_config of a model of such layers."""


class Streams(ABC):
    """A format whose checkpoint can be merged shard by shard, one layer at a time, never holding the model."""

    layer_tensor_names: tuple = ()  # the tensors of one layer, by suffix
    # The tensors true_zeros_of reads (stored zero points and what gives their shape); () when the format stores none
    # (symmetric layers): every zero point is then the grid's centre and always fits.
    zero_point_tensors: tuple = ()

    @abstractmethod
    def layer_from_tensors(self, tensors: dict, qc: dict) -> nn.Module:
        """A trainable, layout-keeping layer holding one layer's checkpoint tensors ({suffix: tensor})."""

    @abstractmethod
    def layer_tensors(self, layer: nn.Module, qc_out: dict) -> dict:
        """The layer's tensors as a checkpoint with quantization_config `qc_out` stores them."""

    @abstractmethod
    def true_zeros_of(self, tensors: dict, qc: dict) -> torch.Tensor:
        """The layer's true zero points, from its checkpoint tensors."""

    @abstractmethod
    def checkpoint_config(self, qc: dict, fits_classic: bool, still_sym: bool) -> tuple:
        """(quantization_config, extra files, facts) of the written checkpoint."""


class WritesOwnFile(ABC):
    """A format whose checkpoint is not a transformers state dict but a file of its own (GGUF)."""

    @abstractmethod
    def write_folder(self, model: nn.Module, folder) -> dict:
        """Write the model's file into a save's staging folder; returns the facts for the model card."""
