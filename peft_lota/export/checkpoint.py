"""A merged model as a standard checkpoint of its format: the state dict and config the format says, written
through transformers' own save_pretrained into a staged folder that `transaction` commits."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .. import formats
from ..guards import refuse_non_finite_checkpoint
from ..paths import copy_into
from ..paths import plain_name as _plain_name
from .card import CARD_NAME, _check_card_info, model_card
from .transaction import _REMOVABLE, commit_checkpoint

logger = logging.getLogger("peft_lota.export")


# ---- what to write ---------------------------------------------------------------------------------

def _prepare(model: nn.Module) -> tuple[dict, dict, dict, dict]:
    """(state dict, quantization config, extra files, facts) of a standard checkpoint of `model`."""
    _refuse_unmerged(model)
    fmt = formats.model_format(model)
    if fmt is None:
        raise ValueError("This model is not quantized in a format peft_lota writes (its config has no "
                         "quantization_config peft_lota knows); save it with its own save_pretrained.")
    state_dict, qc, extra_files, facts = _onload(model, *fmt.checkpoint(model))
    refuse_non_finite_checkpoint(state_dict)  # a base that held NaN already, or a model edited after merging
    return state_dict, qc, extra_files, facts


def _onload(model: nn.Module, state_dict: dict, *rest) -> tuple:
    """Weights a device map offloaded (to disk or CPU) are meta tensors in the model: read them where accelerate
    keeps them, as transformers' own save does. (The packed codes are buffers, which accelerate does not offload.)"""
    meta = [k for k, v in state_dict.items() if isinstance(v, torch.Tensor) and v.device.type == "meta"]
    if meta:
        from transformers.integrations.accelerate import load_offloaded_parameter

        state_dict = dict(state_dict)
        for name in meta:
            try:
                state_dict[name] = load_offloaded_parameter(model, name)
            except ValueError:
                raise ValueError(f"{name} is on the meta device and accelerate holds no copy of it: load the model "
                                 "again with its device map and offload_folder, or without offloading, and save "
                                 "that.") from None
    return (state_dict, *rest)


def _refuse_unmerged(model: nn.Module) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    if hasattr(model, "peft_config") or any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise ValueError("This model still holds PEFT adapter layers. Call `merge_and_unload()` first and save the "
                         "model it returns (or save the adapter alone with `peft_model.save_pretrained`).")


# ---- writing ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def _saving_as(model: nn.Module, state_dict: dict, qc: dict):
    """Make transformers' save_pretrained write `state_dict` and `qc`; restore the model afterwards.

    For a quantized model, save_pretrained ignores its `state_dict=` argument and asks
    `hf_quantizer.get_state_dict_and_metadata(model)`: we answer that call on this instance only.
    save_pretrained also sets config.dtype/architectures: the whole config is put back as it was.
    """
    config = model.config
    saved_config = dict(vars(config))
    quantizer = getattr(model, "hf_quantizer", None)
    had_hook = quantizer is not None and "get_state_dict_and_metadata" in vars(quantizer)
    old_hook = vars(quantizer).get("get_state_dict_and_metadata") if quantizer is not None else None
    try:
        config.quantization_config = qc
        if quantizer is not None:
            quantizer.get_state_dict_and_metadata = lambda _model: (state_dict, {})
        yield
    finally:
        vars(config).clear()
        vars(config).update(saved_config)
        if quantizer is not None:
            if had_hook:
                quantizer.get_state_dict_and_metadata = old_hook
            else:
                vars(quantizer).pop("get_state_dict_and_metadata", None)


def _write(model, folder: Path, *, card_info: Optional[dict], write_card: bool, max_shard_size,
           save_kwargs: dict) -> dict:
    """Write the complete checkpoint into the empty folder `folder`; returns the format's facts."""
    fmt = formats.model_format(model)
    if fmt is not None and fmt.writes_own_file:  # a file of the format's own (GGUF)
        _refuse_unmerged(model)
        facts = fmt.write_folder(model, folder)
        if card_info is not None and write_card:
            _check_card_info(card_info, facts)
            (folder / CARD_NAME).write_text(model_card(card_info, facts), encoding="utf-8")
        return facts
    state_dict, qc, extra_files, facts = _prepare(model)
    if card_info is not None:
        _check_card_info(card_info, facts)
    if facts.get("serialized_as_loaded"):
        # The state dict is already in the checkpoint's own serialization (LLM.int8's weight + SCB); transformers
        # cannot revert its load-time conversion of a pre-quantized bitsandbytes checkpoint (NotImplementedError).
        save_kwargs = {"save_original_format": False, **save_kwargs}
    with _saving_as(model, state_dict, qc):
        # type(model).save_pretrained: attach_export shadows the instance's own.
        type(model).save_pretrained(model, str(folder), max_shard_size=max_shard_size,
                                    state_dict=None if getattr(model, "hf_quantizer", None) else state_dict,
                                    **save_kwargs)
    for name, text in extra_files.items():
        (folder / name).write_text(text)
    if card_info is not None and write_card:
        (folder / CARD_NAME).write_text(model_card(card_info, facts), encoding="utf-8")
    return facts


