"""Tests of t-SignSGD, the combined LoTA optimizer and the Trainer callback (LoTA-QAF's t-SignSGD)."""

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainingArguments

from peft_lota.lota.optim import (
    LotaCallback,
    LotaOptimizer,
    TSignSGD,
    _guard_phase,
    _lower_quantile,
    create_lota_optimizer,
    tsign_quantile,
)


def _ternary(*shape, gen=None):
    return torch.randint(-1, 2, shape, generator=gen).float()


def _is_ternary(t):
    return bool(((t == 0) | (t.abs() == 1)).all())


class TinyLota(nn.Module):
    """A frozen base Linear, a LoTA-style ternary update through ParameterDicts, and a trainable head."""

    def __init__(self, d=8, r=4, out=3, scale=1.0, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.base = nn.Linear(d, out).requires_grad_(False)
        self.lota_A = nn.ParameterDict({"default": nn.Parameter(_ternary(d, r, gen=gen))})
        self.lota_B = nn.ParameterDict({"default": nn.Parameter(torch.zeros(r, out))})
        self.head = nn.Linear(out, out)
        self.scale = scale

    def forward(self, x, labels=None):
        p = self.lota_A["default"] @ self.lota_B["default"]  # exact integers, straight-through gradients
        logits = self.head(self.base(x) + self.scale * x @ p)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


def _data(n=10, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x, labels = torch.randn(n, d, generator=gen), torch.randint(0, 3, (n,), generator=gen)
    return [{"x": x[i], "labels": int(labels[i])} for i in range(n)]


# ---- threshold ----


@pytest.mark.parametrize("ties", [False, True])
def test_lower_quantile_equals_torch_quantile(ties):
    gen = torch.Generator().manual_seed(1)
    for n in [1, 2, 3, 20, 21, 101, 1000, 4097]:
        a = (torch.randint(0, 5, (n,), generator=gen).float() if ties else torch.rand(n, generator=gen)).double()
        for q in [0.0, 0.3, 0.5, 0.95, 0.96, 0.999, 0.9999, 0.99995, 1.0]:
            sigma = _lower_quantile(a, q)
            assert sigma == torch.quantile(a, q, interpolation="lower")
            # the mask is the one the default ("linear") quantile gives, as in the released code
            assert torch.equal(a > sigma, a > torch.quantile(a, q))


def test_threshold_beyond_torch_quantile_size_limit():
    n = 2**24 + 1  # torch.quantile historically refused inputs above 2**24 elements
    p = nn.Parameter(torch.zeros(n))
    p.grad = torch.rand(n, generator=torch.Generator().manual_seed(0)) - 0.5
    TSignSGD([p], total_steps=1, q_start=0.9999).step()
    a, k = p.grad.abs(), math.floor(0.9999 * (n - 1))
    sigma = a.topk(n - k).values.min()  # the same order statistic, found another way
    assert torch.equal(p.detach(), torch.where(a > sigma, -p.grad.sign(), 0.0))
    assert (p != 0).sum() > 1000


# ---- schedule ----


def test_schedule_step_to_q_mapping():
    kw = dict(q_start=0.95, q_mid=0.999, q_end=0.9999, split=0.8)
    T = 11  # u = t / 10
    assert tsign_quantile(0, T, **kw) == 0.95
    assert tsign_quantile(4, T, **kw) == pytest.approx(0.95 + 0.049 * 0.5)
    assert tsign_quantile(8, T, **kw) == pytest.approx(0.999)
    assert tsign_quantile(9, T, **kw) == pytest.approx(0.99945)
    assert tsign_quantile(10, T, **kw) == 0.9999  # last announced step
    assert tsign_quantile(50, T, **kw) == 0.9999  # past T: clamped
    qs = [tsign_quantile(t, 100, **kw) for t in range(120)]
    assert all(b >= a for a, b in zip(qs, qs[1:]))
    assert tsign_quantile(0, 1, **kw) == 0.95 and tsign_quantile(1, 1, **kw) == 0.9999


def test_outlier_guard_is_active_in_last_fifth_of_steps():
    assert [t for t in range(10) if _guard_phase(t, 10, 0.8)] == [8, 9]
    assert sum(_guard_phase(t, 100, 0.8) for t in range(100)) == 20


# ---- update rule ----


def test_step_updates_top_fraction_by_sign_and_counts_steps():
    gen = torch.Generator().manual_seed(0)
    signs = torch.where(torch.rand(100, generator=gen) > 0.5, 1.0, -1.0)
    g = (torch.randperm(100, generator=gen) + 1).float() * signs  # |g| = 1..100
    p = nn.Parameter(torch.zeros(100))
    p.grad = g.clone()
    opt = TSignSGD([p], total_steps=5)
    opt.step()
    top = g.abs() > 95  # floor(0.95 * 99) = 94 -> sigma is the 95th smallest |g| = 95
    assert torch.equal(p.detach(), torch.where(top, -g.sign(), 0.0))
    assert opt.param_groups[0]["step"] == 1


def test_clip_tau_and_none_grads():
    p = nn.Parameter(torch.tensor([1.0, -1.0, 0.0, 1.0]))
    p.grad = torch.tensor([-5.0, 5.0, 1e-12, 3.0])
    frozen = nn.Parameter(torch.tensor([1.0, 0.0]))  # grad None: skipped
    opt = TSignSGD([p, frozen], total_steps=1, q_start=0.0)  # q = 0: everything above tau may move
    opt.step()
    assert p.tolist() == [1.0, -1.0, 0.0, 0.0]  # clipped at +-1; 1e-12 < tau; 1 - 1 = 0
    assert frozen.tolist() == [1.0, 0.0]


def test_lr_is_ignored_and_scheduler_works():
    gen = torch.Generator().manual_seed(0)
    init, grads = _ternary(50, gen=gen), [torch.randn(50, generator=gen) for _ in range(4)]
    results = []
    for lr in (1.0, 1e-3):
        p = nn.Parameter(init.clone())
        opt = TSignSGD([p], total_steps=4, lr=lr, q_start=0.5)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.1 * (s + 1))
        for g in grads:
            p.grad = g.clone()
            opt.step()
            sched.step()
        results.append(p.detach().clone())
    assert torch.equal(*results) and _is_ternary(results[0])


def test_bf16_gradients_match_float32():
    gen = torch.Generator().manual_seed(0)
    init, g = _ternary(64, 32, gen=gen), torch.randn(64, 32, generator=gen).to(torch.bfloat16)
    p32, p16 = nn.Parameter(init.clone()), nn.Parameter(init.to(torch.bfloat16))
    p32.grad, p16.grad = g.float(), g.clone()
    TSignSGD([p32], total_steps=1, q_start=0.9).step()
    TSignSGD([p16], total_steps=1, q_start=0.9).step()
    assert torch.equal(p32.detach(), p16.detach().float()) and not torch.equal(p32.detach(), init)


def test_outlier_guard_skips_largest_entries_when_norm_is_large():
    def run(peak, step, guard=True):
        p = nn.Parameter(torch.zeros(1000))
        p.grad = torch.linspace(1e-3, 1e-2, 1000)
        p.grad[17] = peak
        opt = TSignSGD([p], total_steps=10, outlier_guard=guard)
        opt.param_groups[0]["step"] = step  # q_end at step 9: only the largest entry passes sigma
        opt.step()
        return p[17].item()

    assert run(100.0, 9) == 0.0  # norm > 10 in the late phase: the outlier is skipped
    assert run(5.0, 9) == -1.0  # norm < 10
    assert run(100.0, 9, guard=False) == -1.0
    assert run(100.0, 0) == -1.0  # early phase: no guard


def test_tsignsgd_refuses_a_missing_schedule_a_bad_length_and_non_ternary_tensors():
    p = nn.Parameter(torch.zeros(4))
    p.grad = torch.ones(4)
    with pytest.raises(RuntimeError, match="total_steps"):
        TSignSGD([p]).step()
    opt = TSignSGD([p])
    opt.set_total_steps(3)
    opt.step()
    with pytest.raises(ValueError, match="positive integer"):
        opt.set_total_steps(0)
    q = nn.Parameter(torch.full((4,), 0.5))
    q.grad = torch.ones(4)
    with pytest.raises(ValueError, match="ternary"):
        TSignSGD([q], total_steps=3).step()


def _grad_stream(shapes, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    # scale 2 keeps the global norm above guard_norm, so the late-phase guard is exercised
    return [
        [None if (i + j) % 5 == 4 else 2 * torch.randn(s, generator=gen) for j, s in enumerate(shapes)]
        for i in range(steps)
    ]


def _roundtrip(state_dict):
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)  # what Trainer does with optimizer.pt


def test_resume_is_bit_exact():
    shapes, T, half = [(40, 8), (8, 30)], 20, 9
    gen = torch.Generator().manual_seed(3)
    init = [_ternary(*s, gen=gen) for s in shapes]
    grads = _grad_stream(shapes, T, seed=4)

    def run(params, opt, steps):
        for gs in steps:
            for p, g in zip(params, gs):
                p.grad = g
            opt.step()

    ref = [nn.Parameter(t.clone()) for t in init]
    run(ref, TSignSGD(ref, total_steps=T), grads)

    first = [nn.Parameter(t.clone()) for t in init]
    opt = TSignSGD(first, total_steps=T)
    run(first, opt, grads[:half])
    saved = _roundtrip(opt.state_dict())
    second = [nn.Parameter(p.detach().clone()) for p in first]
    opt2 = TSignSGD(second)  # total_steps comes from the state dict
    opt2.load_state_dict(saved)
    assert opt2.param_groups[0]["step"] == half and opt2.param_groups[0]["total_steps"] == T
    run(second, opt2, grads[half:])
    assert all(torch.equal(a, b) for a, b in zip(ref, second))


# ---- combined optimizer ----


def test_create_lota_optimizer_groups():
    model = TinyLota()
    opt = create_lota_optimizer(model, total_steps=7, ternary_kwargs={"q_start": 0.9}, other_kwargs={"eps": 1e-6})
    assert isinstance(opt, LotaOptimizer) and isinstance(opt, torch.optim.Optimizer)
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(opt.ternary.param_groups[0]["params"]) == ids([model.lota_A["default"], model.lota_B["default"]])
    assert ids(opt.other.param_groups[0]["params"]) == ids(model.head.parameters())
    assert opt.param_groups[0] is opt.other.param_groups[0] and opt.param_groups[1] is opt.ternary.param_groups[0]
    assert opt.other.param_groups[0]["lr"] == 2e-4 and opt.other.param_groups[0]["eps"] == 1e-6
    assert opt.ternary.param_groups[0]["q_start"] == 0.9
    assert opt.ternary.param_groups[0]["total_steps"] == 7

    with pytest.raises(ValueError, match="no trainable LoTA"):
        create_lota_optimizer(nn.Linear(2, 2))
    bad = TinyLota()
    bad.lota_A["default"].data[0, 0] = 0.5
    with pytest.raises(ValueError, match="lota_A.default"):
        create_lota_optimizer(bad)


def test_combined_optimizer_only_ternary():
    model = TinyLota()
    model.head.requires_grad_(False)
    opt = create_lota_optimizer(model, total_steps=2)
    assert opt.other is None and opt.param_groups == opt.ternary.param_groups


def _train(model, opt, sched, batches):
    for x, y in batches:
        model(x, y)["loss"].backward()
        opt.step()
        sched.step()
        opt.zero_grad()


def test_combined_resume_with_scheduler_is_bit_exact():
    T, half = 12, 5
    data = _data(2 * T, seed=1)
    x, y = torch.stack([d["x"] for d in data]), torch.tensor([d["labels"] for d in data])
    batches = list(zip(x.split(2), y.split(2)))
    init = TinyLota(scale=3.0)

    def make(model):
        opt = create_lota_optimizer(model, total_steps=T, ternary_kwargs={"q_start": 0.6, "q_mid": 0.8, "q_end": 0.9})
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / T)

    ref = copy.deepcopy(init)
    _train(ref, *make(ref), batches)

    first = copy.deepcopy(init)
    opt, sched = make(first)
    _train(first, opt, sched, batches[:half])
    saved_opt, saved_sched = _roundtrip(opt.state_dict()), sched.state_dict()
    second = copy.deepcopy(first)
    opt2, sched2 = make(second)
    opt2.load_state_dict(saved_opt)
    sched2.load_state_dict(saved_sched)
    # the groups the scheduler edits are still the inner optimizers' own
    assert opt2.param_groups[0] is opt2.other.param_groups[0] and opt2.param_groups[1] is opt2.ternary.param_groups[0]
    assert opt2.state is opt2.other.state and len(opt2.state) == 2  # AdamW moments of head.weight / head.bias
    _train(second, opt2, sched2, batches[half:])

    assert opt2.other.param_groups[0]["lr"] == pytest.approx(2e-4 * (1 - T / T))
    for (name, a), b in zip(ref.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(ref.lota_B["default"], init.lota_B["default"])  # training did something
    assert _is_ternary(second.lota_A["default"]) and _is_ternary(second.lota_B["default"])


# ---- Trainer callback ----


def _trainer(tmp_path, model, opt, **kw):
    from transformers import Trainer, TrainingArguments

    args = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, num_train_epochs=2,
        report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True,
        remove_unused_columns=False, seed=0,
    )  # fmt: skip
    args.update(kw)
    return Trainer(
        model=model,
        args=TrainingArguments(**args),
        train_dataset=_data(10),
        optimizers=(opt, None),
        callbacks=[LotaCallback()],
    )


