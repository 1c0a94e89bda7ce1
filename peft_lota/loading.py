"""Loading models the way peft_lota's methods need them, and quieting third-party messages nobody can act on."""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

from .paths import check_index

# gptqmodel sizes a worker pool from the CPU count at import and fails to start it on 2-core machines: there, 2
# workers. Set before anything imports gptqmodel (this module is peft_lota's first import); larger machines keep
# gptqmodel's own sizing, and a value the user set always wins.
if (os.cpu_count() or 1) <= 2:
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

# Messages printed on every run by the stack underneath, that nobody can act on: gptqmodel's start-up banner, its
# notes that the GIL is enabled, that it set two environment variables and ran gc, that it compiles a kernel, picked
# a temporary folder and converts a checkpoint's zero points on load (as it always does);
# torch's notices about Enum pytree registrations made by torchao's (and compressed-tensors') imports and about a
# missing CUDA runtime (on CPU machines, when gptqmodel loads its extensions); transformers' deprecation notice for an
# attribute PEFT and gptqmodel read, and two notices of its Trainer (below). Only these are dropped: every other
# message of theirs still shows.
_NOISE = ("Python GIL is enabled", "GPT-QModel", "is an Enum subclass and is now natively supported",
          "ENV: Auto setting", "gc.collect() reclaimed", "compilation triggered", "No CUDA runtime is found",
          "CPU AVX512-BF16 kernel requires", "offload_to_disk_path auto set", "Converting GPTQ v1 to v2",
          "Converting `format` from",
          # transformers, on every Trainer run of a quantized model loaded with a device_map (harmless: the default
          # loss is the right one, and the model is where it should be)
          "was set in the config but it is unrecognized", "The model is already on multiple devices",
          # bitsandbytes, at every LLM.int8 forward of float32 activations (it always quantizes them via float16)
          "inputs will be cast from",
          # bitsandbytes' import on CPUs with AVX512-BF16: a 4-bit (NF4) kernel fetched from a hub, which peft_lota
          # never uses (NF4 is refused: not a uniform grid)
          "Failed to load CPU gemm_4bit_forward")
_NOISY_LOGGERS = ("torch.utils._pytree", "torch.utils.cpp_extension", "transformers.modeling_utils",
                  "transformers.trainer", "bitsandbytes.autograd._functions", "bitsandbytes.backends.cpu.ops")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001
            return True
        return not any(n in text for n in _NOISE)


def quiet_third_party() -> None:
    """Drop those messages (only those). Idempotent; runs before peft_lota imports torch, peft or gptqmodel."""
    for name in _NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise())
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    try:
        # gptqmodel's logger prints directly (no logging handler to filter) and has no API to silence one message,
        # so its single entry point is wrapped: only the messages in _NOISE are dropped.
        from logbar import LogBar
    except ImportError:
        return
    shared = LogBar.shared()
    if getattr(shared, "_peft_lota_quiet", False):
        return
    process = shared._process

    def _process(level, msg, *args, **kwargs):
        text = " ".join(map(str, (msg, *args)))
        if any(n in text for n in _NOISE):
            return None
        return process(level, msg, *args, **kwargs)

    shared._process = _process
    shared._peft_lota_quiet = True


def quantization_config(path) -> dict | None:
    """The quantization_config of a local checkpoint folder or Hub repo in a format peft_lota reads (formats.FORMATS),
    or None for a full-precision model. Another quantization (bitsandbytes 4-bit, ...) is refused with the reason."""
    local = Path(path) / "config.json"
    if local.exists():
        try:
            config = json.loads(local.read_text())
        except (ValueError, RecursionError) as err:
            raise ValueError(f"{local} is not valid JSON ({str(err)[:80] or 'nested too deeply'}): copy the checkpoint "
                             "again.") from None
        if not isinstance(config, dict):
            raise ValueError(f"{local} holds a JSON {type(config).__name__}, not an object: the file is damaged.")
        qc = config.get("quantization_config")
    else:
        from transformers import AutoConfig

        qc = getattr(AutoConfig.from_pretrained(path), "quantization_config", None)
        qc = qc if isinstance(qc, dict) or qc is None else qc.to_dict()
    if not qc:
        return None
    from .formats import config_format, unsupported_reason
    from .formats.packing import SUPPORTED_BITS

    if not isinstance(qc, dict):
        raise ValueError(f"{path}: config.json's quantization_config is {qc!r}, not an object: the file is damaged.")
    if config_format(qc) is None:
        raise ValueError(f"{path}: {unsupported_reason(qc)}")
    if qc.get("quant_method") == "compressed-tensors":
        groups = qc.get("config_groups")
        if not isinstance(groups, dict) or not all(isinstance(g, dict) and isinstance(g.get("weights"), (dict, type(None)))
                                                   for g in groups.values()):
            raise ValueError(f"{path}: config.json's quantization_config has config_groups {groups!r:.60}, not a map of "
                             "groups with their weights' scheme: the file is damaged.")
        for name, group in groups.items():
            nbits = (group.get("weights") or {}).get("num_bits", 0 if group.get("weights") else None)
            if group.get("weights") and (isinstance(nbits, bool) or nbits not in SUPPORTED_BITS):
                raise ValueError(f"{path}: config.json's quantization group {name} has {nbits!r}-bit weights; "
                                 f"peft_lota reads {', '.join(map(str, SUPPORTED_BITS))}-bit integer weights (a value "
                                 "like 0, null or 2^40 means the file is damaged).")
    bits = qc.get("bits")
    if qc.get("quant_method") in ("gptq", "awq") and (isinstance(bits, bool) or bits not in SUPPORTED_BITS):
        # transformers refuses them at load (gptqmodel writes 5-7 bits in its own planar layout)
        raise ValueError(f"{path}: a {bits}-bit {qc['quant_method'].upper()} checkpoint; transformers and peft_lota "
                         f"read {', '.join(map(str, SUPPORTED_BITS))} bits: quantize the model at one of those.")
    return qc


def load_model(path, dtype=None, **kwargs):
    """A model ready for peft_lota's methods: a quantized checkpoint loaded with the kernel its format adapts and
    merges into (`Format.load_config`: gptqmodel's trainable, layout-keeping TorchLinear for GPTQ, AwqTorchLinear for
    AWQ; compressed-tensors and LLM.int8 as transformers loads them), a GGUF file (`path` ending in .gguf: load_gguf),
    or a full-precision model.

    The same as `AutoModelForCausalLM.from_pretrained(path, quantization_config=GPTQConfig(bits=..., backend=
    "gptq_torch"))` (AwqConfig for AWQ), without transformers' notice that only the backend of that config is used
    (it is meant). dtype: the activation dtype (default float32 on CPU, float16 on CUDA).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from .formats import config_format

    if dtype is None:
        dtype = torch.float16 if torch.cuda.is_available() else torch.float32
    if str(path).endswith(".gguf"):  # llama.cpp's file: its blocks kept (formats/gguf.py)
        from .formats.gguf import load_gguf

        return load_gguf(path, dtype=dtype, **kwargs)
    check_index(path)  # every shard name a plain file of the folder, before transformers opens any
    qc = quantization_config(path)
    if qc is not None:
        config_format(qc).check_installed()  # a missing library: the line to install it
    load_config = config_format(qc).load_config(qc) if qc is not None else None
    if load_config is not None:  # None: the format loads as it is (compressed-tensors, LLM.int8)
        kwargs.setdefault("quantization_config", load_config)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You passed `quantization_config`")
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
