"""GGUF: the file's own blocks read and written exactly, LoTA and merge_lora on them, the same file written back.

Checked against someone else's code: the `gguf` package's quantizer makes the blocks and its dequantization is the
oracle for what a written file holds; transformers' own GGUF loader (dense) for what a model computes. The
real-model check with llama.cpp is tests/test_gguf_llama_cpp.py (slow); adapt, train, merge, save and reload with
LoTA and L4Q (the K-quant mix included) are in tests/test_contract.py, with every other format."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from gguf.quants import dequantize, quantize  # noqa: E402

from peft_lota.formats.gguf import BLOCK_TYPES, GGUFLinear, load_gguf, write_gguf  # noqa: E402
from tiny_models import K_QUANTS, K_TYPES, X, build_gguf, check_written_gguf, logits, tiered  # noqa: E402
from tiny_models import gguf_blocks as qblocks  # noqa: E402
from tiny_models import gguf_dense as dense  # noqa: E402



# ---- the block codecs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(set(BLOCK_TYPES) - set(K_QUANTS)))
def test_blocks_decode_to_what_gguf_dequantizes_and_encode_back_byte_for_byte(name):
    bt, kind = BLOCK_TYPES[name], getattr(gguf.GGMLQuantizationType, name)
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((24, 96)) * rng.lognormal(size=(24, 1))).astype(np.float32)
    raw = quantize(w, kind)
    codes, d, m = bt.decode(torch.from_numpy(raw))
    g = torch.arange(96) // 32

    def weight(codes, d, m):
        out = d.float()[:, g] * (codes.to(torch.int16) - bt.zero).float()
        return out if m is None else out + m.float()[:, g]

    assert torch.equal(weight(codes, d, m), torch.from_numpy(dequantize(raw, kind)))
    assert torch.equal(bt.encode(codes, d, m), torch.from_numpy(raw))
    # every code of the range, at every position, survives encode -> the gguf package's dequantization
    moved = torch.randint(0, bt.maxq + 1, codes.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    written = bt.encode(moved, d, m)
    assert torch.equal(bt.decode(written)[0], moved)
    assert torch.equal(torch.from_numpy(dequantize(written.numpy(), kind)), weight(moved, d, m))


# ---- loading -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_load_keeps_blocks_and_computes_what_transformers_gguf_loader_computes(gguf_root, arch, caplog):
    path = build_gguf(arch, gguf_root)
    model = load_gguf(path)
    layers = [m for m in model.modules() if isinstance(m, GGUFLinear)]
    assert {m.qtype for m in layers} == set(BLOCK_TYPES) - set(K_QUANTS)  # Llama's permuted q/k among them
    assert "F16 stay frozen" in caplog.text  # the layers of another type: said, kept dense
    assert torch.equal(logits(model), logits(dense(path)))
    if arch == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None


def test_load_refusals(gguf_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        load_gguf(tmp_path / "missing.gguf")
    only_f16 = build_gguf("llama", gguf_root, types=("F16",))
    with pytest.raises(ValueError, match="holds no linear layer of a type peft_lota adapts"):
        load_gguf(only_f16)
    # transformers' own (dense) load of a GGUF file: refused by the methods, with the way to load it
    from peft import get_peft_model

    from peft_lota import LotaConfig

    with pytest.raises(ValueError, match="peft_lota.load_gguf"):
        get_peft_model(dense(build_gguf("llama", gguf_root)), LotaConfig(r=4))


# ---- LoTA: merged == adapter, the file written back -------------------------------------------------------

def test_lota_scales_are_trained_in_fp16_and_saved_adapters_reload_exactly(gguf_root, tmp_path):
    from peft import PeftModel, get_peft_model

    from peft_lota import LotaConfig
    from tiny_models import train_steps

    path = build_gguf("llama", gguf_root)
    model = get_peft_model(load_gguf(path), LotaConfig(r=4, init_seed=0, train_scales=True))
    train_steps(model, X)
    expected = logits(model)
    model.save_pretrained(tmp_path / "adapter")
    again = PeftModel.from_pretrained(load_gguf(path), tmp_path / "adapter")
    assert torch.equal(logits(again), expected)
    # the file one ships: the scales' and offsets' changes as fp16 steps (integers), no latent values
    model.peft_config["default"].save_latents = False
    model.save_pretrained(tmp_path / "shipped")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "shipped" / "adapter_model.safetensors")
    offsets = [v for k, v in saved.items() if k.endswith("lota_offsets")]
    assert offsets and not any(v.is_floating_point() for v in offsets) and not any("latent" in k for k in saved)
    assert torch.equal(logits(PeftModel.from_pretrained(load_gguf(path), tmp_path / "shipped")), expected)
    layer = next(m for m in model.modules() if hasattr(m, "scales_after") and m.quant.layer.qtype == "Q4_1")
    state = layer.quant.read()
    scales = layer.scales_after(state, ["default"])
    assert not torch.equal(scales, state.scales) and torch.equal(scales.half().float(), scales)  # trained, fp16


def test_two_adapters_with_trained_offsets_merge_together_or_in_turn_as_they_compute(gguf_root):
    """Each adapter's offsets move in units of the scales before it: the forward with both active, one merge of both
    and two merges in turn write the same blocks; a group whose scale is 0 keeps its offset."""
    from peft import get_peft_model

    from peft_lota import LotaConfig
    from tiny_models import train_steps

    path = build_gguf("llama", gguf_root)
    models = []
    for _ in range(3):
        torch.manual_seed(0)
        model = get_peft_model(load_gguf(path), LotaConfig(r=4, init_seed=0))
        model.add_adapter("second", LotaConfig(r=4, init_seed=1))
        model.base_model.set_adapter(["default", "second"])
        train_steps(model, X)
        models.append(model)
    assert all(torch.equal(logits(m), logits(models[0])) for m in models[1:])  # (the same training, three times)
    both = logits(models[0])
    models[0].merge_adapter(["default", "second"])
    models[1].merge_adapter(["default"])
    models[1].merge_adapter(["second"])
    assert torch.equal(logits(models[0]), both) and torch.equal(logits(models[1]), both)
    a, b = qblocks(models[0].merge_and_unload()), qblocks(models[1].merge_and_unload())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a zero scale: the multiplier cannot move the offset (a saved adapter of steps could not say it did)
    layer = next(m for m in models[2].modules() if hasattr(m, "offsets_after") and m.lota_offsets)
    state = layer.quant.read()
    zeroed = state.replace(scales=torch.where(torch.arange(state.scales.shape[1]) == 0, 0.0, state.scales))
    with torch.no_grad():
        layer.lota_offsets["default"].zero_()
        assert torch.equal(layer.offsets_after(zeroed, ["default"])[:, 0], state.offsets[:, 0])


def test_merge_lora_of_a_dense_lora_writes_a_gguf_that_reloads_exactly(gguf_root, tmp_path):
    from peft import LoraConfig, get_peft_model

    import peft_lota

    path = build_gguf("qwen2", gguf_root)
    lora = get_peft_model(dense(path), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                  init_lora_weights=False))
    lora.save_pretrained(tmp_path / "lora")
    calib = [torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    merged = peft_lota.merge_lora(load_gguf(path), calib, lora=tmp_path / "lora", progress=False)
    expected = logits(merged)
    merged.save_pretrained(tmp_path / "merged")
    written = tmp_path / "merged" / path.name
    assert check_written_gguf(path, written, merged) > 0
    assert torch.equal(logits(load_gguf(written)), expected)
    assert torch.equal(logits(dense(written)), expected)


# ---- what a save refuses, and what it never touches -------------------------------------------------------

def test_save_refuses_the_source_file_a_changed_frozen_tensor_and_an_unmerged_model(gguf_root, tmp_path):
    from peft import get_peft_model

    from peft_lota import LotaConfig

    path = build_gguf("llama", gguf_root)
    copy = tmp_path / path.name
    copy.write_bytes(path.read_bytes())
    model = load_gguf(copy)
    with pytest.raises(ValueError, match="is the file the model was loaded from"):
        write_gguf(model, copy)
    with pytest.raises(ValueError, match="is a directory"):
        write_gguf(model, tmp_path)
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)  # a tensor a save copies from the file: the change would be lost
    with pytest.raises(ValueError, match="model.norm.weight differs from the file"):
        write_gguf(model, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists() and sorted(os.listdir(tmp_path)) == [path.name]
    peft_model = get_peft_model(load_gguf(copy), LotaConfig(r=4))
    with pytest.raises(ValueError, match="merge_and_unload"):
        write_gguf(peft_model.base_model.model, tmp_path / "out.gguf")
    # the source changed since the load: its untouched tensors can no longer be copied from it
    model = load_gguf(copy)
    copy.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(ValueError, match="changed or disappeared"):
        write_gguf(model, tmp_path / "out.gguf")
    assert copy.read_bytes() == path.read_bytes() + b"\0"


# ---- the command line ------------------------------------------------------------------------------------

def test_cli_merges_a_lota_adapter_into_a_gguf_file_and_refuses_what_it_must(gguf_root, tmp_path, capsys):
    from peft import get_peft_model

    from peft_lota import LotaConfig, cli
    from tiny_models import train_steps

    path = build_gguf("llama", gguf_root)
    model = get_peft_model(load_gguf(path), LotaConfig(r=4, init_seed=0))
    train_steps(model, X)
    expected = logits(model)
    model.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "merged.gguf"
    assert cli.main(["merge", str(path), str(tmp_path / "adapter"), str(out)]) == 0
    table = capsys.readouterr().out
    assert f"{out} (gguf" in table and "reloaded logits == merged                True" in table
    assert torch.equal(logits(load_gguf(out)), expected)
    assert cli.main(["inspect", str(out)]) == 0
    assert "Q4_1" in capsys.readouterr().out
    assert cli.main(["verify", str(out), "--against", str(tmp_path / "adapter"), "--base", str(path)]) == 0
    assert "logits == the adapter model's  True" in capsys.readouterr().out
    assert cli.main(["verify", str(out), "--against", str(path)]) == 1  # not the base: said, exit 1
    capsys.readouterr()
    # an existing OUT is never overwritten; --stream and a GGUF OUT for a non-GGUF base are refused
    before = out.read_bytes()
    assert cli.main(["merge", str(path), str(tmp_path / "adapter"), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == before
    assert cli.main(["merge", str(path), str(tmp_path / "adapter"), str(tmp_path / "b.gguf"), "--stream",
                     "--format", "gptq"]) == 2
    assert "drop" in capsys.readouterr().err and not (tmp_path / "b.gguf").exists()
    source = path.read_bytes()
    assert cli.main(["merge", str(path), str(tmp_path / "adapter"), str(path)]) == 2  # the base itself
    assert path.read_bytes() == source
    # the folder route (save_pretrained): OUT/<the base's file name>
    assert cli.main(["merge", str(path), str(tmp_path / "adapter"), str(tmp_path / "folder")]) == 0
    assert (tmp_path / "folder" / path.name).read_bytes() == out.read_bytes()


@pytest.mark.parametrize("arch,types,method", tiered(
    [("llama", None, "lota"), ("qwen2", None, "lota"), ("llama", K_TYPES, "lota"), ("qwen2", None, "l4q")],
    [("llama", K_TYPES, "lota"), ("qwen2", None, "l4q")], unpack=True,
    ids=lambda c: f"{c[0]}-{'kquants' if c[1] else 'mixed'}-{c[2]}"))
def test_the_streaming_merge_writes_the_in_memory_merges_bytes(gguf_root, tmp_path, capsys, arch, types, method):
    """`merge --stream` on a GGUF file (the model never built, layers merged a group at a time) writes byte for byte
    the file the in-memory merge writes: Llama's permuted q/k, Qwen2's biases, the K-quant mix, LoTA and L4Q."""
    from peft import get_peft_model

    from peft_lota import L4QConfig, LotaConfig, cli
    from peft_lota.stream_gguf import merge_gguf
    from tiny_models import train_steps

    kwargs = {} if types is None else dict(types=types, dims=(256, 512))
    path = build_gguf(arch, gguf_root, **kwargs)
    config = LotaConfig(r=4, init_seed=0) if method == "lota" else L4QConfig(r=4, init_seed=0)
    model = get_peft_model(load_gguf(path), config)
    train_steps(model, X)
    model.save_pretrained(tmp_path / "adapter")
    in_memory = write_gguf(model.merge_and_unload(), tmp_path / "in-memory.gguf")
    report = merge_gguf(path, tmp_path / "adapter", tmp_path / "streamed.gguf", count_codes=True, group=3,
                        progress=False)
    assert (tmp_path / "streamed.gguf").read_bytes() == in_memory.read_bytes()
    assert report.layers == report.verified_tensors == sum(isinstance(m, GGUFLinear) for m in load_gguf(path).modules()
                                                           if getattr(m, "tensor_name", "").startswith("blk."))
    assert report.codes_moved > 0
    if types is None and arch == "llama":  # the command line: the table, the logits check; refusals
        out = tmp_path / "cli.gguf"
        assert cli.main(["merge", str(path), str(tmp_path / "adapter"), str(out), "--stream"]) == 0
        table = capsys.readouterr().out
        assert "reloaded logits == adapter logits" in table and table.rstrip().endswith("True")
        assert out.read_bytes() == in_memory.read_bytes()
        other = build_gguf("qwen2", gguf_root)  # same names, other model: the adapter's shapes or layers differ
        with pytest.raises(ValueError):
            merge_gguf(path, tmp_path / "adapter", path, progress=False)  # the base itself
        assert cli.main(["merge", str(other), str(tmp_path / "adapter"), str(tmp_path / "x.gguf"), "--stream"]) != 0
        assert not (tmp_path / "x.gguf").exists()
        cut = tmp_path / "cut.gguf"  # a download that stopped half way
        cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        assert cli.main(["merge", str(cut), str(tmp_path / "adapter"), str(tmp_path / "y.gguf"), "--stream"]) == 2
        assert "damaged or incomplete" in capsys.readouterr().err
        assert cli.main(["merge", str(tmp_path / "none.gguf"), str(tmp_path / "adapter"), str(tmp_path / "z.gguf"),
                         "--stream"]) == 2
        assert "no such GGUF file" in capsys.readouterr().err
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") or p.name in ("y.gguf", "z.gguf")]


def test_a_stock_trainer_trains_it_and_an_untrained_save_is_the_source_file(gguf_root, tmp_path):
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    from peft_lota import LotaConfig

    path = build_gguf("qwen2", gguf_root)
    base = load_gguf(path)
    base.save_pretrained(tmp_path / "untouched")  # no adapter: the very bytes of the source
    assert (tmp_path / "untouched" / path.name).read_bytes() == path.read_bytes()
    model = get_peft_model(base, LotaConfig(r=4, init_seed=0))
    data = [{"input_ids": x, "labels": x} for x in X]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=2,
                             learning_rate=2e-3, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=data).train()  # transformers' own refusal of GGUF does not apply
    expected = logits(model)
    merged = model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    assert torch.equal(logits(load_gguf(tmp_path / "merged" / path.name)), expected)
    assert (tmp_path / "merged" / path.name).read_bytes() != path.read_bytes()


def test_a_save_never_replaces_the_source_and_keeps_what_the_file_cannot_hold_out(gguf_root, tmp_path):
    from peft import get_peft_model

    from peft_lota import LotaConfig, convert
    from tiny_models import train_steps

    path = build_gguf("llama", gguf_root, types=("Q8_0", "Q4_1"))
    (tmp_path / "src").mkdir()
    copy = tmp_path / "src" / path.name
    copy.write_bytes(path.read_bytes())
    model = load_gguf(copy)
    with pytest.raises(ValueError, match="the file the model was loaded from"):
        model.save_pretrained(tmp_path / "src")  # its own folder: the save would replace it
    assert copy.read_bytes() == path.read_bytes()
    # loaded in bf16 and moved to float32: no change (the embedding holds the values it was loaded with)
    model = load_gguf(copy, dtype=torch.bfloat16).to(torch.float32)
    assert write_gguf(model, tmp_path / "same.gguf").read_bytes() == path.read_bytes()
    # a trained output head (modules_to_save on a head tied to the embedding) has no place in the file: refused
    tied = build_gguf("qwen2", gguf_root, types=("Q8_0", "Q4_1"), tied=True)
    peft_model = get_peft_model(load_gguf(tied), LotaConfig(r=4, init_seed=0, modules_to_save=["lm_head"]))
    train_steps(peft_model, X)
    with pytest.raises(ValueError, match="lm_head.weight is not a tensor of the source file any more"):
        write_gguf(peft_model.merge_and_unload(), tmp_path / "head.gguf")
    assert not (tmp_path / "head.gguf").exists()
    untrained = load_gguf(tied)  # tied and untouched: saved as it came
    assert write_gguf(untrained, tmp_path / "tied.gguf").read_bytes() == tied.read_bytes()
    # convert: a GGUF grid (float32 products, Q4_1's offsets) into GPTQ would change the model: refused
    problems = [convert.conversion_problem(n, m._peft_lota_weights.read(), m._peft_lota_weights.grid_settings(),
                                           __import__("peft_lota.formats", fromlist=["by_name"]).by_name("gptq"))
                for n, m in load_gguf(copy).named_modules() if isinstance(m, GGUFLinear)]
    assert all(p and ("float offset" in p or "float32 products" in p) for p in problems)


# ---- K-quants (the Q4_K_M mix): codes move, scales stay -------------------------------------------------------

@pytest.mark.parametrize("name", K_QUANTS)
def test_k_quant_super_blocks_decode_as_gguf_and_take_any_codes_back(name):
    from tiny_models import _random_k_blocks

    bt, kind = BLOCK_TYPES[name], getattr(gguf.GGMLQuantizationType, name)
    raw = torch.from_numpy(_random_k_blocks(name, 8, 512, seed=3))

    def weight(raw):
        codes, scales, offsets = bt.grid(raw)
        g = torch.arange(512) // bt.group
        w = scales[:, g] * (codes.to(torch.int16) - bt.zero).float()
        return w if offsets is None else w + offsets[:, g]

    assert torch.equal(weight(raw), torch.from_numpy(dequantize(raw.numpy(), kind)))
    codes = bt.grid(raw)[0]
    assert torch.equal(bt.write(raw, codes, None), raw)
    moved = torch.randint(0, bt.maxq + 1, codes.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    written = bt.write(raw, moved, None)
    assert torch.equal(bt.grid(written)[0], moved)
    assert torch.equal(torch.from_numpy(dequantize(written.numpy(), kind)), weight(written))
    assert torch.equal(written.view(8, 2, -1)[..., [i for i in range(bt.nbytes) if not
                                                    bt.code_bytes[0] <= i < bt.code_bytes[1]]],
                       raw.view(8, 2, -1)[..., [i for i in range(bt.nbytes) if not
                                                bt.code_bytes[0] <= i < bt.code_bytes[1]]])  # scales untouched
    with pytest.raises(ValueError, match="codes only"):
        bt.write(raw, moved, torch.ones(8, 512 // bt.group, dtype=torch.float16))


