"""LotaModel: the PEFT tuner that injects LoTA layers, merges them on the integer grid and unloads."""

from __future__ import annotations

import re
from typing import Optional

import torch
from torch import nn

from .. import formats
from ..guards import refuse_non_finite
from ..tuner import QuantTuner
from .config import LotaConfig
from .layer import FloatOffsetMergeError, LotaLayer, float_offset_merge_message

TERNARY_KEY = re.compile(r"\.lota_[AB]$")  # checkpoint keys (adapter name removed) of A and B
SCALES_KEY = re.compile(r"\.lota_(scales|offsets)$")  # ... and of the trained scales and float offsets
LATENT_SUFFIX = "_latent"  # "...lota_A_latent": the latent values a latent-mode adapter resumes from


def _pack_ternary(t: torch.Tensor) -> torch.Tensor:
    """{-1, 0, 1} float -> 2 bits per value (codes 0, 1, 2), 4 values per uint8 (flattened)."""
    v = (t.detach().flatten().round().to(torch.int16) + 1).to(torch.uint8).cpu()
    if v.numel() % 4:
        v = torch.cat([v, torch.ones(4 - v.numel() % 4, dtype=torch.uint8)])
    v = v.view(-1, 4)
    return v[:, 0] | (v[:, 1] << 2) | (v[:, 2] << 4) | (v[:, 3] << 6)


