"""What every peft_lota method's PEFT tuner shares: target selection on quantized models, merge, unload, export.

A method's model subclasses `QuantTuner` and says which modules it can adapt (`_adaptable`), how to
build its layer (`_create_and_replace`), what to check before a merge writes anything
(`_check_before_merge`) and what the model card says (`_card_info`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from tqdm.auto import tqdm
from peft.tuners.tuners_utils import BaseTuner, onload_layer
from transformers import TrainerCallback

from . import formats
from .guards import (  # noqa: F401  (re-exported: the names' old home)
    NonFiniteError, check_rank, refuse_non_finite, refuse_non_finite_adapters, refuse_non_finite_checkpoint)


def merged_training_error(method: str, key: str) -> RuntimeError:
    return RuntimeError(f"{key or 'a layer'}: the {method} adapter is merged into the quantized weights, so nothing can "
                        "learn through it. Call unmerge_adapter() before training (or train a fresh adapter).")


BASE_LAYERS_HELP = ("Filled in by get_peft_model: what each adapted layer of the base looked like (format, shape, bits, "
                    "groups, a fingerprint of its scales or weight). Loading the adapter onto a base that differs is "
                    "refused with a message naming both; set it to None in adapter_config.json to skip the check.")


def check_common_config(config, name: str) -> None:
    """What every peft_lota method's config checks and fills in alike (`name`: "LotaConfig" in messages)."""
    if config.task_type is None:  # quantized LLMs: PeftModelForCausalLM unless the user says otherwise
        config.task_type = "CAUSAL_LM"
    if config.target_modules is None:
        config.target_modules = "all-linear"
    if isinstance(config.target_modules, (list, set, tuple)):
        if not config.target_modules:
            raise ValueError(f"{name}: target_modules is empty; give layer names, a regex or 'all-linear'.")
        config.target_modules = set(config.target_modules)
    if isinstance(config.exclude_modules, list):
        config.exclude_modules = set(config.exclude_modules)
    if isinstance(config.r, bool) or not isinstance(config.r, int) or config.r < 1:
        raise ValueError(f"{name}: r must be a positive integer, got r={config.r!r}.")
    if config.init_seed is not None and (isinstance(config.init_seed, bool) or not isinstance(config.init_seed, int)):
        raise ValueError(f"{name}: init_seed must be an integer or None, got {config.init_seed!r}.")
    if config.layers_pattern and not config.layers_to_transform:
        raise ValueError(f"{name}: layers_pattern only makes sense together with layers_to_transform.")


def _fp16(args) -> bool:
    """fp16 mixed precision, set by TrainingArguments(fp16=True) or by accelerate (--mixed_precision fp16)."""
    return bool(args.fp16) or getattr(args, "mixed_precision", None) == "fp16"


class NonFiniteCallback(TrainerCallback):
    """Stops a `transformers.Trainer` run at the first non-finite value, with a message, before it is saved.

    Checked: the adapters' gradients before each optimizer step (so the parameters are still those of the last
    good step; skipped under fp16 mixed precision, whose loss scaler skips overflowing steps by design), the
    trainable parameters after each step, and the logged loss and grad_norm. A step's checkpoint is written after
    on_step_end, so none holding NaN is saved. The checks read each trainable tensor once per optimizer step
    (adapter-sized: nothing next to a forward pass). Raises NonFiniteError.
    """

    @staticmethod
    def _first_bad(model, grads: bool):
        named = [(n, p.grad if grads else p) for n, p in model.named_parameters() if p.requires_grad]
        named = [(n, t) for n, t in named if t is not None]
        if not named:
            return None
        device = named[0][1].device  # one device sync for all tensors (a model may span devices)
        if bool(torch.stack([torch.isfinite(t).all().to(device) for _, t in named]).all()):
            return None
        return next(n for n, t in named if not bool(torch.isfinite(t).all()))

    def _stop(self, state, what: str) -> None:
        raise NonFiniteError(f"Training stopped at step {state.global_step}: {what}. Lower the learning rate (or "
                             "train in bf16/fp32 rather than fp16) and resume from the last checkpoint saved before "
                             "this step (trainer.train(resume_from_checkpoint=...)).")

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is not None and not _fp16(args):
            bad = self._first_bad(model, grads=True)
            if bad is not None:
                self._stop(state, f"the gradient of {bad} holds NaN or infinity (the parameters are left as they "
                                  "were before this step)")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            bad = self._first_bad(model, grads=False)
            if bad is not None:
                self._stop(state, f"the trained parameter {bad} holds NaN or infinity")

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "grad_norm") if not _fp16(args) else ("loss",):
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                self._stop(state, f"the logged {key} is {value}")


