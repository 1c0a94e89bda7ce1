"""t-SignSGD for LoTA's ternary tensors, one combined optimizer for a LoTA model, and a Trainer callback.

`TSignSGD` implements the paper's t-SignSGD (LoTA-QAF, arXiv 2505.18724). Per ternary tensor `p` with
gradient `g`, at step t:

    sigma_t = quantile_lower(|g|, q_t)      # an element of |g|: the k-th smallest, k = floor(q_t * (n-1))
    m       = |g| > max(sigma_t, tau)
    p      <- clip(p - sign(g) * m, -1, 1)

Schedule (`tsign_quantile`): with `t` the number of steps already taken (0 for the first step) and `T`
the announced number of steps, `u = min(t / max(T - 1, 1), 1)`. Then
`q = q_start + (q_mid - q_start) * u / split` for `u <= split`, and
`q = q_end - (q_end - q_mid) * (1 - u) / (1 - split)` after: the first step uses `q_start`, the
step at `u == split` uses `q_mid`, the last announced step (`t = T - 1`) and any step past it use
`q_end`. The outlier guard is active when `u > split`, i.e. in the last (1 - split) of the steps
(exactly the released code's last 20% for split=0.8).

Usage: `Trainer(..., optimizers=(create_lota_optimizer(model), None), callbacks=[LotaCallback()])`;
in a plain PyTorch loop, pass `total_steps=` instead of the callback.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

import torch
from transformers import TrainingArguments

from ..tuner import NonFiniteCallback
from .ternary import is_ternary

logger = logging.getLogger(__name__)

__all__ = ["TSignSGD", "LotaOptimizer", "create_lota_optimizer", "LotaCallback", "tsign_quantile"]

# Full parameter names of LoTA tensors end in `lota_A.<adapter>` / `lota_B.<adapter>` (ParameterDicts).
_LOTA_PARAM = re.compile(r"(^|\.)lota_[AB]\.[^.]+$")


def tsign_quantile(step: int, total_steps: int, q_start: float, q_mid: float, q_end: float, split: float) -> float:
    """q_t of the two-phase linear schedule; `step` counts completed steps (0 for the first step).

    Computed in Python floats (float64), so it is the same on every device and every run.
    """
    u = min(step / max(total_steps - 1, 1), 1.0)
    if u <= split:
        return q_start + (q_mid - q_start) * (u / split if split > 0 else 1.0)
    return q_end - (q_end - q_mid) * (1.0 - u) / (1.0 - split)  # exactly q_end at u = 1


def _guard_phase(step: int, total_steps: int, split: float) -> bool:
    return min(step / max(total_steps - 1, 1), 1.0) > split


def _lower_quantile(a: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile(a, q, interpolation="lower") for a flat tensor of any size, as a 0-dim tensor.

    kthvalue is a selection (O(n), no sort) and has no size limit. The rank k = floor(q * (n - 1)) is
    computed in float64, like torch.quantile on a float64 input; torch.quantile on a float32 input
    computes it in float32 and can land one rank lower when q * (n - 1) is an integer (0.95 * 20).
    Thresholding with `a > lower` selects exactly the same entries as thresholding with the default
    "linear" quantile (the released code): no element lies strictly between two adjacent order
    statistics, so `a > interpolated` <=> `a >= upper neighbour` <=> `a > lower neighbour`.
    """
    k = min(max(math.floor(q * (a.numel() - 1)), 0), a.numel() - 1)
    return a.kthvalue(k + 1).values


