"""merge_lora: a PEFT LoRA trained on a GPTQ, AWQ, compressed-tensors or LLM.int8 model, merged onto the base's grid.

The error-feedback maths on its own first (exact properties), then whole models: the merge keeps the base's grid,
writes what it reported, reloads bit for bit with stock transformers, and refuses what it cannot merge.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import peft_lota
from peft_lota.feedback import (add_to_hessian, merge_onto_grid, nearest_codes, output_error, refit_scales,
                                round_with_feedback, stored_weight)
from peft_lota.formats import dispatch, is_quantized_layer, quantized_tensors
from peft_lota.tuner import NonFiniteError
from tiny_models import (AwqSpec, CtSpec, Spec, calibration_texts, load_awq, load_ct, load_gptq, load_int8, logits,
                         tiered)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---- the maths ---------------------------------------------------------------------------------------------

def random_layer(K=256, N=96, gs=32, maxq=15, seed=0):
    g = torch.Generator().manual_seed(seed)
    G = K // gs
    g_idx = torch.arange(K) // gs
    scales = (torch.rand(G, N, generator=g) * 0.02 + 0.01).half()
    zeros = torch.randint(3, maxq - 2, (G, N), generator=g)
    codes = torch.randint(0, maxq + 1, (K, N), generator=g, dtype=torch.uint8)
    X = torch.randn(2048, K, generator=g) @ (torch.eye(K) + 0.2 * torch.randn(K, K, generator=g))  # correlated
    H = torch.zeros(K, K)
    H /= add_to_hessian(H, X)
    base = stored_weight(codes.float(), zeros.float()[g_idx], scales.float()[g_idx], scales.dtype)
    delta = 0.003 * torch.randn(K, 4, generator=g) @ torch.randn(4, N, generator=g)  # a rank-4 update, < half a step
    return dict(base=base, target=base + delta, codes=codes, zeros=zeros, scales=scales, g_idx=g_idx, maxq=maxq, H=H)


def test_a_weight_on_the_grid_rounds_back_to_its_own_codes():
    L = random_layer()
    codes = round_with_feedback(L["base"], L["scales"], L["zeros"], L["g_idx"], L["maxq"], L["H"])
    assert torch.equal(codes, L["codes"])


def test_with_uncorrelated_inputs_feedback_is_nearest_rounding():
    """H diagonal: no row's error can be compensated by another's, and GPTQ reduces to rounding each weight."""
    L = random_layer()
    H = torch.diag(torch.rand(L["H"].shape[0]) + 0.5)
    codes = round_with_feedback(L["target"], L["scales"], L["zeros"], L["g_idx"], L["maxq"], H)
    assert torch.equal(codes, nearest_codes(L["target"], L["zeros"], L["scales"], L["g_idx"], L["maxq"]))


@pytest.mark.parametrize("act_order", [True, False])
def test_feedback_holds_more_of_the_update_than_nearest_rounding(act_order):
    L = random_layer()
    args = (L["zeros"], L["scales"], L["g_idx"], L["maxq"])
    nearest = nearest_codes(L["target"], *args)
    codes = round_with_feedback(L["target"], L["scales"], L["zeros"], L["g_idx"], L["maxq"], L["H"], act_order=act_order)
    assert int(codes.max()) <= L["maxq"]

    def err(c, s=L["scales"]):
        return output_error(L["target"], stored_weight(c.float(), L["zeros"].float()[L["g_idx"]],
                                                       s.float()[L["g_idx"]], s.dtype), L["H"])
    lost = err(L["codes"])  # the base codes: the whole update lost
    assert err(codes) < 0.8 * err(nearest) and err(nearest) <= lost
    scales = refit_scales(L["target"], codes, L["zeros"], L["scales"], L["g_idx"], L["H"])
    assert scales.dtype == L["scales"].dtype and err(codes, scales) < err(codes)


def test_merge_onto_grid_reports_what_it_returns():
    L = random_layer()
    codes, scales, report = merge_onto_grid(L["target"], L["codes"], L["zeros"], L["scales"], L["g_idx"], L["maxq"],
                                            L["H"], train_scales=True)
    weight = stored_weight(codes.float(), L["zeros"].float()[L["g_idx"]], scales.float()[L["g_idx"]], scales.dtype)
    lost = output_error(L["target"], L["base"], L["H"])
    assert report["error"] == pytest.approx(output_error(L["target"], weight, L["H"]) / lost, rel=1e-9)
    assert report["codes_moved"] == int((codes != L["codes"]).sum()) > 0
    assert report["scales_changed"] == int((scales != L["scales"]).sum()) > 0
    assert report["error"] < report["error_nearest"] < 1.0


# ---- whole models ----------------------------------------------------------------------------------------------

GPTQ_SPECS = [Spec("llama", 4, False, True, "gptq"), Spec("qwen2", 4, True, False, "gptq_v2"),
              Spec("qwen2", 3, False, True, "gptq_v2")]
FORMATS = [("gptq", s) for s in GPTQ_SPECS] + [("awq", AwqSpec("llama", 4, False, 32)), ("ct", CtSpec("llama", 4, 32)),
                                                ("int8", "llama")]


LOADERS = {"gptq": load_gptq, "awq": load_awq, "ct": load_ct, "int8": load_int8}
RELOADERS = {**LOADERS, "int8": lambda path: load_int8(path, quantize=False)}


@pytest.fixture(scope="module", params=tiered(FORMATS, FORMATS[2:],  # the inner loop: one checkpoint of each format
                                               ids=lambda c: f"{c[0]}-{c[1] if isinstance(c[1], str) else c[1].slug()}"))
def checkpoint(request, gptq_dir, awq_dir, ct_dir, fp_dir):
    """(kind, the model the LoRA trains on, the quantized base)."""
    kind, spec = request.param
    if kind == "int8":
        return kind, fp_dir(spec), fp_dir(spec)
    path = {"gptq": gptq_dir, "awq": awq_dir, "ct": ct_dir}[kind](spec)
    return kind, (fp_dir(spec.arch) if kind == "ct" else path), path


def blocks(path, n=24, seq=48) -> torch.Tensor:
    tok = AutoTokenizer.from_pretrained(path)
    ids = [t for text in calibration_texts(48, seed=3, chars=600) for t in tok(text)["input_ids"]]
    return torch.tensor(ids[: n * seq]).view(n, seq)


def trained_lora(kind, path, data, steps=12, lr=1e-2, **config):
    """A LoRA trained on the model in `path` (quantized, or the full-precision one for compressed-tensors, as PEFT
    cannot wrap a packed compressed-tensors layer, and for LLM.int8)."""
    torch.manual_seed(0)
    base = (load_gptq(path) if kind == "gptq" else load_awq(path) if kind == "awq"
            else AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, **config))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for i in range(steps):
        x = data[(4 * i) % 16:(4 * i) % 16 + 4]
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def grid(model) -> dict:
    out = {}
    for name, m in model.named_modules():
        if is_quantized_layer(m):
            q = dispatch(m, name).read()
            out[name] = (q.zeros.to(torch.int32).clone(), q.g_idx.clone(), q.scales.clone())
    return out


@pytest.mark.parametrize("train_scales", tiered([False, True], [True], ids=lambda t: "codes+scales" if t else "codes"))
def test_merge_keeps_the_grid_and_reloads_as_reported(checkpoint, train_scales, tmp_path):
    kind, train_on, path = checkpoint
    data = blocks(path)
    before = grid(LOADERS[kind](path))
    lora = trained_lora(kind, train_on, data)
    calib = list(data.split(4))  # 6 batches: the last is held out
    if kind in ("ct", "int8"):  # the LoRA trained in full precision, saved, merged onto the quantized model
        lora.save_pretrained(tmp_path / "lora")
        lora = (LOADERS[kind](path), {"lora": tmp_path / "lora"})
    else:
        lora = (lora, {})
    unmerged = None if lora[1] else logits(lora[0], data[:2])
    merged = peft_lota.merge_lora(lora[0], calib, train_scales=train_scales, progress=False, **lora[1])
    report = merged.merge_lora_report
    assert not any(isinstance(m, torch.nn.ModuleDict) and "default" in m for m in merged.modules())  # LoRA gone

    after = grid(merged)
    assert after.keys() == before.keys()
    changed_scales = 0
    for name, (zeros, g_idx, scales) in before.items():
        assert torch.equal(after[name][0], zeros) and torch.equal(after[name][1], g_idx), name
        changed_scales += int((after[name][2] != scales).sum())
    assert (changed_scales > 0) == train_scales
    assert report.held_out and len(report.layers) == 14
    assert sum(r["codes_moved"] for r in report.layers.values()) > 0
    mean = lambda key: sum(r[key] for r in report.layers.values()) / len(report.layers)  # noqa: E731
    assert mean("error") < mean("error_nearest")

    # The report was measured on this very model: its loss on the held-out batch, recomputed, is the same number.
    held = calib[-1]
    with torch.no_grad():
        out = merged(input_ids=held).logits[:, :-1].float()
    loss = float(torch.nn.functional.cross_entropy(out.flatten(0, 1), held[:, 1:].flatten(), reduction="sum"))
    assert loss / held[:, 1:].numel() == report.loss_merged
    if unmerged is not None:  # close to the LoRA, not equal (it rounds): far closer than the base is, on average (a
        # max-difference tolerance failed on one CPU: one outlier logit of 1.57 where the mean is 0.015, the base's 0.27)
        gap = (logits(merged, data[:2]) - unmerged).abs().mean()
        assert gap < 0.25 * (logits(LOADERS[kind](path), data[:2]) - unmerged).abs().mean()

    merged.save_pretrained(tmp_path / "merged")
    reloaded = RELOADERS[kind](tmp_path / "merged")
    ours, theirs = quantized_tensors(merged), quantized_tensors(reloaded)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert torch.equal(logits(reloaded, data[:2]), logits(merged, data[:2]))


def test_merge_lora_beats_re_rounding_each_weight(gptq_dir):
    """The model-level point of the feedback: closer to the unmerged LoRA than rounding W + BA to the nearest code on
    the same grid (the best a merge without calibration can do)."""
    path = gptq_dir(GPTQ_SPECS[0])
    data = blocks(path)
    lora = trained_lora("gptq", path, data, lr=3e-3)
    calib = list(data.split(4))
    merged = peft_lota.merge_lora(lora, calib, train_scales=False, progress=False)
    report = merged.merge_lora_report

    nearest = trained_lora("gptq", path, data, lr=3e-3)  # the same LoRA (same seed and data), rounded naively
    for name, m in nearest.named_modules():
        if hasattr(m, "lora_A") and "default" in m.lora_A:
            q = dispatch(m.get_base_layer(), name)
            s = q.read()
            delta = (m.lora_A["default"].weight.t() @ m.lora_B["default"].weight.t()) * m.scaling["default"]
            codes = nearest_codes(s.weight().float() + delta, s.zeros, s.scales, s.g_idx, s.maxq)
            q.restore(q.encode(codes, s.zeros))
    naive = nearest.unload()
    with torch.no_grad():
        out = naive(input_ids=calib[-1]).logits[:, :-1].float()
    loss = float(torch.nn.functional.cross_entropy(out.flatten(0, 1), calib[-1][:, 1:].flatten()))
    assert abs(report.loss_merged - report.loss_lora) < abs(loss - report.loss_lora)


def edited_adapter(src, dst, config=None, tensors=None):
    """A copy of a saved adapter with its config updated and its tensors transformed ({name: tensor} -> dict)."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**cfg, **(config or {})}))
    if tensors:
        save_file(tensors(load_file(dst / "adapter_model.safetensors")), dst / "adapter_model.safetensors")
    return dst