def save_checkpoint(model: nn.Module, save_directory, *, card_info: Optional[dict] = None,
                    max_shard_size: int | str = "50GB", overwrite_readme: bool = False,
                    extra_files: Optional[dict] = None, **save_kwargs) -> Path:
    """Write `model` (a merged quantized transformers model) as a standard checkpoint into `save_directory`.

    The checkpoint holds exactly the in-memory codes, zero points, scales, g_idx and bias, and loads with
    stock `AutoModelForCausalLM.from_pretrained(save_directory)`. What the format writes (for GPTQ:
    v1 or v2, `sym`, backend "auto", quantize_config.json) is described in its file under formats/.

    Args:
        card_info: if given, a model card (README.md) is written from it (see `model_card`); a method's
            `merge_and_unload` fills it in.
        overwrite_readme: an existing README.md in `save_directory` that peft_lota did not write is kept
            unless this is True (a card we wrote earlier is always refreshed).
        extra_files: {file name: source path} copied into the checkpoint in the same commit (the tokenizer:
            `verify.tokenizer_files`); each name a plain file name.
        save_kwargs: passed to transformers' save_pretrained (e.g. `is_main_process`).
            `safe_serialization=False`, `state_dict`, `variant` and `push_to_hub` are refused.

    Nothing this save does not write is deleted or changed (other weight files, tokenizer, notes, the
    folder's mode), except the stale shards of an earlier peft_lota save into the same folder. An error
    while writing leaves the folder as it was; see the comment above `MANIFEST` for what a crash while
    moving the files in can leave, and `recover`. Returns the path of the checkpoint folder.
    """
    _check_save_kwargs(save_kwargs)
    if not save_kwargs.pop("is_main_process", True):
        return Path(save_directory)  # like transformers: only the main process writes

    extra = dict(extra_files or {})
    bad = [n for n in extra if not _plain_name(n) or n.startswith(".") or _REMOVABLE.fullmatch(n) or n == CARD_NAME]
    if bad:
        raise ValueError(f"extra_files: {bad[0]!r} is not a name an extra file may have (a plain name, not one the "
                         "checkpoint itself writes).")

    def write(staged: Path, write_card: bool) -> None:
        _write(model, staged, card_info=card_info, write_card=write_card, max_shard_size=max_shard_size,
               save_kwargs=save_kwargs)
        for name, source in extra.items():
            copy_into(Path(source), staged, name)

    return commit_checkpoint(save_directory, write, card=card_info is not None, overwrite_readme=overwrite_readme)


def _check_save_kwargs(save_kwargs: dict) -> None:
    if save_kwargs.pop("variant", None) is not None:
        raise ValueError("variant= is not supported: a checkpoint is committed under the standard file names "
                         "(model.safetensors, or shards and model.safetensors.index.json); save to another folder "
                         "instead.")
    if save_kwargs.pop("safe_serialization", True) is False:
        raise ValueError("Checkpoints are written as safetensors only; safe_serialization=False is not supported.")
    if save_kwargs.get("state_dict") is not None:
        raise ValueError("save_checkpoint computes the state dict itself; do not pass `state_dict`.")
    save_kwargs.pop("state_dict", None)
    if save_kwargs.pop("distributed_checkpoint", False):
        raise ValueError("distributed_checkpoint=True writes DCP shards, not a standard checkpoint; it is not "
                         "supported.")
    if save_kwargs.get("push_to_hub"):
        raise ValueError("Use push_checkpoint_to_hub (or model.push_to_hub after attach_export).")
    save_kwargs.pop("push_to_hub", None)