class TSignSGD(torch.optim.Optimizer):
    """Ternary sign SGD (LoTA-QAF): moves each ternary entry by at most one step in {-1, 0, 1}.

    Give it only tensors whose values are in {-1, 0, 1} (checked once, at the first step). There is
    no learning rate and, as in the paper, no momentum unless `momentum` > 0 (then the sign and the
    quantile are taken on an exponential average of the gradients); `lr` is accepted and ignored, and exists only because LR
    schedulers (Trainer builds one) require an 'lr' key in every param group. Its nominal value 1.0
    is the size of the step actually taken.

    Outlier guard (released code, late phase only): when the global gradient norm exceeds
    `guard_norm`, entries above `quantile_lower(|g|, guard_quantile)` are skipped as well (the released
    `|g| < quantile_linear` keeps the same entries unless that rank is an integer).

    The threshold is computed in the gradient's own dtype (fp32, bf16 or fp16): it is an element of
    |g|, so comparisons are exact; `tau` is rounded to that dtype. The outlier guard's global norm
    (over all of this optimizer's gradients) is accumulated in float32.

    The schedule needs `total_steps` (the real number of optimizer steps): give it here, or later
    via `set_total_steps` (LotaCallback does it from Trainer's `state.max_steps`). The step count
    and schedule live in each param group, so `state_dict()`/`load_state_dict()` resume exactly.
    A step skipped by fp16 loss scaling does not advance the schedule.
    """

    def __init__(
        self,
        params,
        total_steps: int | None = None,
        q_start: float = 0.95,
        q_mid: float = 0.999,
        q_end: float = 0.9999,
        split: float = 0.8,
        tau: float = 1e-9,
        outlier_guard: bool = True,
        guard_norm: float = 10.0,
        guard_quantile: float = 0.99995,
        lr: float = 1.0,
        momentum: float = 0.0,
    ):
        fractions = dict(q_start=q_start, q_mid=q_mid, q_end=q_end, split=split, guard_quantile=guard_quantile,
                         momentum=momentum)
        for name, v in fractions.items():
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if total_steps is not None:
            total_steps = self._check_total_steps(total_steps)
        defaults = dict(
            lr=lr, total_steps=total_steps, step=0, q_start=q_start, q_mid=q_mid, q_end=q_end, split=split,
            tau=tau, outlier_guard=outlier_guard, guard_norm=guard_norm, guard_quantile=guard_quantile,
            momentum=momentum,
        )  # fmt: skip
        super().__init__(params, defaults)
        self._checked_ternary = False

    @staticmethod
    def _check_total_steps(total_steps) -> int:
        if int(total_steps) != total_steps or total_steps < 1:
            raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
        return int(total_steps)

    def set_total_steps(self, total_steps: int) -> None:
        """Set the schedule length T (real number of optimizer steps of the run)."""
        total_steps = self._check_total_steps(total_steps)
        for group in self.param_groups:
            group["total_steps"] = total_steps

    def _check_ternary(self) -> None:
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if not is_ternary(p):
                    names = group.get("param_names")
                    what = names[pi] if names else f"param {pi} of group {gi} (shape {tuple(p.shape)})"
                    raise ValueError(f"TSignSGD only updates ternary tensors; {what} has values not in {{-1, 0, 1}}")
        self._checked_ternary = True

    def _creating_state(self) -> bool:
        """torch.distributed.checkpoint (FSDP2's and accelerate's save and resume) creates the state of an optimizer
        whose state is empty by one step on zero gradients at learning rate 0. Such a step moves nothing, and must
        not advance the schedule either (a resumed run would no longer match an uninterrupted one): create the state
        a step would (the momentum average, which the checkpoint then loads into) and return True."""
        if any(float(g["lr"]) != 0.0 for g in self.param_groups):
            return False
        if any(p.grad is None or torch.count_nonzero(p.grad) for g in self.param_groups for p in g["params"]):
            return False
        for group in self.param_groups:
            for p in group["params"] if group.get("momentum", 0.0) else ():
                self.state[p].setdefault("exp_avg", torch.zeros_like(p, dtype=torch.float32))
        return True

    def _global_grad_norm(self) -> float:
        norms = [
            torch.linalg.vector_norm(p.grad, dtype=torch.float32)
            for group in self.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        return torch.linalg.vector_norm(torch.stack(norms)).item() if norms else 0.0

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._creating_state():
            return loss
        if not self._checked_ternary:
            self._check_ternary()

        grad_norm = None  # computed lazily: only the late phase with the guard on needs it (one sync)
        for group in self.param_groups:
            t, T = group["step"], group["total_steps"]
            if T is None:
                raise RuntimeError(
                    "TSignSGD needs the run length for its schedule: pass total_steps=..., call "
                    "optimizer.set_total_steps(T), or add peft_lota.LotaCallback() to the Trainer's callbacks."
                )
            q = tsign_quantile(t, T, group["q_start"], group["q_mid"], group["q_end"], group["split"])
            guard = group["outlier_guard"] and _guard_phase(t, T, group["split"])
            if guard:
                if grad_norm is None:
                    grad_norm = self._global_grad_norm()
                guard = grad_norm > group["guard_norm"]

            for p in group["params"]:
                g = p.grad
                if g is None or g.numel() == 0:
                    continue
                if g.is_sparse:
                    raise RuntimeError("TSignSGD does not support sparse gradients")
                beta = group.get("momentum", 0.0)
                if beta:  # the sign and the threshold of an average of the gradients (not in the paper)
                    avg = self.state[p].get("exp_avg")
                    if avg is None:
                        avg = self.state[p]["exp_avg"] = torch.zeros_like(g, dtype=torch.float32)
                    g = avg.mul_(beta).add_(g.float(), alpha=1 - beta)
                a = g.abs().reshape(-1)
                mask = a > _lower_quantile(a, q).clamp_min(group["tau"])
                if guard:  # skip the few largest entries: an abnormal gradient must not reshape the adapter
                    mask &= a <= _lower_quantile(a, group["guard_quantile"])
                p.sub_(g.sign().mul_(mask.view_as(g))).clamp_(-1, 1)
            group["step"] = t + 1
        return loss


class LotaOptimizer(torch.optim.Optimizer):
    """One optimizer made of a TSignSGD (LoTA tensors) and an ordinary optimizer (other parameters).

    `param_groups` are the inner optimizers' own group dicts (the other optimizer's first, so
    Trainer logs its learning rate), so an LR scheduler edits the real groups, and `state` is one
    dict shared with the inner optimizers (their parameters are disjoint). `state_dict()` is torch's;
    `load_state_dict()` hands each inner optimizer its slice, so each applies its own loading rules.
    """

    def __init__(self, ternary: TSignSGD, other: torch.optim.Optimizer | None = None):
        self.ternary, self.other = ternary, other
        self.optimizers = [o for o in (other, ternary) if o is not None]
        super().__init__([g for o in self.optimizers for g in o.param_groups], {})
        self._link()

    def _link(self) -> None:
        self.param_groups = [g for o in self.optimizers for g in o.param_groups]
        self.state = self.optimizers[0].state
        for o in self.optimizers[1:]:
            self.state.update(o.state)
        for o in self.optimizers:
            o.state = self.state

    def set_total_steps(self, total_steps: int) -> None:
        self.ternary.set_total_steps(total_steps)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for o in self.optimizers:
            o.step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_groups, start = state_dict["param_groups"], 0
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        for o in self.optimizers:
            groups = saved_groups[start : start + len(o.param_groups)]
            start += len(o.param_groups)
            ids = {i for g in groups for i in g["params"]}
            state = {k: v for k, v in state_dict["state"].items() if k in ids}
            o.load_state_dict({"state": state, "param_groups": groups})
        self._link()


def create_lota_optimizer(
    model: torch.nn.Module,
    ternary_kwargs: dict | None = None,
    other_optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    other_kwargs: dict | None = None,
    total_steps: int | None = None,
) -> LotaOptimizer:
    """TSignSGD for the LoTA tensors (`...lota_A.<adapter>`, `...lota_B.<adapter>`) of `model`, and
    `other_optimizer_cls` (default AdamW, lr 2e-4) for any other trainable parameter (e.g.
    `modules_to_save`). Returns one optimizer, usable as `Trainer(..., optimizers=(opt, None))`.
    """
    from .layer import LotaLayer

    latent = sorted({a for m in model.modules() if isinstance(m, LotaLayer)
                     for a, s in m.settings.items() if s.train_mode == "latent"})
    if latent:
        raise ValueError(
            f"LoTA adapter(s) {', '.join(map(repr, latent))} have train_mode='latent': they train under any optimizer "
            "(a Trainer's default AdamW, TRL, ...), so create_lota_optimizer and LotaCallback are not needed. "
            "create_lota_optimizer runs the paper's t-SignSGD on adapters made with LotaConfig(train_mode='ternary')."
        )
    ternary, other = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if _LOTA_PARAM.search(name):
            if not is_ternary(p):
                raise ValueError(f"LoTA parameter {name} has values outside {{-1, 0, 1}}")
            ternary.append(p)
        else:
            other.append(p)
    if not ternary:
        raise ValueError("no trainable LoTA parameters (named '...lota_A.<adapter>' / '...lota_B.<adapter>') found")
    kwargs = dict(ternary_kwargs or {})
    if total_steps is not None:
        kwargs["total_steps"] = total_steps
    other_opt = other_optimizer_cls(other, **{"lr": 2e-4, **(other_kwargs or {})}) if other else None
    return LotaOptimizer(TSignSGD(ternary, **kwargs), other_opt)


def sharding_problem(model: torch.nn.Module | None, optimizer=None) -> str | None:
    """Why t-SignSGD cannot run under the engine that wraps `model` / `optimizer`, or None.

    t-SignSGD thresholds each LoTA tensor's whole gradient. FSDP2 (`fully_shard`) keeps every tensor a tensor
    (a DTensor, whose quantile is taken over all its shards) and DDP keeps it whole; FSDP1 and DeepSpeed ZeRO
    hand the optimizer flat shards that cut across tensors, so the moves would depend on the number of processes.
    """
    engine = None
    if model is not None and torch.distributed.is_available():  # (a torch built without it has no FSDP either)
        from torch.distributed.fsdp import FullyShardedDataParallel

        if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            engine = "FSDP1 (FullyShardedDataParallel)"
    for _ in range(8):  # accelerate's and DeepSpeed's wrappers keep the wrapped optimizer in `.optimizer`
        if optimizer is None or isinstance(optimizer, (TSignSGD, LotaOptimizer)):
            break
        if type(optimizer).__module__.startswith("deepspeed"):
            engine = "DeepSpeed ZeRO"
        optimizer = getattr(optimizer, "optimizer", None)
    if engine is None:
        return None
    return (f"{engine} hands the optimizer flat shards that cut across tensors, and t-SignSGD thresholds each LoTA "
            "tensor's whole gradient: its moves would depend on the number of processes. Shard with FSDP2 instead "
            "(`accelerate launch --use_fsdp --fsdp_version 2` with peft_lota.LotaTrainer), or train on DDP, or use "
            "LotaConfig(train_mode='latent'), which trains under any optimizer and engine.")


def _unwrap(optimizer) -> TSignSGD | LotaOptimizer | None:
    # Trainer hands callbacks accelerate's AcceleratedOptimizer; wrappers keep the real one in `.optimizer`.
    for _ in range(8):
        if isinstance(optimizer, (TSignSGD, LotaOptimizer)):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None


class LotaCallback(NonFiniteCallback):
    """Makes a stock `transformers.Trainer` run t-SignSGD correctly (and stops it at a non-finite value, as
    NonFiniteCallback does).

    At train begin it sets the schedule length to `state.max_steps` (the real number of optimizer
    steps, gradient accumulation and epochs included) and turns gradient clipping off. Clipping
    scales every gradient by one factor, which leaves signs and per-tensor quantiles alone, but it
    changes which entries pass `tau` and the global norm the outlier guard compares to
    `guard_norm`; the released code trains without it. Trainer's default `max_grad_norm=1.0` is
    replaced by 0.0 (logged); any other positive value is taken as an explicit request and fails
    early: set `max_grad_norm=0`. Clipping is off for the whole model, including parameters of the
    other optimizer (e.g. `modules_to_save`).

    `optimizer`: only needed if the Trainer does not hand the optimizer to callbacks.
    """

    def __init__(self, optimizer=None):
        self.optimizer = optimizer

    def on_train_begin(self, args, state, control, optimizer=None, model=None, **kwargs):
        problem = sharding_problem(model, optimizer)
        if problem:
            raise ValueError(problem)
        opt = _unwrap(self.optimizer if self.optimizer is not None else optimizer)
        if opt is None:
            raise ValueError(
                "LotaCallback found no TSignSGD in the Trainer's optimizer: pass "
                "optimizers=(peft_lota.create_lota_optimizer(model), None) to Trainer. (Adapters with "
                "LotaConfig(train_mode='latent'), the default, need neither: drop the callback.)"
            )
        opt.set_total_steps(state.max_steps)
        ternary = opt.ternary if isinstance(opt, LotaOptimizer) else opt
        done = ternary.param_groups[0]["step"]
        if state.global_step > 0 and done == 0:
            # Resuming, but the checkpoint's optimizer.pt (t-SignSGD's step count) was not loaded. Without momentum
            # the schedule position is t-SignSGD's whole state, and the trainer state has it: resume exactly.
            # (Not for fp16 runs that skipped overflowing steps: those need optimizer.pt.)
            if any(g.get("momentum", 0.0) for g in ternary.param_groups):
                raise ValueError(
                    f"Resuming at step {state.global_step}, but the checkpoint holds no optimizer state (optimizer.pt) "
                    "and t-SignSGD's momentum cannot be recovered without it. Resume from a checkpoint that holds "
                    "optimizer.pt, or start the run over.")
            for group in ternary.param_groups:
                group["step"] = state.global_step
            logger.warning("LotaCallback: the checkpoint holds no optimizer state; t-SignSGD's schedule resumes at step "
                           "%d from the trainer state (its only state, so the run continues exactly).", state.global_step)

        clip = args.max_grad_norm
        if clip is not None and clip > 0:
            if clip != TrainingArguments.__dataclass_fields__["max_grad_norm"].default:
                raise ValueError(
                    f"max_grad_norm={clip} would clip LoTA's ternary gradients, which t-SignSGD must see "
                    "unclipped (tau and the outlier guard depend on their scale). Set max_grad_norm=0."
                )
            args.max_grad_norm = 0.0
            others = isinstance(opt, LotaOptimizer) and opt.other is not None
            logger.warning(
                "LotaCallback: gradient clipping turned off (max_grad_norm 1.0 -> 0.0) so that t-SignSGD sees "
                "unclipped gradients" + ("; the non-LoTA parameters are not clipped either." if others else ".")
            )
        return control

