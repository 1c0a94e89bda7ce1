"""Block-wise activation-preserving calibration (ApiQ, arXiv 2402.05147) with saliency-aware regularisation
(arXiv 2504.13932), on L4Q layers, ending in an exactly merged GPTQ model.

For each decoder block in order: cache the full-precision block's outputs on the full-precision inputs;
train the block's L4Q layers (the quantizer's scales and a LoRA) so that the quantized block, fed the inputs
that come out of the already-quantized blocks before it, reproduces those outputs (MSE); then freeze the block
and pass its quantized outputs on, so errors do not pile up. Optionally a regulariser keeps the most salient
weights close to their full-precision values: lambda_reg * sum(G^2 * (W_q - W)^2), with G^2 the squared
gradient of the language-model loss on the calibration data (computed once, before calibration).

The calibrated model is an L4Q model: merged, it is a standard GPTQ checkpoint whose weights are exactly what
was calibrated; unmerged, it is the starting point of an L4Q fine-tuning run.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..blocks import capture_block_inputs, check_batches, decoder_layers  # noqa: F401  (decoder_layers: re-exported)
from ..l4q.config import L4QConfig
from ..l4q.layer import L4QLayer
from ..l4q.quantizer import fake_quantized_weight

logger = logging.getLogger(__name__)

STAGES = ("weights", "mixed", "outputs")  # the saliency paper's order: regulariser only, both, MSE only


@dataclass
class BlockReport:
    """One block's calibration: output MSE against the full-precision block before and after, and time."""

    index: int
    mse_before: float
    mse_after: float
    seconds: float
    stage_losses: dict = field(default_factory=dict)


def saliency(model: nn.Module, batches: Sequence[torch.Tensor], device) -> dict[str, torch.Tensor]:
    """G^2: the squared gradient of the language-model loss w.r.t. each decoder nn.Linear weight, averaged over
    the calibration batches ({module name: tensor like the weight}). Needs the full-precision model."""
    layers = decoder_layers(model)
    linears = {n: m for n, m in layers.named_modules() if isinstance(m, nn.Linear)}
    flags = {n: m.weight.requires_grad for n, m in linears.items()}
    for m in linears.values():
        m.weight.requires_grad_(True)
    squares = {n: torch.zeros_like(m.weight, dtype=torch.float32) for n, m in linears.items()}
    try:
        for ids in tqdm(batches, desc="saliency (squared gradients)", leave=False):
            ids = ids.to(device)
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()
            for n, m in linears.items():
                squares[n].add_(m.weight.grad.float().square())
    finally:
        for n, m in linears.items():
            m.weight.grad = None
            m.weight.requires_grad_(flags[n])
    return {n: s / max(len(batches), 1) for n, s in squares.items()}


def _block_mse(block, inputs, targets) -> float:
    with torch.no_grad():
        total = sum(float(torch.nn.functional.mse_loss(block(h, *a, **kw).float(), t.float()))
                    for (h, a, kw), t in zip(inputs, targets))
    return total / max(len(inputs), 1)