def test_refuses_what_it_cannot_merge(gptq_dir, fp_dir, tmp_path):
    path = gptq_dir(GPTQ_SPECS[1])
    data = blocks(path)
    calib = list(data.split(4))
    with pytest.raises(ValueError, match="PeftModel with a LoRA"):
        peft_lota.merge_lora(load_gptq(path), calib)
    lota = get_peft_model(load_gptq(path), peft_lota.LotaConfig(r=4, target_modules=TARGETS))
    with pytest.raises(ValueError, match="not a LoRA.*merge_and_unload"):
        peft_lota.merge_lora(lota, calib)
    lota.save_pretrained(tmp_path / "lota")
    with pytest.raises(ValueError, match="not a LoRA"):
        peft_lota.merge_lora(load_gptq(path), calib, lora=tmp_path / "lota")
    with pytest.raises(ValueError, match="full precision"):
        peft_lota.merge_lora(get_peft_model(AutoModelForCausalLM.from_pretrained(fp_dir("qwen2")),
                                            LoraConfig(r=4, target_modules=TARGETS)), calib)

    saved = tmp_path / "lora"
    get_peft_model(load_gptq(path), LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False)).save_pretrained(saved)
    base = load_gptq(path)
    before = {k: v.clone() for k, v in quantized_tensors(base).items()}
    cases = [({"use_dora": True}, None, "DoRA"), ({"bias": "all"}, None, "biases"),
             (None, lambda t: {k.replace("layers.1.", "layers.7."): v for k, v in t.items()}, "another model"),
             (None, lambda t: {k: (v[:, :64].contiguous() if "q_proj.lora_A" in k else v) for k, v in t.items()}, "another model"),
             (None, lambda t: {**t, "base_model.model.extra.weight": torch.zeros(3)}, "no place"),
             (None, lambda t: {k: (v.fill_(float("nan")) if "down_proj.lora_B" in k else v) for k, v in t.items()},
              "NaN")]
    for i, (config, tensors, message) in enumerate(cases):
        with pytest.raises(ValueError, match=message):
            peft_lota.merge_lora(base, calib, lora=edited_adapter(saved, tmp_path / f"bad{i}", config, tensors))
    after = quantized_tensors(base)
    assert all(torch.equal(before[k], after[k]) for k in before)  # refused before anything was written

    lora = get_peft_model(load_gptq(path), LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    before = {k: v.clone() for k, v in quantized_tensors(lora).items()}
    for bad in ([], None):
        with pytest.raises(ValueError, match="calibration"):
            peft_lota.merge_lora(lora, bad or [])
    with pytest.raises(ValueError, match="tokenizer"):
        peft_lota.merge_lora(lora, ["some text"])
    with pytest.raises(ValueError, match="vocabulary"):
        peft_lota.merge_lora(lora, [data[:2] + 10_000])
    with pytest.raises(ValueError, match="eval_batches"):
        peft_lota.merge_lora(lora, calib[:2], eval_batches=2)
    layer = lora.base_model.model.model.layers[1].mlp.down_proj
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="down_proj"):
        peft_lota.merge_lora(lora, calib)
    after = quantized_tensors(lora)
    assert all(torch.equal(before[k], after[k]) for k in before)  # refused before anything was written


