"""`merge_lora`: a PEFT LoRA trained on a quantized model, merged into that model's own grid and format.

PEFT cannot merge a LoRA into GPTQ/AWQ/compressed-tensors/LLM.int8 layers, and the usual way round it
(dequantize, add B A, quantize again) picks a new grid and rounds each weight without regard for what the others
do. Here the grid stays the base's (bits, group size, g_idx, zero points; the scales too unless train_scales), and
each layer's codes are chosen by GPTQ's error feedback (feedback.py) against W_base + scaling B A, weighted by the
Hessian of the inputs that layer sees in the unmerged LoRA model on calibration text.

The LoRA is read out of the PeftModel (or out of its saved files) and applied to the quantized layers by forward
hooks, so any format works, compressed-tensors included, whose packed layers PEFT cannot wrap. Decoder blocks are
taken one at a time: their inputs are cached, the block runs with its LoRA while hooks add up its layers'
Hessians, its layers are merged, and its unmerged outputs feed the next block. Peak memory beyond the model: one
block's Hessians, one layer's work buffers and the calibration activations.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import formats
from ..blocks import capture_block_inputs, check_batches, decoder_layers
from ..feedback import add_to_hessian, merge_onto_grid
from ..guards import refuse_non_finite

logger = logging.getLogger(__name__)


class MergeRefused(ValueError):
    """merge_lora cannot merge this (not a LoRA, a DoRA, another model's LoRA, no calibration, ...); nothing was
    written. The message says what to do."""


@dataclass
class MergeReport:
    """What merge_lora did, measured on held-out calibration batches with the model it returned.

    loss_lora / loss_merged: mean next-token cross-entropy of the unmerged LoRA model and of the merged model;
    gap_pct: how much higher the merged loss is, in % (perplexity ratio - 1); top1_agreement_pct: share of positions
    where both predict the same next token; held_out: whether those batches were kept out of the Hessians.
    distill: the distillation's steps, first and last losses and codes moved (None without it).
    layers: per merged layer, its output error relative to the unmerged base's (1: the update is lost, 0: it is held
    exactly), that of nearest rounding, codes moved, scales changed and seconds.
    """

    loss_lora: float
    loss_merged: float
    loss_base: Optional[float]
    top1_agreement_pct: float
    held_out: bool
    eval_tokens: int
    calibration_tokens: int
    train_scales: bool
    seconds: float
    layers: dict = field(default_factory=dict)
    dense_layers: list = field(default_factory=list)
    distill: Optional[dict] = None

    @property
    def gap_pct(self) -> float:
        return 100.0 * (math.exp(self.loss_merged - self.loss_lora) - 1.0)

    def summary(self) -> str:
        moved = sum(r["codes_moved"] for r in self.layers.values())
        errors = [r["error"] for r in self.layers.values()]
        return (f"merge_lora: {len(self.layers)} quantized layers merged in {self.seconds:.1f} s, {moved:,} codes "
                f"moved; held-out loss {self.loss_merged:.4f} vs unmerged LoRA {self.loss_lora:.4f} "
                f"({self.gap_pct:+.2f}% perplexity), top-1 agreement {self.top1_agreement_pct:.1f}%; mean layer "
                f"output error {sum(errors) / max(len(errors), 1):.3f} of the update's"
                + ("" if self.held_out else " (scored on the calibration batches: too few to hold any out)"))


class _Factors:
    """One adapted layer's LoRA update(s): [(A [r, K], B [N, r], scaling)], as a forward hook or a weight delta."""

    def __init__(self):
        self.parts: list = []
        self.handle = None

    def delta(self) -> torch.Tensor:
        """sum of scaling * (B A)^T, float32 [K, N] (the formats' orientation)."""
        return sum((A.float().t() @ B.float().t()) * scaling for A, B, scaling in self.parts)

    def attach(self, module: nn.Module) -> None:
        """Make `module` compute base(x) + sum scaling * B A x: the unmerged LoRA model, as PEFT runs it."""
        def hook(mod, args, out):
            x = args[0]
            extra = sum((x.to(A.dtype) @ A.t() @ B.t()) * scaling for A, B, scaling in self.parts)
            return out + extra.to(out.dtype)
        self.handle = module.register_forward_hook(hook)

    def detach(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def _check_config(config, what: str) -> None:
    """Refuse a LoRA config whose update is not scaling * B A on a layer's weight."""
    get = (lambda k, d=None: config.get(k, d)) if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    if get("use_dora"):
        raise MergeRefused(f"{what} is a DoRA: its magnitude vector rescales whole weight columns, which this merge does "
                         "not model. Merge a plain LoRA.")
    if get("bias", "none") != "none" or get("lora_bias", False):
        raise MergeRefused(f"{what} trained biases (bias={get('bias')!r}, lora_bias={get('lora_bias', False)}): "
                         "merge_lora writes codes and scales only.")
    if get("use_qalora"):
        raise MergeRefused(f"{what} is a QA-LoRA (use_qalora): its A acts on pooled inputs; merge_lora merges a plain "
                         "LoRA.")
    if not isinstance(config, dict):
        return  # a live LoraConfig: PEFT checked it
    for key in ("r", "lora_alpha"):
        if key in config and not _number(config[key], integer=key == "r"):
            raise MergeRefused(f"{what}: adapter_config.json's {key} is {config[key]!r}, not a "
                               f"{'positive integer' if key == 'r' else 'finite number up to 1e6'}: the file is "
                               "damaged; save the adapter again.")
    for key, integer in (("alpha_pattern", False), ("rank_pattern", True)):
        pattern = config.get(key)
        if pattern is not None and not (isinstance(pattern, dict) and all(isinstance(k, str) and _number(v, integer)
                                                                        for k, v in pattern.items())):
            raise MergeRefused(f"{what}: adapter_config.json's {key} is {pattern!r}, not a map of layer name patterns "
                               f"to {'ranks' if integer else 'alphas'}: the file is damaged; save the adapter again.")


def _number(value, integer: bool) -> bool:
    """A LoRA rank (a positive integer) or alpha (a finite number, at most 1e6 in size), never a bool or a string."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if integer:
        return isinstance(value, int) and 0 < value < 2**20
    return math.isfinite(value) and abs(value) <= 1e6


def _from_peft(model: nn.Module) -> tuple[nn.Module, dict, dict, list]:
    """(base model, {layer name: _Factors} of its quantized layers, the adapter's config, dense layers merged by PEFT)
    from a PeftModel holding LoRA adapters; the PeftModel is unloaded (its LoRA on full-precision modules merged
    exactly by PEFT first)."""
    from peft.tuners.lora import LoraLayer

    names = list(model.active_adapters)  # their configs were checked by _check_peft
    layers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    if not layers:
        raise MergeRefused("the PeftModel holds no LoRA layer: nothing to merge.")
    factors, dense = {}, []
    for key, layer in layers.items():
        active = [a for a in names if a in layer.lora_A]
        for a in active:
            for part in (layer.lora_A[a].weight, layer.lora_B[a].weight):
                refuse_non_finite(part.detach(), f"LoRA {key} ({a})", "merge")
        if formats.dispatch(layer.get_base_layer(), key) is None:
            dense.append(key)
            continue
        f = factors[key] = _Factors()
        f.parts = [(layer.lora_A[a].weight.detach(), layer.lora_B[a].weight.detach(), float(layer.scaling[a]))
                   for a in active]
    for key in dense:  # full-precision modules (nn.Linear, embeddings): PEFT's own exact merge
        layers[key].merge(adapter_names=[a for a in names if a in layers[key].lora_A])
    config = model.peft_config[names[0]]
    return model.unload(), factors, {"r": config.r, "lora_alpha": config.lora_alpha, "adapters": names,
                                     "base_model": config.base_model_name_or_path}, dense


def _from_folder(model: nn.Module, folder) -> tuple[nn.Module, dict, dict, list]:
    """The same from a base model and the folder of a saved LoRA adapter (adapter_config.json and
    adapter_model.safetensors), read without PEFT wrapping the base: PEFT's LoRA cannot wrap every quantized layer
    (a packed compressed-tensors layer has no `.weight`)."""
    import json
    from pathlib import Path

    from peft.utils.other import get_pattern_key
    from safetensors.torch import load_file

    folder = Path(folder)
    config_file, weights_file = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise MergeRefused(f"{folder} is not a saved LoRA adapter: it needs adapter_config.json and "
                         "adapter_model.safetensors (what PeftModel.save_pretrained writes).")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if config.get("peft_type") != "LORA":
        raise MergeRefused(f"{folder} holds a {config.get('peft_type')} adapter, not a LoRA: merge_lora merges LoRA "
                        "adapters (a LoTA or L4Q adapter merges exactly with merge_and_unload()).")
    _check_config(config, f"the LoRA in {folder}")
    state = load_file(str(weights_file))
    prefixes = sorted({k.split(".lora_A.")[0] for k in state if ".lora_A." in k})
    if not prefixes:
        raise MergeRefused(f"{weights_file} holds no lora_A/lora_B tensors: it is not a LoRA's weights.")
    lora_keys = {f"{p}.lora_{x}.weight" for p in prefixes for x in "AB"}
    rest = sorted(set(state) - lora_keys)
    embedding = [k for k in rest if "lora_embedding" in k]
    if embedding:
        raise MergeRefused(f"the LoRA adapts embeddings ({embedding[0]}): merge it with PEFT "
                         "(PeftModel.from_pretrained, then merge_lora on that model).")
    params = dict(model.named_parameters())
    factors, dense = {}, []
    alpha, r0 = config.get("lora_alpha", 8), config.get("r", 8)
    for prefix in prefixes:
        name = prefix.removeprefix("base_model.model.")
        A, B = state.get(f"{prefix}.lora_A.weight"), state.get(f"{prefix}.lora_B.weight")
        try:
            module = model.get_submodule(name)
        except AttributeError:
            module = None
        if A is None or B is None or module is None:
            raise MergeRefused(f"the LoRA in {folder} adapts {name}, which this model does not have (or its file lacks "
                             "lora_A or lora_B): it was trained on another model. Give the base it was trained on "
                             f"(adapter_config.json names {config.get('base_model_name_or_path')!r}).")
        if (A.shape[1], B.shape[0]) != (module.in_features, module.out_features) or A.shape[0] != B.shape[1]:
            raise MergeRefused(f"the LoRA's {name} is [in {A.shape[1]}, out {B.shape[0]}], this model's layer is [in "
                             f"{module.in_features}, out {module.out_features}]: it was trained on another model.")
        for part, what in ((A, "lora_A"), (B, "lora_B")):
            refuse_non_finite(part, f"LoRA {name} ({what})", "merge")
        r = A.shape[0]
        alphas, ranks = config.get("alpha_pattern") or {}, config.get("rank_pattern") or {}
        a = alphas.get(get_pattern_key(alphas.keys(), name), alpha)
        scaling = a / math.sqrt(r) if config.get("use_rslora") else a / r
        r_said = ranks.get(get_pattern_key(ranks.keys(), name), r0)
        if r != r_said:  # the scaling would be computed from the wrong rank
            raise MergeRefused(f"the LoRA's {name} has rank {r} but adapter_config.json says r={r_said}: the file is "
                               "damaged; save the adapter again.")
        f = _Factors()
        device = next(iter(module.buffers()), next(module.parameters(), torch.empty(0))).device
        f.parts = [(A.to(device), B.to(device), scaling)]
        if formats.dispatch(module, name) is None:  # a full-precision layer: merged exactly below
            if not isinstance(module, nn.Linear):
                raise MergeRefused(f"the LoRA adapts {name}, a {type(module).__name__}: merge it with PEFT "
                                 "(PeftModel.from_pretrained, then merge_lora on that model).")
            dense.append((name, module, f))
        else:
            factors[name] = f
    copies = []  # modules_to_save: trained copies of whole modules, saved under the base's own names
    for key in rest:
        name = key.removeprefix("base_model.model.")
        if name not in params or params[name].shape != state[key].shape:
            raise MergeRefused(f"the adapter file holds {key}, which has no place in this model: it was trained on "
                             "another model.")
        copies.append((name, params[name], state[key]))
    with torch.no_grad():  # everything checked: now written
        for _, module, f in dense:
            module.weight += f.delta().t().to(module.weight)
        for _, param, value in copies:
            param.copy_(value)
    dense = [n for n, _, _ in dense] + [n for n, _, _ in copies]
    return model, factors, {"r": r0, "lora_alpha": alpha, "adapters": [folder.name],
                            "base_model": config.get("base_model_name_or_path")}, dense


def _tokenized(calibration, tokenizer, seq_len: int, batch_size: int) -> list[torch.Tensor]:
    """Texts turned into [batch, seq_len] blocks of the concatenated token stream (EOS between texts)."""
    if tokenizer is None:
        raise MergeRefused("merge_lora: calibration is text; pass the model's tokenizer too (tokenizer=...).")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream = [t for text in calibration for t in tokenizer(text, add_special_tokens=False)["input_ids"] + eos]
    n = len(stream) // seq_len
    if n == 0:
        raise MergeRefused(f"merge_lora: the calibration text holds {len(stream)} tokens, fewer than one block of "
                         f"{seq_len}: give more text (a few hundred thousand tokens is typical; 128 blocks of 512 "
                         "works well).")
    blocks = torch.tensor(stream[: n * seq_len]).view(n, seq_len)
    return list(blocks.split(batch_size))


def _calibration(model, calibration, tokenizer, seq_len, batch_size) -> list[torch.Tensor]:
    if isinstance(calibration, str):
        calibration = [calibration]
    if isinstance(calibration, torch.Tensor):
        calibration = list(calibration.split(batch_size)) if calibration.dim() == 2 else [calibration]
    if not calibration:
        raise MergeRefused("merge_lora needs calibration data: a list of input_ids batches [batch, seq], or texts and "
                         "tokenizer=. The Hessians that decide which codes move come from it.")
    if all(isinstance(c, str) for c in calibration):
        return _tokenized(calibration, tokenizer, seq_len, batch_size)
    batches = [c[None] if isinstance(c, torch.Tensor) and c.dim() == 1 else c for c in calibration]
    check_batches(model, batches)
    return batches


@torch.no_grad()
def _score(model, batches, device, teacher_top1=None):
    """(mean next-token loss, tokens, top-1 predictions per batch, agreement % with teacher_top1)."""
    total, tokens, top1, agree = 0.0, 0, [], 0
    for i, ids in enumerate(batches):
        ids = ids.to(device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        labels = ids[:, 1:]
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum"))
        tokens += labels.numel()
        pred = logits.argmax(-1).cpu()
        top1.append(pred)
        if teacher_top1 is not None:
            agree += int((pred == teacher_top1[i]).sum())
    return total / max(tokens, 1), tokens, top1, 100.0 * agree / max(tokens, 1)


class _Hessians:
    """Forward pre-hooks on a block's LoRA layers that add up H = sum x^T x of their inputs. Layers fed the very same
    tensor (q, k, v; gate, up) share one H: it is computed once."""

    def __init__(self, layers: dict):
        self.H, self.tokens, self.owner = {}, {}, {}
        self._last = (None, None)
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in layers.items()]

    def _hook(self, name):
        def hook(module, args):
            x = args[0]
            last_x, last_name = self._last
            if name not in self.owner:
                self.owner[name] = last_name if x is last_x else name
            owner = self.owner[name]
            if owner == name:
                if name not in self.H:
                    self.H[name] = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float32, device=x.device)
                    self.tokens[name] = 0
                self.tokens[name] += add_to_hessian(self.H[name], x)
            self._last = (x, owner)
        return hook

    def of(self, name: str) -> Optional[torch.Tensor]:
        owner = self.owner.get(name)
        if owner is None:
            return None
        return self.H[owner] / max(self.tokens[owner], 1)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self.H = [], {}


def merge_lora(model: nn.Module, calibration: Union[Sequence[torch.Tensor], Sequence[str], torch.Tensor, str], *,
               lora=None, tokenizer=None, train_scales: bool = True, rounds: int = 2, damp: float = 0.001,
               act_order: bool = True, distill_steps: int = 0, distill_lr: float = 3e-5, distill_top_k: int = 64,
               eval_batches: Optional[int] = None, seq_len: int = 512, batch_size: int = 4,
               progress: bool = True) -> nn.Module:
    """Merge a LoRA into a quantized model's own grid (codes by GPTQ error feedback); return the merged model.

    Args:
        model: a PeftModel holding LoRA adapters (the active ones are merged) on a GPTQ, AWQ or LLM.int8 model loaded
            with a layout-keeping kernel (peft_lota.load_model); or, with `lora`, the quantized model itself (any
            format, compressed-tensors included: PEFT cannot wrap its packed layers, this route does not need to).
            Merged in place: its quantized layers are rewritten and the LoRA removed, as merge_and_unload does.
        calibration: a list of input_ids batches [batch, seq] (or one [n, seq] tensor), or texts with `tokenizer`
            (cut into [batch_size, seq_len] blocks). Text like the LoRA's training data is best.
        lora: the folder of a saved LoRA adapter (adapter_config.json, adapter_model.safetensors), when `model` is
            the base model.
        train_scales: also refit each group's scale (in the stored dtype, exactly what the merged model computes
            with), alternating with the codes `rounds` times; zero points, bits, group size and g_idx never change.
            On by default: it held more of the update in every benchmark cell (False keeps the base's scales).
        distill_steps: then fine-tune the merged model's codes and scales exactly (LoTA's defaults: ternary code
            moves and trained scales, AdamW at distill_lr) for this many steps over the calibration batches, so that
            its next-token distribution matches the unmerged LoRA model's (cross-entropy against the LoRA's top
            distill_top_k probabilities, recorded before merging); merged exactly again at the end.
        damp: the Hessian's damping (fraction of its mean diagonal). GPTQ's usual 0.01 is for rounding from full
            precision; here the target sits close to the grid, and 0.001 held more of the update (benchmark pilot).
        act_order: round the most active input rows first (only the order of work; g_idx is kept).
        eval_batches: how many of the calibration batches (the last ones) are held out to score the merge; default
            one in eight (at least one) when there are two batches or more.

    Returns the merged transformers model: its `save_pretrained` writes a standard checkpoint in the base's format
    (peft_lota's export), and `model.merge_lora_report` (MergeReport) says how close it is to the unmerged LoRA,
    scored with this very model. LoRA on full-precision modules (nn.Linear, embeddings) is merged exactly as is.
    Everything that can be refused (not a LoRA, DoRA, NaN, another model's LoRA, bad calibration) is refused before
    any weight is written.
    """
    from peft import PeftModel

    started = time.time()
    if lora is None and not isinstance(model, PeftModel):
        raise MergeRefused("merge_lora needs a PeftModel with a LoRA adapter on a quantized model, or the quantized model "
                        "and the folder of a saved LoRA: merge_lora(model, calibration, lora='path/to/lora').")
    if lora is not None and isinstance(model, PeftModel):
        raise MergeRefused("merge_lora: pass either a PeftModel, or a base model with lora=<folder>, not both.")
    base = model.get_base_model() if lora is None else model
    if formats.model_format(base) is None and not any(formats.is_quantized_layer(m) for m in base.modules()):
        raise MergeRefused(f"merge_lora merges into a quantized model ({formats.format_list()}); this one is full "
                           "precision: use PEFT's merge_and_unload().")
    batches = _calibration(base, calibration, tokenizer, seq_len, batch_size)
    if eval_batches is None:
        eval_batches = max(1, len(batches) // 8) if len(batches) >= 2 else 0
    if not 0 <= eval_batches < len(batches):
        raise MergeRefused(f"merge_lora: eval_batches={eval_batches}, but there are {len(batches)} calibration batches: "
                         "at least one must be left for the Hessians.")
    if distill_steps < 0 or not (distill_lr > 0 and math.isfinite(distill_lr)) or distill_top_k < 1:
        raise MergeRefused(f"merge_lora: distill_steps must be >= 0, distill_lr a positive number and distill_top_k "
                           f">= 1 (got {distill_steps}, {distill_lr}, {distill_top_k}).")
    blocks = decoder_layers(base)
    formats.prepare_model(base)  # layout-keeping kernels, v2 zeros, compressed layers kept packed
    if lora is None:
        _check_peft(model)
    model, factors, info, dense = _from_peft(model) if lora is None else _from_folder(model, lora)
    block_layers = _layers_by_block(model, factors, blocks)
    held_out = eval_batches > 0
    calib, evals = (batches[:-eval_batches], batches[-eval_batches:]) if held_out else (batches, batches)
    device = next(p for p in model.parameters()).device
    was_training = model.training
    model.eval()

    loss_base = _score(model, evals, device)[0]
    for n, f in factors.items():  # from here the model computes the unmerged LoRA model, until each layer is merged
        f.attach(model.get_submodule(n))
    try:
        loss_lora, tokens, teacher, _ = _score(model, evals, device)
        targets = _top_k(model, calib, device, distill_top_k) if distill_steps else None
        inputs = capture_block_inputs(model, blocks, calib, device)
        report_layers = _merge_blocks(blocks, block_layers, factors, inputs, progress, train_scales=train_scales,
                                      rounds=rounds, damp=damp, act_order=act_order)
        del inputs
    finally:
        for f in factors.values():
            f.detach()
    distilled = _distill(model, sorted(factors), calib, targets, distill_steps, distill_lr, device, progress) \
        if distill_steps else None
    from ..export import attach_export

    attach_export(model, _card_info(info, train_scales, distill_steps))
    loss_merged, _, _, agreement = _score(model, evals, device, teacher)
    model.train(was_training)
    report = MergeReport(loss_lora=loss_lora, loss_merged=loss_merged, loss_base=loss_base,
                         top1_agreement_pct=agreement, held_out=held_out, eval_tokens=tokens,
                         calibration_tokens=sum(int(b.numel()) for b in calib), train_scales=train_scales,
                         seconds=round(time.time() - started, 1), layers=report_layers, dense_layers=dense,
                         distill=distilled)
    model.merge_lora_report = report
    logger.info(report.summary())
    return model


def _layers_by_block(model: nn.Module, factors: dict, blocks) -> dict:
    """{decoder block index: {name: module}} of the layers to merge; one outside every block is refused."""
    block_of = {id(m): i for i, b in enumerate(blocks) for m in b.modules()}
    block_layers = {}
    for n in factors:
        module = model.get_submodule(n)
        block_layers.setdefault(block_of.get(id(module)), {})[n] = module
    stray = sorted(block_layers.get(None, {}))
    if stray:
        raise MergeRefused(f"merge_lora merges quantized layers inside the decoder blocks; {stray[0]} is outside them. "
                           "Leave it out of the LoRA's target_modules.")
    return block_layers


@torch.no_grad()
def _merge_blocks(blocks, block_layers: dict, factors: dict, inputs: list, progress: bool, **settings) -> dict:
    """Block by block: run the unmerged LoRA block on its cached inputs (its layers' Hessians add up on the way), merge
    its layers, and hand its unmerged outputs to the next block. Returns each layer's report."""
    report_layers = {}
    bar = tqdm(list(enumerate(blocks)), desc="merge_lora", disable=not progress, unit="block")
    for i, block in bar:
        own = block_layers.get(i, {})
        hessians = _Hessians(own)
        try:
            outputs = []
            for h, a, kw in inputs:  # the unmerged LoRA block: its layers' inputs and its outputs
                out = block(h, *a, **kw)
                outputs.append(out[0] if isinstance(out, tuple) else out)
            H = {n: hessians.of(n) for n in own}
        finally:
            hessians.close()
        for n, module in own.items():
            if H[n] is None:
                raise RuntimeError(f"merge_lora: {n} saw no input while its block ran; is it used by the model?")
            t0 = time.time()
            factors[n].detach()
            report_layers[n] = _merge_layer(formats.dispatch(module, n), factors[n].delta(), H.pop(n), key=n,
                                            **settings)
            report_layers[n]["seconds"] = round(time.time() - t0, 3)
        inputs[:] = [(o, a, kw) for o, (_, a, kw) in zip(outputs, inputs)]
        bar.set_postfix(layers=len(report_layers))
    return report_layers


@torch.no_grad()
def _top_k(model, batches, device, k: int) -> list:
    """[(probabilities, token ids)] of the model's k most likely next tokens at every position of each batch."""
    out = []
    for ids in batches:
        probs = torch.softmax(model(input_ids=ids.to(device)).logits.float(), -1)
        values, index = probs.topk(min(k, probs.shape[-1]), dim=-1)
        out.append((values.to(torch.float16), index.to(torch.int32)))
    return out


def _distill(model, targets: list, batches, teacher: list, steps: int, lr: float, device, progress: bool) -> dict:
    """LoTA on the merged layers, trained to match the teacher's next-token distribution, then merged exactly."""
    from peft import get_peft_model

    from ..lota.config import LotaConfig
    from ..lota.layer import LotaLayer

    peft = get_peft_model(model, LotaConfig(target_modules=targets, init_seed=0))
    peft.train()
    params = [p for p in peft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    for step in tqdm(range(steps), desc="merge_lora distill", disable=not progress):
        i = step % len(batches)
        probs, index = teacher[i]
        logp = torch.log_softmax(peft(input_ids=batches[i].to(device)).logits.float(), -1).gather(-1, index.long())
        # KL over the teacher's top k and the rest of the vocabulary as one more outcome: top k alone would reward
        # a student more confident than its teacher
        p_rest = (1 - probs.float().sum(-1)).clamp_min(0)
        q_rest = (1 - logp.exp().sum(-1)).clamp_min(1e-6)
        loss = -((probs.float() * logp).sum(-1) + p_rest * q_rest.log()).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(float(loss), 5))
    peft.eval()
    deltas = [m.get_delta_codes(m.active_adapters[0]) for m in peft.modules() if isinstance(m, LotaLayer)]
    moved = sum(int((d != 0).sum()) for d in deltas if d is not None)
    peft.merge_and_unload()  # in place: `model` holds the merged codes and scales
    return {"steps": steps, "lr": lr, "first_loss": losses[0], "last_loss": losses[-1], "codes_moved": moved}


def _check_peft(model) -> None:
    """What _from_peft refuses, checked before it changes anything (it merges dense layers and unloads)."""
    from peft.tuners.lora import LoraConfig

    for name in model.active_adapters:
        config = model.peft_config.get(name)
        if not isinstance(config, LoraConfig):
            raise MergeRefused(f"adapter {name!r} is a {type(config).__name__}, not a LoRA: merge_lora merges LoRA "
                            "adapters (a LoTA or L4Q adapter merges exactly with merge_and_unload()).")
        _check_config(config, f"adapter {name!r}")


def _merge_layer(quant, delta: torch.Tensor, H: torch.Tensor, *, key: str, **options) -> dict:
    """Write the merged codes (and scales) of one quantized layer: base weight + delta on its grid; its report."""
    state = quant.read()
    if options.get("train_scales") and not quant.trains_scales:  # (GGUF K-quants: scales are not free values)
        options = {**options, "train_scales": False}
    target = state.weight().float() + delta.to(state.scales.device)
    if state.offsets is not None:  # w = s * (q - z) + m: the codes hold the target less the block's offset
        target = target - state.offsets[state.g_idx]
    codes, scales, report = merge_onto_grid(target, state.codes, state.zeros, state.scales, state.g_idx, state.maxq,
                                            H.to(target.device), **options)
    if scales.dtype != state.scale_dtype:  # refit scales as the checkpoint stores them (GGUF: fp16 under float32 maths)
        scales = scales.to(state.scale_dtype).to(scales.dtype)
    refuse_non_finite(scales, f"{key}: the scales the merge would write", "merge")
    quant.restore(quant.encode(codes, state.zeros, scales if options.get("train_scales") else None))
    written = quant.read()  # what the saved checkpoint will hold: checked, not assumed
    # Scales come back as the format stores them: bit for bit where it stores them as given (fp16), within a unit in
    # the last place where it stores something they derive from (LLM.int8 keeps SCB = 127 s in float32).
    same_scales = torch.allclose(written.scales.float(), scales.float(), rtol=1e-6, atol=0)
    if not (torch.equal(written.codes, codes) and same_scales
            and torch.equal(written.zeros.to(torch.int32), state.zeros.to(torch.int32))):
        raise RuntimeError(f"merge_lora: {key} does not read back the codes and scales just written.")
    return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in report.items()}


def _card_info(info: dict, train_scales: bool, distill_steps: int = 0) -> dict:
    return {
        "base_model": info.get("base_model"), "method": "LoRA, merged by peft_lota.merge_lora", "method_tag": "lora",
        "method_url": "https://arxiv.org/abs/2106.09685",
        "summary": "A LoRA trained on the quantized model was merged into its own grid: each layer's integer codes "
                   "were chosen with GPTQ's error feedback against the base weights plus the LoRA update, weighted "
                   "by the layer's input statistics on calibration text"
                   + (", and each group's scale refit" if train_scales else "; zero points are the base's")
                   + (f"; then {distill_steps} steps of exact fine-tuning (LoTA) distilled the unmerged LoRA model's "
                      "next-token distribution into it." if distill_steps else "."),
        "settings": {"LoRA rank r": info.get("r"), "LoRA lora_alpha": info.get("lora_alpha"),
                     "adapters": ", ".join(map(str, info.get("adapters", []))), "trained scales": train_scales,
                     "distillation steps": distill_steps},
    }