def calibrate(model: nn.Module, batches: Sequence[torch.Tensor], *, bits: int = 2, group_size: int = 128,
              sym: bool = False, r: int = 64, lora_alpha: Optional[float] = None, epochs: int = 10,
              lr: float = 1e-3, scale_lr: float = 5e-3, weight_decay: float = 0.0,
              saliency_reg: bool = False, lambda_reg: float = 1.0, stages: Optional[Sequence[str]] = None,
              merge: bool = True, target_modules="all-linear", progress: bool = True,
              on_block: Optional[Callable[[BlockReport], None]] = None, seed: int = 0):
    """Calibrate a full-precision causal LM block by block into a `bits`-bit GPTQ model (ApiQ, optional saliency).

    Args:
        model: a full-precision transformers causal LM (it becomes the calibrated model: its linear layers are
            wrapped, then replaced by GPTQ layers on merge).
        batches: calibration token batches, a list of `input_ids` tensors [batch, seq].
        bits, group_size, sym: the GPTQ grid to produce (L4Q's initialisation, then calibrated).
        r, lora_alpha: the LoRA inside each layer's quantizer (lora_alpha defaults to r).
        epochs: passes over the calibration batches per block (per stage, with saliency).
        lr, scale_lr: AdamW learning rates of the LoRA factors and of the scales (ApiQ trains the clipping
            parameters ten times faster than the LoRA).
        saliency_reg: add lambda_reg * sum(G^2 (W_q - W)^2) over the block's layers; `stages` then defaults to
            ("weights", "mixed", "outputs"): the regulariser alone, then with the output MSE, then the MSE alone.
        merge: return the merged GPTQ model (its save_pretrained writes a standard GPTQ checkpoint); False
            returns the calibrated L4Q PeftModel, unmerged, to fine-tune further.
        on_block: called with each block's BlockReport (progress, MSE before and after).

    The model is calibrated in place, on the device its parameters are on; the calibration set's activations
    are kept on that device between blocks (one block trains at a time). If it fails (or is interrupted), the
    model is put back as it was.
    """
    stages = _check_stages(stages, saliency_reg)
    check_batches(model, batches)
    with _restored_on_failure(model):  # an error or an interrupt: the model is given back as it was
        from peft import get_peft_model

        device = next(model.parameters()).device
        torch.manual_seed(seed)
        was_training = model.training
        model.eval()
        G2 = saliency(model, batches, device) if saliency_reg else {}

        peft = get_peft_model(model, L4QConfig(r=r, lora_alpha=lora_alpha or r, bits=bits, group_size=group_size,
                                               sym=sym, target_modules=target_modules, init_seed=seed))
        peft.requires_grad_(False)
        layers = decoder_layers(peft)
        with peft.disable_adapter():
            inputs = capture_block_inputs(peft, layers, batches, device)
        fp_inputs = [h for h, _, _ in inputs]
        q_inputs = list(fp_inputs)
        blocks = tqdm(list(enumerate(layers)), desc="calibrating blocks", disable=not progress)
        for i, block in blocks:
            t0 = time.time()
            with torch.no_grad(), peft.disable_adapter():  # the full-precision block on full-precision inputs
                targets = [block(h, *a, **kw) for h, (_, a, kw) in zip(fp_inputs, inputs)]
            q_in = [(h, a, kw) for h, (_, a, kw) in zip(q_inputs, inputs)]
            l4q = {n: m for n, m in block.named_modules() if isinstance(m, L4QLayer)}
            trained, opt = _block_optimizer(l4q, lr, scale_lr, weight_decay)
            before = _block_mse(block, q_in, targets)
            index = {n: f"{i}.{n}" for n in l4q}  # names in `saliency`'s map: relative to the list of blocks
            losses = _train_block(block, l4q, opt, q_in, targets, stages, epochs, lambda_reg, G2, index)
            for p in trained:
                p.requires_grad_(False)
            after = _block_mse(block, q_in, targets)
            with torch.no_grad():  # the next block sees what this quantized block makes of the quantized inputs
                q_inputs = [block(h, *a, **kw) for h, a, kw in q_in]
            fp_inputs = targets
            report = BlockReport(i, before, after, round(time.time() - t0, 2),
                                 {s: [round(v, 6) for v in vals] for s, vals in losses.items()})
            blocks.set_postfix(mse=f"{before:.3g}->{after:.3g}")
            logger.info("block %d: output MSE %.4g -> %.4g (%.1f s)", i, before, after, report.seconds)
            if on_block is not None:
                on_block(report)
        model.train(was_training)
        return peft.merge_and_unload() if merge else peft