def test_text_calibration_and_a_loaded_adapter(gptq_dir, tmp_path):
    """The usual route: a LoRA saved by PEFT, loaded onto the GPTQ model, merged with texts and the tokenizer."""
    path = gptq_dir(GPTQ_SPECS[1])
    data = blocks(path)
    trained_lora("gptq", path, data).save_pretrained(tmp_path / "lora")
    model = PeftModel.from_pretrained(load_gptq(path), str(tmp_path / "lora"))
    tok = AutoTokenizer.from_pretrained(path)
    merged = peft_lota.merge_lora(model, calibration_texts(32, seed=5, chars=500), tokenizer=tok, seq_len=32,
                                  progress=False)
    r = merged.merge_lora_report
    assert r.held_out and r.calibration_tokens > 0 and r.loss_base > r.loss_lora - 1.0


def test_cli_merges_a_saved_lora_with_calibration_text(gptq_dir, tmp_path, capsys):
    import re

    from peft_lota import cli

    path = gptq_dir(GPTQ_SPECS[1])
    lora, out = tmp_path / "lora", tmp_path / "out"
    trained_lora("gptq", path, blocks(path)).save_pretrained(lora)
    text = tmp_path / "calib.txt"
    text.write_text("\n\n".join(calibration_texts(32, seed=5, chars=500)))
    assert cli.main(["merge", str(path), str(lora), str(out)]) == 2  # no calibration text: refused, nothing written
    assert "--calib_file" in capsys.readouterr().err and not out.exists()
    (tmp_path / "empty.txt").write_text("")
    assert cli.main(["merge", str(path), str(lora), str(out), "--calib_file", str(tmp_path / "empty.txt")]) == 2
    assert "tokens" in capsys.readouterr().err and not out.exists()
    other = edited_adapter(lora, tmp_path / "other", None,  # a LoRA of a deeper model
                           lambda t: {k.replace("layers.1.", "layers.9."): v for k, v in t.items()})
    assert cli.main(["merge", str(path), str(other), str(out), "--calib_file", str(text), "--calib_len", "32"]) == 2
    err = capsys.readouterr().err
    assert "another model" in err and err.count("\n") == 1 and not out.exists()

    assert cli.main(["merge", str(path), str(lora), str(tmp_path / "merged"), "--calib_file", str(text),
                     "--calib_len", "32"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"reloaded codes, zeros, scales == merged\s+True", printed)
    assert re.search(r"reloaded logits == merged\s+True", printed) and "held-out loss, merged" in printed
    assert (tmp_path / "merged" / "tokenizer.json").exists()
    assert cli.main(["inspect", str(lora)]) == 0
    assert "LORA adapter" in capsys.readouterr().out