def base_signature(target: nn.Module, quant) -> list:
    """[format, in_features, out_features, bits, groups, fingerprint] of a layer an adapter is made for.

    The fingerprint hashes a strided sample of the layer's scales (quantized) or weight (full precision): it
    tells another checkpoint of the same shapes apart, at no cost worth measuring.
    """
    import hashlib

    if quant is not None:
        state = quant.read()
        head = [quant.format_name, quant.in_features, quant.out_features, quant.bits, int(state.scales.shape[0])]
        sample = state.scales
    else:
        head = ["dense", target.in_features, target.out_features, None, None]
        sample = target.weight
    flat = sample.detach().reshape(-1)
    step = max(1, flat.numel() // 4096)
    digest = hashlib.sha1(flat[::step].float().cpu().numpy().tobytes()).hexdigest()[:16]
    return head + [digest]


def _describe(signature) -> str:
    fmt, k, n, bits, groups, digest = signature
    shape = f"[in {k}, out {n}]"
    if fmt == "dense":
        return f"a full-precision layer {shape} (fingerprint {digest})"
    return f"{fmt.upper()} {bits}-bit {shape} with {groups} groups (fingerprint {digest})"


class QuantTuner(BaseTuner):
    method_name: str = "?"  # e.g. "LoTA" in messages
    target_module_mapping: dict = {}

    # ---- injection ---------------------------------------------------------------------------
    def _adaptable(self, module: nn.Module) -> bool:
        """Whether 'all-linear' takes this module (the output head is left out by the caller)."""
        return formats.is_quantized_layer(module)

    def _all_linear_error(self) -> str:
        return (f"{type(self.peft_config.get(self.active_adapter, None)).__name__}(target_modules='all-linear') found no "
                f"quantized linear layer in this model: load a quantized ({formats.format_list()}) checkpoint.")

    def _prepare_adapter_config(self, peft_config, model_config: dict):
        # PEFT calls this first: a quantization we cannot merge into is refused before anything else happens.
        qc = formats.model_quantization_config(self.model)
        if qc is not None and formats.config_format(qc) is None:
            raise ValueError(f"{self.method_name} cannot adapt this model: {formats.unsupported_reason(qc)}")
        if qc is not None:  # a format's own refusal of how the model was loaded (GGUF dequantized by transformers)
            formats.config_format(qc).prepare_model(self.model)
        # PEFT's own "all-linear" looks for nn.Linear and finds nothing on a quantized model (gptqmodel's layers are no nn.Linear).
        if isinstance(peft_config.target_modules, str) and peft_config.target_modules.lower() == "all-linear":
            output_head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
            ours = {n for n, m in self.model.named_modules() if isinstance(m, self.tuner_layer_cls)}
            inside = {n for name in ours for n, _ in self.model.get_submodule(name).named_modules(prefix=name)} - ours
            names = {n for n, m in self.model.named_modules()
                     if self._adaptable(m) and m is not output_head and n not in inside} | ours
            if not names:
                raise ValueError(self._all_linear_error())
            # Suffixes ("q_proj") rather than full names, so PEFT still applies layers_to_transform;
            # full names only where a suffix would also match some module we would not adapt.
            suffixes = {n.rpartition(".")[2] for n in names}
            clash = any(n and n.rpartition(".")[2] in suffixes and n not in names and n not in inside
                        for n, _ in self.model.named_modules())
            peft_config.target_modules = names if clash else suffixes
        return peft_config

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        """PEFT's injection, undone if it fails half-way: the user's model is never left half-wrapped."""
        before = {name for name, m in model.named_modules() if isinstance(m, self.tuner_layer_cls)}
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        except BaseException:
            for name, module in list(model.named_modules()):
                if isinstance(module, self.tuner_layer_cls) and name not in before:
                    parent_name, _, child = name.rpartition(".")
                    setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
            raise

    def _prepare_model(self, peft_config, model: nn.Module) -> None:
        formats.prepare_model(model)
        # A fresh config records the base it adapts; a loaded one (base_layers filled) is checked against it.
        self._recording_base = peft_config.base_layers is None
        if self._recording_base:
            peft_config.base_layers = {}

    def _check_base(self, config, key: str, target: nn.Module, quant) -> None:
        """Record (fresh adapter) or check (loaded adapter) what the adapted layer of the base looks like."""
        signature = base_signature(target, quant)
        if getattr(self, "_recording_base", False) or config.base_layers is None:
            if config.base_layers is not None:
                config.base_layers[key] = signature
            return
        made_for = config.base_layers.get(key)
        if made_for is not None and list(made_for) != signature:
            raise ValueError(
                f"This {self.method_name} adapter was made for a base whose layer {key} is {_describe(made_for)}; "
                f"this model's is {_describe(signature)}. Load it onto the model it was trained on (adapter_config.json "
                "names it in base_model_name_or_path); to skip this check, set base_layers to null there.")

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        # BaseTuner's version copies `.weight`, which packed quantized layers do not have (and crashes on unload).
        setattr(parent, child_name, new_module)

    # ---- merge / unload ----------------------------------------------------------------------
    def _tuner_layers(self) -> list:
        return [m for m in self.model.modules() if isinstance(m, self.tuner_layer_cls)]

    def _check_before_merge(self, adapter_names: Optional[list[str]], **merge_kwargs) -> None:
        """Refuse a merge up front, before any layer is written (a method adds its own checks)."""
        self._check_merge_allowed()
        for module in self._tuner_layers():  # NaN/inf in what a merge would read or write
            names = adapter_names if adapter_names is not None else module.active_adapters
            module.check_finite([n for n in names if n not in module.merged_adapters], "merge")

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False, **merge_kwargs) -> None:
        """Merge adapters into the quantized weights, keeping what unmerge_adapter needs to restore them."""
        self._merge_layers(adapter_names, safe_merge, merge_kwargs)

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Optional[list[str]] = None, **merge_kwargs) -> nn.Module:
        """Merge into the quantized weights and return the plain transformers model.

        Its `save_pretrained` / `push_to_hub` write a standard quantized checkpoint (see export/).
        """
        info = self._card_info(adapter_names)
        self._merge_layers(adapter_names, safe_merge, merge_kwargs, unloading=True, progressbar=progressbar)
        model = self._unload_and_optionally_merge(merge=False, progressbar=progressbar)
        self._after_unload(model)
        from .export import attach_export

        attach_export(model, info)
        return model

    def _after_unload(self, model: nn.Module) -> None:
        """Hook: what the unloaded model needs to be a standard quantized model (e.g. its quantization config)."""

    def _merge_layers(self, adapter_names: Optional[list[str]], safe_merge: bool, merge_kwargs: dict, *,
                      unloading: bool = False, progressbar: bool = False) -> None:
        """Merge every tuner layer in turn, after the checks that refuse a merge before anything is written.

        unloading (merge_and_unload): no unmerge follows, so each layer's pre-merge buffers are freed as soon
        as it is merged (peak memory ~1x the packed weights, not 2x), and a failure names its layer.
        """
        self._check_before_merge(adapter_names, **merge_kwargs)
        layers = self._tuner_layers()
        for i, module in enumerate(tqdm(layers, desc=f"merging {self.method_name}", disable=not progressbar)):
            try:
                with onload_layer(module):
                    module.merge(safe_merge=safe_merge, adapter_names=adapter_names, **merge_kwargs)
            except Exception as err:
                if not unloading:
                    raise
                raise RuntimeError(f"merge_and_unload failed at {self.method_name} layer {i} of {len(layers)} "
                                   f"({module._current_key}); the layers before it are merged already.") from err
            if unloading:
                module.release_unmerged()

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        if not any(isinstance(m, cls.tuner_layer_cls) for m in model.modules()):
            raise ValueError(
                f"This PeftModel holds no {cls.method_name} layer any more: merge_and_unload() (or unload()) took them "
                "out. Save the model that merge_and_unload() returned (a standard quantized checkpoint), or save the "
                "adapter before merging.")
        sd = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        for key, value in sd.items():
            refuse_non_finite(value, f"Adapter tensor {key}", "save")
        return sd

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        for key, value in state_dict.items():  # PeftModel.from_pretrained, load_adapter
            refuse_non_finite(value, f"Adapter tensor {key}", "load")
        sd = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        # PEFT only warns about missing tensors and keeps their initial values: an empty or partial file would load
        # (and merge) as a different adapter than the one saved.
        names = cls.tuner_layer_cls.adapter_layer_names
        expected = [n for n, _ in model.named_parameters()
                    if n.endswith(f".{adapter_name}") and any(f".{p}." in n for p in names)]
        missing = [n for n in expected if n not in sd]
        if missing and all(".lota_offsets." in n for n in missing):
            raise ValueError(f"This LoTA adapter holds no trained offsets for the {len(missing)} layers whose grid "
                             f"stores a float offset per group (GGUF's Q4_1 / Q5_1; e.g. {missing[0]}): it was saved "
                             "by a peft_lota that kept those offsets fixed (0.1.0 before 2026-12-06), and this one "
                             "trains them. Train the adapter again, or merge it with the peft_lota that trained it.")
        if missing:
            raise ValueError(f"The {cls.method_name} adapter file lacks {len(missing)} of the {len(expected)} tensors "
                             f"this model's adapter needs (e.g. {missing[0]}): it is incomplete, or was saved from "
                             "another model or with other target_modules. Save the adapter again.")
        return sd

    def _card_info(self, adapter_names: Optional[list[str]]) -> dict:
        """What the model card of a merged checkpoint says (export.model_card)."""
        names = adapter_names if adapter_names is not None else self.active_adapters
        configs = [self.peft_config[n] for n in names if n in self.peft_config]
        first = configs[0] if configs else None
        return {
            "base_model": (first.base_model_name_or_path if first else None)
            or getattr(getattr(self.model, "config", None), "_name_or_path", None),
            **self._method_card(first),
            "adapters": list(names),
        }

    def _method_card(self, config) -> dict:
        """method, method_url, method_tag, summary and settings for the model card."""
        return {"method": self.method_name}