def _check_stages(stages: Optional[Sequence[str]], saliency_reg: bool) -> tuple[str, ...]:
    """The stages to run (default: all three with saliency, else the output MSE alone); refuses unknown ones."""
    stages = tuple(stages) if stages is not None else (STAGES if saliency_reg else ("outputs",))
    bad = [s for s in stages if s not in STAGES]
    if bad or (not saliency_reg and set(stages) != {"outputs"}):
        raise ValueError(f"calibrate: stages must be among {STAGES}, and 'weights'/'mixed' need saliency_reg=True; "
                         f"got {stages}.")
    return stages


def _block_optimizer(l4q: dict[str, L4QLayer], lr: float, scale_lr: float, weight_decay: float):
    """(trained tensors, AdamW) of one block: its layers' LoRA factors and scales (ApiQ: the scales at their own,
    faster rate), their gradients turned on."""
    factors = [p for m in l4q.values() for p in (m.l4q_A["default"], m.l4q_B["default"])]
    scales = [m.l4q_scales["default"] for m in l4q.values() if "default" in m.l4q_scales]
    for p in factors + scales:
        p.requires_grad_(True)
    opt = torch.optim.AdamW([{"params": factors, "lr": lr}, {"params": scales, "lr": scale_lr}],
                            weight_decay=weight_decay)
    return factors + scales, opt


def _train_block(block: nn.Module, l4q: dict[str, L4QLayer], opt: torch.optim.Optimizer, q_in: list, targets: list,
                 stages: Sequence[str], epochs: int, lambda_reg: float, G2: dict[str, torch.Tensor],
                 index: dict[str, str]) -> dict[str, list[float]]:
    """Each stage's epochs over the block's inputs, one step per batch; {stage: mean loss of each epoch}.

    The loss: the output MSE against the full-precision block ("outputs"), the saliency penalty ("weights"), or
    both ("mixed")."""
    losses = {}
    for stage in stages:
        for _ in range(epochs):
            total = 0.0
            for (h, a, kw), target in zip(q_in, targets):
                loss = h.new_zeros((), dtype=torch.float32)
                if stage != "weights":
                    loss = loss + torch.nn.functional.mse_loss(block(h, *a, **kw).float(), target.float())
                if stage != "outputs":
                    loss = loss + lambda_reg * _saliency_penalty(l4q, G2, index)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                total += loss.item()
            losses.setdefault(stage, []).append(total / len(q_in))
    return losses


@contextmanager
def _restored_on_failure(model: nn.Module):
    """Puts back the modules, attributes, gradients, requires_grad flags, modes and config of `model` if the body
    raises."""
    children = [(m, dict(m._modules), set(vars(m)), m.training) for m in model.modules()]
    params = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    config = getattr(model, "config", None)
    settings = dict(vars(config)) if config is not None else None  # a merge adds its quantization_config
    try:
        yield
    except BaseException:
        if config is not None:
            vars(config).clear()
            vars(config).update(settings)
        for module, kids, attrs, mode in children:  # the layers PEFT wrapped or a merge replaced, and modes
            module._modules.clear()
            module._modules.update(kids)
            for extra in set(vars(module)) - attrs:  # e.g. PEFT's peft_config
                delattr(module, extra)
            module.training = mode
        for p, flag, grad in params:
            p.requires_grad_(flag)
            p.grad = grad
        raise


def _saliency_penalty(l4q: dict[str, L4QLayer], G2: dict[str, torch.Tensor], index: dict[str, str]) -> torch.Tensor:
    """sum over the block's layers of G^2 * (W_q - W)^2, W_q the quantized weight with the LoRA (differentiable)."""
    total = None
    for name, layer in l4q.items():
        g2 = G2.get(index[name])
        if g2 is None:
            continue
        grid = layer.grid()
        scales = layer.scales("default", grid)
        W_q = fake_quantized_weight(grid, layer.l4q_A["default"], layer.l4q_B["default"],
                                    layer.settings["default"].scaling, scales)  # [K, N]
        W = layer.base_layer.weight.float()  # [N, K]
        term = (g2 * (W_q.t() - W).square()).sum()
        total = term if total is None else total + term
    return total if total is not None else torch.zeros(())