def _unpack_ternary(packed: torch.Tensor, like: torch.Tensor, key: str) -> torch.Tensor:
    """Inverse of _pack_ternary into the shape and dtype of `like`; refuses a size or value that cannot be."""
    expected = -(-like.numel() // 4)
    if packed.dim() != 1 or packed.numel() != expected:
        raise ValueError(f"Adapter tensor {key} holds {packed.numel()} packed bytes, but this model's {key} has shape "
                         f"{tuple(like.shape)} ({expected} bytes): the adapter was made for a model of another shape "
                         "or another rank r.")
    v = torch.stack([(packed >> s) & 3 for s in (0, 2, 4, 6)], dim=1).flatten()
    if bool((v == 3).any()):
        raise ValueError(f"Adapter tensor {key} holds invalid 2-bit codes (3): the file is corrupt or not a LoTA "
                         "adapter.")
    return (v[: like.numel()].to(torch.float32) - 1).view(like.shape).to(like.dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of a 16- or 32-bit float tensor, as int64."""
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()]).long()


def _stored(state, which: str) -> torch.Tensor:
    """The base's scales or float offsets as the checkpoint stores them (GGUF reads its fp16 values widened)."""
    return (state.scales if which == "scales" else state.offsets).to(state.scale_dtype)


def _scale_steps(layer, adapter_name: str, which: str = "scales") -> Optional[torch.Tensor]:
    """What a merge of this adapter writes into the layer's scales (or float offsets: `which`), as the change of each
    stored value's bit pattern (in the stored 16-bit dtype: one step is one unit in the last place), in the smallest
    integer dtype that holds it; None where that cannot be said (the layer holds merged adapters, whose scales are no
    longer the base's)."""
    if layer.merged_adapters:
        return None
    state = layer.quant.read()
    base = _stored(state, which)
    after = (layer.scales_after if which == "scales" else layer.offsets_after)(state, [adapter_name]).to(base.dtype)
    steps = _bits(after) - _bits(base)
    for dtype in (torch.int8, torch.int16, torch.int32):
        info = torch.iinfo(dtype)
        if steps.numel() == 0 or (int(steps.min()) >= info.min and int(steps.max()) <= info.max):
            return steps.to(dtype).cpu().contiguous()
    return None


def _multipliers_from_steps(layer, steps: torch.Tensor, key: str, latent: Optional[torch.Tensor],
                            which: str = "scales", scale_u: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Trained-scale multipliers u (float32; or the trained offsets' u: `which`) with which the layer's forward and
    merge use exactly the values `steps` (from _scale_steps) describe: the saved `latent` values (exact resume) if
    given, else ones made from the steps. Refuses steps that do not fit this base, and latents that disagree.
    Offsets: `scale_u`, the same adapter's scale multipliers u (the offsets scale with them: offsets_after)."""
    from ..numerics import LOTA_SCALE_UNIT
    from ..tuner_layer import RoundToStoredSTE

    state = layer.quant.read()
    if which == "offsets" and state.offsets is None:
        raise ValueError(f"Adapter tensor {key} holds trained float offsets, and this model's layer stores none: the "
                         "adapter was made for another base model.")
    base = _stored(state, which)
    if steps.shape != base.shape:
        raise ValueError(f"Adapter tensor {key} has shape {tuple(steps.shape)}, but this model's {which} have shape "
                         f"{tuple(base.shape)}: the adapter was made for a model of another shape or group size.")
    bits = _bits(base) + steps.to(torch.int64).to(base.device)
    width = 8 * base.element_size()
    if bool(((bits < -(1 << (width - 1))) | (bits >= 1 << (width - 1))).any()):
        if which == "offsets":
            raise ValueError(f"Adapter tensor {key} moves offsets outside their {base.dtype}: the file is corrupt or was "
                             "made for another base model.")
        raise ValueError(f"Adapter tensor {key} moves scales outside their {base.dtype}: the adapter was trained on "
                         "scales of another dtype (compressed-tensors scales follow the dtype the model is loaded in: "
                         "load or merge it in the dtype it was trained in, e.g. `peft-lota merge --dtype float32`; "
                         "`merge --stream` reads them in the checkpoint's own dtype), or made for another base model.")
    target = bits.to({2: torch.int16, 4: torch.int32}[base.element_size()]).view(base.dtype).float()
    s0 = base.float()
    if latent is not None and latent.shape != base.shape:
        raise ValueError(f"Adapter tensor {key}{LATENT_SUFFIX} has shape {tuple(latent.shape)}, but this model's "
                         f"{which} have shape {tuple(base.shape)}: the file is corrupt.")
    if which == "offsets":  # m0 * multiplier + LOTA_SCALE_UNIT * scale * u (layer.offsets_after)
        from ..numerics import scale_multiplier

        scales = state.scales.float()
        unit = LOTA_SCALE_UNIT * scales
        m0 = s0 if scale_u is None else torch.where(
            scales != 0, s0 * scale_multiplier(scale_u.float().to(s0.device), LOTA_SCALE_UNIT), s0)
        u = latent.float().to(s0.device) if latent is not None else torch.where(
            unit != 0, (target - m0) / torch.where(unit != 0, unit, 1), 0.0)
        if not torch.equal(RoundToStoredSTE.apply(m0 + unit * u, base.dtype), target):
            raise ValueError(f"Adapter tensor {key} " + ("disagrees with its latent values (the file is corrupt)"
                             if latent is not None else "describes offsets this base cannot reach (another base "
                             "model)") + ": load it onto the model it was trained on.")
        return u
    if latent is not None:
        u = latent.float().to(s0.device)
    else:
        u = torch.where(s0 != 0, (target / torch.where(s0 != 0, s0, 1) - 1) / LOTA_SCALE_UNIT, 0.0)
    got = RoundToStoredSTE.apply(s0 * (1 + LOTA_SCALE_UNIT * u), base.dtype)
    if not torch.equal(got, target):
        what = ("disagrees with its multipliers (the file is corrupt)" if latent is not None else
                "describes scales this base cannot reach (a scale of 0 that moves, or another base model)")
        raise ValueError(f"Adapter tensor {key} {what}: load it onto the model it was trained on.")
    return u


class LotaModel(QuantTuner):
    """Creates a LoTA-QAF model from a quantized transformers model of any format of formats/ (use
    `peft.get_peft_model`); `merge_and_unload()` returns the model in the same format, its codes moved."""

    prefix: str = "lota_"
    tuner_layer_cls = LotaLayer
    method_name = "LoTA"

    def _all_linear_error(self) -> str:
        return ("LotaConfig(target_modules='all-linear') found no quantized linear layer in this model. LoTA adapts "
                f"integer-quantized models: load a {formats.format_list(sep=', ')} checkpoint (peft_lota.load_model), "
                "or train L4Q on the full-precision model.")

    def _create_and_replace(self, lota_config: LotaConfig, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str, **optional_kwargs) -> None:
        if isinstance(target, LotaLayer):
            target.update_layer(adapter_name, lota_config.layer_settings(), init_seed=lota_config.init_seed)
            return
        quant = formats.dispatch(target, current_key)  # one dispatch per format (formats/)
        if quant is None:
            raise TypeError(
                f"LoTA cannot adapt module {current_key!r} of type {type(target).__name__}: it adapts quantized "
                f"({formats.format_list()}) linear layers only (their integer codes are what LoTA moves). Remove it "
                "from target_modules, or use target_modules='all-linear' to pick every quantized layer."
            )
        self._check_base(lota_config, current_key, target, quant)
        new_module = LotaLayer(target, quant, adapter_name, lota_config.layer_settings(),
                               init_seed=lota_config.init_seed, current_key=current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    # ---- merge / unload ----------------------------------------------------------------------
    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False,
                      round_float_offset: bool = False) -> None:
        """Merge adapters into the integer codes (Q + D), keeping them in memory so unmerge_adapter can restore."""
        super().merge_adapter(adapter_names, safe_merge, round_float_offset=round_float_offset)

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Optional[list[str]] = None, round_float_offset: bool = False) -> nn.Module:
        """Merge on the integer grid and return the plain transformers model, quantized as it was loaded.

        Its `save_pretrained` / `push_to_hub` write a standard checkpoint of its format (see export/).
        """
        return super().merge_and_unload(progressbar, safe_merge, adapter_names, round_float_offset=round_float_offset)

    def _check_before_merge(self, adapter_names: Optional[list[str]], round_float_offset: bool = False) -> None:
        """Refuse a float-offset merge, or a ternary adapter another optimizer trained, before anything is written."""
        names = adapter_names if adapter_names is not None else self.active_adapters
        for name in names:
            config = self.peft_config.get(name)
            if config is not None and config.offset == "float" and not round_float_offset:
                raise FloatOffsetMergeError(float_offset_merge_message(name))
        super()._check_before_merge(adapter_names)
        for module in self._tuner_layers():
            for name in adapter_names if adapter_names is not None else module.active_adapters:
                if name in module.lota_A and name not in module.merged_adapters:
                    module.factors(name, "merge")

    def _method_card(self, config) -> dict:
        return {
            "method": "LoTA-QAF", "method_url": "https://arxiv.org/abs/2505.18724", "method_tag": "lota-qaf",
            "summary": "The ternary adapters were merged losslessly on the integer grid: their thresholded product "
                       "moved each integer code by a whole number of quantization steps, and the result was written "
                       "back into the packed integer weights" + (" together with the trained scales." if config is not None
                                                                 and config.train_scales else "."),
            "settings": {"LoTA rank r": getattr(config, "r", None), "LoTA threshold omega": getattr(config, "omega", None),
                         "LoTA offset mode": getattr(config, "offset", None)},
        }

    # ---- compact adapter files: ternary tensors at 2 bits per value ------------------------------
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        sd = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        out = {}
        for key, value in sd.items():
            name = cls._remove_adapter_name_from_key(key, adapter_name)
            found = SCALES_KEY.search(name)
            if found:  # what the merge writes, compactly; the multipliers only to resume from
                which = found.group(1)
                steps = _scale_steps(model.get_submodule(key.rsplit(f".lota_{which}", 1)[0]), adapter_name, which)
                keep_latent = getattr(config, "save_latents", True) and steps is not None
                out[key] = value.detach().float().contiguous() if steps is None else steps
                if keep_latent:
                    base, _, adapter = key.rpartition(".")
                    out[f"{base}{LATENT_SUFFIX}.{adapter}"] = value.detach().float().contiguous()
            elif not TERNARY_KEY.search(name):
                out[key] = value
            elif config.train_mode == "latent":  # what the forward uses, and the latent values to resume from
                from .layer import ternarize

                out[key] = _pack_ternary(ternarize(value.detach(), config.latent_threshold))
                base, _, adapter = key.rpartition(".")
                if getattr(config, "save_latents", True):
                    out[f"{base}{LATENT_SUFFIX}.{adapter}"] = value.detach().float().contiguous()
            else:
                from .layer import NotTernaryError, not_ternary_message
                from .ternary import is_ternary

                if not is_ternary(value):
                    raise NotTernaryError(not_ternary_message(adapter_name, "save"))
                out[key] = _pack_ternary(value)
        return out

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        latents = {k[: -len(LATENT_SUFFIX)]: v for k, v in state_dict.items() if k.endswith(LATENT_SUFFIX)}
        for key, value in latents.items():  # the other tensors are checked by QuantTuner's remap
            refuse_non_finite(value, f"Adapter tensor {key}{LATENT_SUFFIX}", "load")
        state_dict = {k: v for k, v in state_dict.items() if not k.endswith(LATENT_SUFFIX)}
        sd = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        params = dict(model.named_parameters())
        # (offsets last: they are read with their layer's scale multipliers, converted first)
        for key, value in sorted(sd.items(), key=lambda kv: ".lota_offsets" in kv[0]):
            name = cls._remove_adapter_name_from_key(key, adapter_name)
            latent = latents.get(name) if name in latents else latents.get(name.removeprefix("base_model.model."))
            found = SCALES_KEY.search(name)
            if found and key in params and not value.is_floating_point():
                which = found.group(1)
                layer = model.get_submodule(key.rsplit(f".lota_{which}", 1)[0])
                scale_u = sd.get(key.replace(".lota_offsets", ".lota_scales")) if which == "offsets" else None
                sd[key] = _multipliers_from_steps(layer, value, name, latent, which, scale_u).to(params[key].dtype)
                continue
            if not TERNARY_KEY.search(name) or key not in params:
                continue
            like = params[key]
            # The 2-bit values are checked even where latents replace them: a corrupt file is refused either way.
            ternary = _unpack_ternary(value, like, name) if value.dtype == torch.uint8 else value
            if config.train_mode == "latent" and latent is not None:
                if latent.shape != like.shape:
                    raise ValueError(f"Adapter tensor {name} has shape {tuple(latent.shape)}, but this model's has "
                                     f"{tuple(like.shape)}: the adapter was made for a model of another shape or "
                                     "another rank r.")
                sd[key] = latent.to(like.dtype)
                continue
            if config.train_mode == "latent":  # no latent values saved: start each entry in its level's middle
                ternary = ternary * (2 * config.latent_threshold)
            sd[key] = ternary
        return sd