def test_trainer_schedule_length_and_clipping(tmp_path):
    model = TinyLota(scale=20.0)  # large ternary gradients: a global norm well above 1
    opt = create_lota_optimizer(model, ternary_kwargs={"q_start": 0.5})
    norms = []
    opt.ternary.register_step_pre_hook(lambda o, args, kwargs: norms.append(o._global_grad_norm()))
    trainer = _trainer(tmp_path, model, opt)
    assert trainer.args.max_grad_norm == 1.0  # Trainer's default
    trainer.train()

    group = opt.ternary.param_groups[0]
    assert trainer.state.max_steps == 2 * math.ceil(5 / 2) == trainer.state.global_step
    assert group["total_steps"] == trainer.state.max_steps == group["step"] == len(norms)
    assert trainer.args.max_grad_norm == 0.0
    assert max(norms) > 1.0  # with clipping at 1.0 the ternary gradients' norm could never exceed 1
    assert _is_ternary(model.lota_A["default"]) and _is_ternary(model.lota_B["default"])
    assert model.lota_B["default"].abs().sum() > 0


def test_trainer_explicit_clipping_fails_early(tmp_path):
    model = TinyLota()
    trainer = _trainer(tmp_path, model, create_lota_optimizer(model), max_grad_norm=0.5)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="max_grad_norm=0"):
        trainer.train()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_callback_needs_a_tsignsgd():
    from transformers import TrainerControl, TrainerState, TrainingArguments

    args, state = TrainingArguments(output_dir="unused", report_to=[], max_grad_norm=0.0), TrainerState(max_steps=3)
    sgd = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="create_lota_optimizer"):
        LotaCallback().on_train_begin(args, state, TrainerControl(), optimizer=sgd)

    class Wrapper:  # like accelerate's AcceleratedOptimizer
        def __init__(self, optimizer):
            self.optimizer = optimizer

    opt = TSignSGD([nn.Parameter(torch.zeros(3))])
    LotaCallback().on_train_begin(args, state, TrainerControl(), optimizer=Wrapper(opt))
    assert opt.param_groups[0]["total_steps"] == 3 and args.max_grad_norm == 0.0


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("head", [False, True])
def test_zero_gradient_state_init_does_not_advance_the_schedule(momentum, head):
    """torch.distributed.checkpoint (FSDP2's and accelerate's save and resume) creates an empty optimizer state by
    one step on zero gradients at learning rate 0, before saving and before loading. t-SignSGD creates its state
    (the momentum average, which the load fills) and moves nothing, its schedule included; the other optimizer
    (here AdamW for a trainable head) creates its own."""
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    model = TinyLota()
    model.head.requires_grad_(head)
    opt = create_lota_optimizer(model, total_steps=4, ternary_kwargs={"momentum": momentum})
    data = _data(2)
    for step in range(2):
        before = copy.deepcopy(model.state_dict())
        _init_optim_state(opt)
        assert [g["step"] for g in opt.ternary.param_groups] == [step]
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
        ternary = opt.ternary.param_groups[0]["params"]
        assert all(("exp_avg" in opt.state[p]) == bool(momentum) for p in ternary)
        if head:
            assert all("exp_avg" in opt.state[p] for p in model.head.parameters())
        model(torch.stack([d["x"] for d in data]), torch.tensor([d["labels"] for d in data]))["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_callback_refuses_engines_that_flatten_tensors(tmp_path):
    """FSDP1 and DeepSpeed ZeRO give the optimizer flat shards across tensors, where a per-tensor threshold depends
    on the sharding: the run is refused at start with the alternatives (FSDP2 keeps tensors: test_sharded.py)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel

    from peft_lota.lota.optim import sharding_problem

    model = TinyLota()
    opt = create_lota_optimizer(model, total_steps=2)
    assert sharding_problem(model, opt) is None

    class ZeroOptimizer:  # stands for DeepSpeed's ZeRO wrapper, found by its module like the real one
        __module__ = "deepspeed.runtime.zero.stage_1_and_2"

        def __init__(self, inner):
            self.optimizer = inner

    assert "DeepSpeed ZeRO" in sharding_problem(model, ZeroOptimizer(opt))

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model.head = FullyShardedDataParallel(model.head, device_id=torch.device("cpu"), use_orig_params=True)
        args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
        with pytest.raises(ValueError, match=r"FSDP1 .* Shard with FSDP2 instead"):
            LotaCallback().on_train_begin(args, None, None, optimizer=opt, model=model)
    finally:
        dist.destroy_process_group()
