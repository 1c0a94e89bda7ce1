"""Export of merged models as standard GPTQ checkpoints (peft_lota/export/).

"Exact" here means: reloaded with stock `from_pretrained`, every GPTQ buffer is bit-identical to the
model that was saved (true zero points compared as gptqmodel holds them in memory, v2) and the logits
under the gptq_torch kernel are equal with torch.equal.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from peft_lota import export
from peft_lota.formats import gptq
from peft_lota.export import attach_export, push_checkpoint_to_hub, save_checkpoint
from tiny_models import Spec, load_gptq
from tiny_models import logits as tiny_logits

V1_ASYM = Spec("llama", 4, sym=False, desc_act=True, fmt="gptq")
V2_SYM_BIAS = Spec("qwen2", 4, sym=True, desc_act=False, fmt="gptq_v2")
V1_SYM_3BIT = Spec("llama", 3, sym=True, desc_act=False, fmt="gptq")
LOTA_INFO = {"base_model": "org/tiny-llama", "bits": 4, "group_size": 32, "license": "apache-2.0",
             "method": "LoTA-QAF", "method_url": "https://arxiv.org/abs/2505.18724", "method_tag": "lota-qaf",
             "summary": "Merged losslessly on the integer grid.",
             "settings": {"LoTA rank r": 64, "LoTA threshold omega": 48, "LoTA offset mode": "none"}}


def gptq_layers(model):
    return gptq.gptq_layers(model)


def buffers(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, layer in gptq_layers(model):
        for key in ("qweight", "qzeros", "scales", "g_idx", "bias"):
            if getattr(layer, key, None) is not None:
                out[f"{name}.{key}"] = getattr(layer, key).detach().clone()
    return out


def assert_same_buffers(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


IDS = torch.randint(4, 512, (2, 24), generator=torch.Generator().manual_seed(0))


def logits(model) -> torch.Tensor:
    return tiny_logits(model, IDS)


def saved_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())["quantization_config"]


def true_zeros(layer) -> torch.Tensor:
    """Unpacked true zero points of a gptq_torch layer (it holds v2 in memory for either checkpoint format)."""
    return gptq.unpack_qzeros(layer.qzeros, layer.bits)


def set_zero(layer, group: int, col: int, value: int):
    z = true_zeros(layer).to(torch.int16)
    z[group, col] = value
    layer.qzeros.data = gptq.pack_qzeros(z, layer.bits)
    if callable(getattr(layer, "clear_weight_cache", None)):
        layer.clear_weight_cache()


def tree(path: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `path` (symlinks by target)."""
    out = {}
    for p in sorted(path.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(path))] = "->" + os.readlink(p)
        elif p.is_file():
            out[str(p.relative_to(path))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def copy_tokenizer(src: Path, dst: Path):
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(p, dst / p.name)


# ---- (a) exact round trips -------------------------------------------------------------------------

@pytest.mark.parametrize("spec", [V1_ASYM, V2_SYM_BIAS, V1_SYM_3BIT], ids=lambda s: s.slug())
def test_round_trip_is_exact(gptq_dir, tmp_path, spec):
    model = load_gptq(gptq_dir(spec))
    before, expected = buffers(model), logits(model)
    out = save_checkpoint(model, tmp_path / "out")

    qc = saved_config(out)
    min_zero = min(int(true_zeros(m).min()) for _, m in gptq_layers(model))
    assert qc["format"] == qc["checkpoint_format"] == ("gptq" if min_zero >= 1 else "gptq_v2")
    assert qc["sym"] is spec.sym and qc["backend"] == "auto"
    reloaded = load_gptq(out)
    assert_same_buffers(before, buffers(reloaded))
    assert torch.equal(expected, logits(reloaded))
    if spec.bits == 3:  # checks the v1 file independently of gptqmodel: stored = z - 1
        from safetensors.torch import load_file

        name, layer = gptq_layers(model)[0]
        stored = load_file(out / "model.safetensors")[f"{name}.qzeros"]
        assert torch.equal(gptq.unpack_qzeros(stored, 3).to(torch.int16) + 1, true_zeros(layer).to(torch.int16))


# ---- (b) merged codes, (c) changed zero points --------------------------------------------------------

def test_changed_codes_survive(gptq_dir, tmp_path):
    model = load_gptq(gptq_dir(V1_ASYM))
    original = logits(model)
    g = torch.Generator().manual_seed(1)
    for _, layer in gptq_layers(model)[:4]:
        codes = gptq.unpack_qweight(layer.qweight, layer.bits).to(torch.int16)
        maxq = (1 << layer.bits) - 1
        step = torch.randint(-1, 2, codes.shape, generator=g, dtype=torch.int16)
        step[(codes + step < 0) | (codes + step > maxq)] = 0  # LoTA's edge mask: stay on the grid
        layer.qweight.data = gptq.pack_qweight(codes + step, layer.bits)
        layer.clear_weight_cache()
    merged, expected = buffers(model), logits(model)
    assert not torch.equal(original, expected)  # the change is visible, so the round trip below means something

    out = save_checkpoint(model, tmp_path / "out")
    reloaded = load_gptq(out)
    assert_same_buffers(merged, buffers(reloaded))
    assert torch.equal(expected, logits(reloaded))


def test_zero_point_of_zero_is_written_as_gptq_v2_with_warning(gptq_dir, tmp_path, caplog):
    model = load_gptq(gptq_dir(V1_ASYM))
    set_zero(gptq_layers(model)[0][1], group=0, col=5, value=0)
    merged, expected = buffers(model), logits(model)

    with caplog.at_level(logging.WARNING, logger="peft_lota.export"):
        out = save_checkpoint(model, tmp_path / "out")
    assert "gptq_v2" in caplog.text and "vLLM" in caplog.text
    assert saved_config(out)["format"] == "gptq_v2"
    assert json.loads((out / "quantize_config.json").read_text())["format"] == "gptq_v2"
    reloaded = load_gptq(out)
    assert_same_buffers(merged, buffers(reloaded))
    assert torch.equal(expected, logits(reloaded))


def test_asymmetric_zeros_in_1_to_maxq_are_written_as_v1(gptq_dir, tmp_path):
    from safetensors.torch import load_file

    model = load_gptq(gptq_dir(V1_ASYM))  # this fixture has a few true zero points of 0
    for _, layer in gptq_layers(model):
        z = true_zeros(layer).to(torch.int16)
        layer.qzeros.data = gptq.pack_qzeros(z.clamp(min=1), layer.bits)
        layer.clear_weight_cache()
    name, layer = gptq_layers(model)[0]
    maxq = (1 << layer.bits) - 1
    set_zero(layer, group=0, col=1, value=maxq)  # its v1 neighbour-carry case: stored maxq - 1, never maxq
    merged, expected = buffers(model), logits(model)

    out = save_checkpoint(model, tmp_path / "out")
    assert (saved_config(out)["format"], saved_config(out)["sym"]) == ("gptq", False)
    stored = gptq.unpack_qzeros(load_file(out / "model.safetensors")[f"{name}.qzeros"], layer.bits)
    assert int(stored[0, 1]) == maxq - 1
    reloaded = load_gptq(out)
    assert_same_buffers(merged, buffers(reloaded))
    assert torch.equal(expected, logits(reloaded))


def test_symmetric_checkpoint_with_a_changed_zero_is_saved_asymmetric(gptq_dir, tmp_path):
    model = load_gptq(gptq_dir(V2_SYM_BIAS))
    layer = gptq_layers(model)[3][1]
    set_zero(layer, group=1, col=7, value=(1 << (layer.bits - 1)) + 1)
    merged, expected = buffers(model), logits(model)

    out = save_checkpoint(model, tmp_path / "out")
    qc = saved_config(out)
    assert qc["sym"] is False and qc["format"] == "gptq"
    assert json.loads((out / "quantize_config.json").read_text())["sym"] is False
    reloaded = load_gptq(out)
    assert_same_buffers(merged, buffers(reloaded))
    assert torch.equal(expected, logits(reloaded))


# ---- (d) configs ---------------------------------------------------------------------------------

def test_configs_are_clean_and_the_model_is_not_mutated(gptq_dir, tmp_path):
    model = load_gptq(gptq_dir(V1_ASYM))
    config_before = model.config.to_dict()
    before = buffers(model)
    out = save_checkpoint(model, tmp_path / "out")

    qc = saved_config(out)
    assert qc["backend"] == "auto" and qc["dataset"] is None and "peft_lota:" in " ".join(qc["meta"]["quantizer"])
    qz = json.loads((out / "quantize_config.json").read_text())
    assert {k: qz[k] for k in ("bits", "group_size", "desc_act", "sym", "format", "checkpoint_format", "quant_method",
                               "pack_dtype", "lm_head")} == {
        "bits": 4, "group_size": 32, "desc_act": True, "sym": False, "format": qc["format"],
        "checkpoint_format": qc["format"], "quant_method": "gptq", "pack_dtype": "int32", "lm_head": False}
    from gptqmodel import QuantizeConfig  # what GPTQModel's tools read

    parsed = QuantizeConfig.from_pretrained(str(out))
    assert (parsed.bits, parsed.group_size, parsed.desc_act, parsed.sym, getattr(parsed.format, "value", None)) == (
        4, 32, True, False, qc["format"])

    # The in-memory model is as it was: config (backend, format, dtype, ...) and every buffer.
    assert model.config.to_dict() == config_before
    assert model.config.quantization_config.backend == "gptq_torch"
    assert "get_state_dict_and_metadata" not in vars(model.hf_quantizer)
    assert_same_buffers(before, buffers(model))

    # The plainest stock load (default kernel, no quantization_config) reads the same buffers.
    stock = load_gptq(out, backend=None)
    assert_same_buffers(before, buffers(stock))


def test_gptqmodel_load_reads_the_checkpoint(gptq_dir, tmp_path):
    from gptqmodel import BACKEND, GPTQModel

    src = gptq_dir(V1_ASYM)
    model = load_gptq(src)
    out = save_checkpoint(model, tmp_path / "out")
    copy_tokenizer(src, out)  # GPTQModel.load also loads a tokenizer
    # GPTQModel's TorchLinear runs in fp16/bf16 only: compare with a transformers fp16 load of the same folder.
    loaded = GPTQModel.load(str(out), device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
    assert_same_buffers(buffers(model), buffers(loaded.model))
    assert torch.equal(logits(load_gptq(out, dtype=torch.float16)), logits(loaded.model))


# ---- (e) what a save touches, and crashes -----------------------------------------------------------

USER_FILES = {"notes.txt": b"mine", "README.md": b"# my own card\n", "runs/log.txt": b"log",
              "model_backup.safetensors": b"user weights", "model-fp16-original.safetensors": b"more user weights",
              "pytorch_model.bin": b"an old torch checkpoint"}


def _fill_target(target: Path, src: Path):
    copy_tokenizer(src, target)
    for name, data in USER_FILES.items():
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        (target / name).write_bytes(data)


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".") and p.name != export.MANIFEST]


def _user_tree(target: Path) -> dict:
    return {k: v for k, v in tree(target).items() if not k.startswith((".", "model.safetensors", "config.json",
                                                                        "generation_config", "quantize_config"))
            and not (k.startswith("model-0") and ".safetensors" in k) and k != "README.md"}


def test_failure_mid_write_leaves_target_untouched(gptq_dir, tmp_path, monkeypatch):
    import transformers.modeling_utils as modeling_utils

    src = gptq_dir(V1_ASYM)
    target = tmp_path / "out"
    _fill_target(target, src)
    snapshot = tree(target)
    model = load_gptq(src)

    def half_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a shard")
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(modeling_utils, "safe_save_file", half_write)
        with pytest.raises(OSError, match="disk full"):
            save_checkpoint(model, target, card_info=LOTA_INFO)
    assert tree(target) == snapshot and _leftovers(target) == []


def test_existing_folder_keeps_every_file_it_did_not_write_and_its_mode(gptq_dir, tmp_path, caplog):
    src = gptq_dir(V1_ASYM)
    target = tmp_path / "out"
    _fill_target(target, src)
    target.chmod(0o750)
    user = tree(target)
    parent_mtime = tmp_path.stat().st_mtime_ns
    model = load_gptq(src)
    expected = logits(model)

    with caplog.at_level(logging.WARNING, logger="peft_lota.export"):
        save_checkpoint(model, target, card_info=LOTA_INFO, max_shard_size="100KB")
    assert "overwrite_readme=True" in caplog.text  # the user's README.md was kept
    after = tree(target)
    assert {k: after[k] for k in user} == user  # every user file byte for byte, the user's weights included
    assert (target.stat().st_mode & 0o777) == 0o750
    assert tmp_path.stat().st_mtime_ns == parent_mtime  # nothing created or renamed beside the target
    shards = sorted(p.name for p in target.glob("model-0*.safetensors"))
    assert len(shards) > 1 and json.loads((target / "model.safetensors.index.json").read_text())["weight_map"]
    assert torch.equal(expected, logits(load_gptq(target)))
    assert _leftovers(target) == []

    # Saved again unsharded: the shards of our previous save (and only they) are removed.
    save_checkpoint(model, target, card_info=LOTA_INFO, overwrite_readme=True)
    assert export.CARD_MARKER in (target / "README.md").read_text()
    assert not list(target.glob("model-0*.safetensors")) and not (target / "model.safetensors.index.json").exists()
    after = tree(target)
    assert {k: after[k] for k in user if k != "README.md"} == {k: v for k, v in user.items() if k != "README.md"}
    save_checkpoint(model, target, card_info={**LOTA_INFO, "settings": {"LoTA rank r": 32}})
    assert "| LoTA rank r | 32 |" in (target / "README.md").read_text()
    assert torch.equal(expected, logits(load_gptq(target)))


def test_a_fresh_folder_gets_the_usual_mode_and_dot_saves_in_place(gptq_dir, tmp_path, monkeypatch):
    model = load_gptq(gptq_dir(V1_ASYM))
    out = save_checkpoint(model, tmp_path / "fresh")
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~umask  # not mkdtemp's 0700
    target = tmp_path / "cwd"
    target.mkdir()
    monkeypatch.chdir(target)
    model.save_pretrained = None  # (plain save_checkpoint below)
    save_checkpoint(load_gptq(gptq_dir(V1_ASYM)), ".")
    assert Path.cwd() == target and (target / "config.json").exists()  # the working directory survives
    assert torch.equal(logits(load_gptq(target)), logits(load_gptq(gptq_dir(V1_ASYM))))


def test_a_users_single_weight_file_that_would_shadow_a_sharded_save_is_refused(gptq_dir, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"the user's own")
    snapshot = tree(target)
    with pytest.raises(FileExistsError, match="would be loaded instead"):
        save_checkpoint(load_gptq(gptq_dir(V1_ASYM)), target, max_shard_size="100KB")
    assert tree(target) == snapshot and _leftovers(target) == []


def test_leftovers_of_crashed_saves_are_cleaned_up_and_nothing_beside_the_folder_is_touched(gptq_dir, tmp_path):
    model = load_gptq(gptq_dir(V1_ASYM))
    target = tmp_path / "out"
    target.mkdir()
    (target / (export.STAGING + "abc")).mkdir()  # a save killed while writing
    (target / (export.STAGING + "abc") / "model.safetensors").write_bytes(b"x" * 100)
    for sibling in (".out.tmp-123", ".out.old-456"):  # folders beside the target are the user's, whatever their names
        (tmp_path / sibling / "out").mkdir(parents=True)
        (tmp_path / sibling / "out" / "keep.txt").write_text("mine")
    beside = tree(tmp_path / ".out.tmp-123"), tree(tmp_path / ".out.old-456")
    save_checkpoint(model, target)
    assert _leftovers(target) == [] and sorted(p.name for p in tmp_path.iterdir()) == [".out.old-456", ".out.tmp-123", "out"]
    assert (tree(tmp_path / ".out.tmp-123"), tree(tmp_path / ".out.old-456")) == beside


def _victims(tmp_path: Path) -> dict:
    """Files and a folder outside the target that a forged journal or manifest names."""
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "data.txt").write_text("precious")
    (tmp_path / "f").write_text("precious too")
    return tree(tmp_path / "x") | {"f": (tmp_path / "f").read_text()}


def _still_there(tmp_path: Path, victims: dict) -> bool:
    return (tmp_path / "f").exists() and tree(tmp_path / "x") | {"f": (tmp_path / "f").read_text()} == victims


@pytest.mark.parametrize("forged", [{"staged": "../x"}, {"staged": "ABS"}, {"stale": ["../f"]}, {"stale": ["ABS_F"]},
                                    {"moves": ["../f"]}, {"stale": ["notes.txt"]}, "not json"])
def test_a_forged_journal_is_refused_and_changes_nothing(gptq_dir, tmp_path, forged):
    """A folder downloaded from the Hub can hold any .peft_lota-commit.json: it must never make a save (or recover)
    delete, rename or write anything outside the folder, nor any file in it that peft_lota did not write."""
    victims = _victims(tmp_path)
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("the user's")
    (target / (export.STAGING + "1")).mkdir()
    plan = {"staged": export.STAGING + "1", "moves": [], "switch": "model.safetensors", "configs": [], "aside": [],
            "drop_single": False, "stale": [], "files": []}
    if isinstance(forged, dict):
        forged = {k: [str(tmp_path / "f") if n == "ABS_F" else n for n in v] if isinstance(v, list)
                  else str(tmp_path / "x") if v == "ABS" else v for k, v in forged.items()}
        plan.update(forged)
        text = json.dumps(plan)
    else:
        text = forged
    (target / export.JOURNAL).write_text(text)
    snapshot = tree(target)
    with pytest.raises(export.UnsafeFolderError, match="not a commit journal peft_lota wrote"):
        save_checkpoint(load_gptq(gptq_dir(V1_ASYM)), target)
    with pytest.raises(export.UnsafeFolderError):
        export.recover(target)
    assert _still_there(tmp_path, victims) and tree(target) == snapshot
    assert (target / (export.STAGING + "1")).is_dir()


def test_a_forged_journal_with_a_staging_folder_of_its_own_is_refused(gptq_dir, tmp_path):
    """Names that look like a commit's, and a staging folder shipped beside the journal (with a link out of the
    folder in it): not the folder a save of ours made, so nothing is replayed, removed, moved or chmod-ed."""
    secret = tmp_path / "secret"
    secret.write_text("outside")
    secret.chmod(0o600)
    target = tmp_path / "out"
    target.mkdir()
    (target / "model.safetensors").write_text("the user's weights")
    (target / "config.json").write_text("{}")
    staged = target / (export.STAGING + "evil")
    staged.mkdir()
    (staged / "config.json").write_text("forged")
    (staged / "model.safetensors").symlink_to(secret)
    plan = {"staged": staged.name, "staged_id": [0, 0], "moves": [], "switch": "model.safetensors",
            "configs": ["config.json"], "aside": [], "drop_single": False, "stale": ["generation_config.json"],
            "files": ["config.json", "model.safetensors"], "remove_ids": {}}
    (target / export.JOURNAL).write_text(json.dumps(plan))
    snapshot = tree(target)
    with pytest.raises(export.UnsafeFolderError):
        export.recover(target)
    with pytest.raises(export.UnsafeFolderError):
        save_checkpoint(load_gptq(gptq_dir(V1_ASYM)), target)
    assert tree(target) == snapshot and secret.read_text() == "outside" and secret.stat().st_mode & 0o777 == 0o600


def test_shards_of_an_earlier_version_or_a_copied_folder_are_replaced_and_user_files_said(gptq_dir, tmp_path, caplog):
    model = load_gptq(gptq_dir(V1_ASYM))
    first = save_checkpoint(model, tmp_path / "first", max_shard_size="100KB")
    copied = tmp_path / "copied"  # a copy: other inodes, so the manifest identifies nothing; the tagged shards do
    shutil.copytree(first, copied)
    old = sorted(p.name for p in copied.glob("model-0*.safetensors"))
    (copied / export.MANIFEST).write_text(json.dumps({"files": sorted(p.name for p in copied.iterdir())}))  # older
    save_checkpoint(model, copied, max_shard_size="100KB")
    new = sorted(p.name for p in copied.glob("model-0*.safetensors"))
    assert len(new) == len(old) and not set(new) & set(old)  # the old shards went, the new ones came
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with caplog.at_level(logging.WARNING, logger="peft_lota.export"):
        save_checkpoint(model, other)
    assert "replacing config.json in" in caplog.text and "which peft_lota did not write" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="peft_lota.export"):
        save_checkpoint(model, other)  # now they are ours
    assert "replacing" not in caplog.text


def test_a_special_file_in_the_folder_neither_hangs_nor_is_read(gptq_dir, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    os.mkfifo(target / "config.json")  # reading it would block forever
    (target / "README.md").symlink_to("/dev/zero")  # reading it would never end
    save_checkpoint(load_gptq(gptq_dir(V1_ASYM)), target, card_info=LOTA_INFO)
    assert (target / "config.json").is_file() and (target / "README.md").is_symlink()


def test_variant_is_refused(gptq_dir, tmp_path):
    with pytest.raises(ValueError, match="variant= is not supported"):
        save_checkpoint(load_gptq(gptq_dir(V1_ASYM)), tmp_path / "out", variant="v1")
    assert not (tmp_path / "out").exists()


def test_a_forged_or_linked_manifest_removes_nothing_and_is_never_written_through(gptq_dir, tmp_path, caplog):
    victims = _victims(tmp_path)
    model = load_gptq(gptq_dir(V1_ASYM))
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("the user's")
    (target / "model-00001-of-00002.safetensors").write_bytes(b"the user's own shard")
    names = ["../f", str(tmp_path / "f"), "../x", "notes.txt", "model-00001-of-00002.safetensors"]
    (target / export.MANIFEST).write_text(json.dumps({"files": names, "writer": "peft_lota"}))
    user = tree(target)
    with caplog.at_level(logging.WARNING, logger="peft_lota.export"):
        save_checkpoint(model, target)
    assert "is ignored: no file it lists is removed" in caplog.text
    assert _still_there(tmp_path, victims)
    assert {k: v for k, v in tree(target).items() if k in user and k != export.MANIFEST} == \
        {k: v for k, v in user.items() if k != export.MANIFEST}
    # A manifest of the right shape that names the user's files (with their true sizes) removes none of them.
    files = {n: [(target / n).stat().st_size, 0, 0] for n in ("notes.txt", "model-00001-of-00002.safetensors")}
    (target / export.MANIFEST).write_text(json.dumps({"files": list(files), "identity": files}))
    save_checkpoint(model, target)
    assert (target / "notes.txt").read_text() == "the user's"  # not a name a save writes
    assert (target / "model-00001-of-00002.safetensors").read_bytes() == b"the user's own shard"  # not the file a save wrote
    # A manifest that is a link to a file elsewhere is replaced by a file of its own, not written through.
    (target / export.MANIFEST).unlink()
    (target / export.MANIFEST).symlink_to(tmp_path / "f")
    save_checkpoint(model, target)
    assert _still_there(tmp_path, victims) and not (target / export.MANIFEST).is_symlink()
    assert torch.equal(logits(load_gptq(target)), logits(model))


def test_a_replaced_file_keeps_its_permissions(gptq_dir, tmp_path):
    model = load_gptq(gptq_dir(V1_ASYM))
    target = save_checkpoint(model, tmp_path / "out")
    umask = os.umask(0)
    os.umask(umask)
    assert {p.name: p.stat().st_mode & 0o777 for p in target.iterdir() if p.is_file()} == \
        {p.name: 0o666 & ~umask for p in target.iterdir() if p.is_file()}  # new files: the usual mode
    (target / "model.safetensors").chmod(0o644)
    (target / "config.json").chmod(0o640)
    save_checkpoint(model, target)
    assert (target / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert (target / "config.json").stat().st_mode & 0o777 == 0o640


def test_concurrent_saves_into_one_folder_wait_for_each_other(gptq_dir, tmp_path, monkeypatch, caplog):
    import threading

    path = gptq_dir(V2_SYM_BIAS)
    a, b, _ = _models_A_and_B(path)
    target = tmp_path / "out"
    target.mkdir()
    slow = threading.Event()

    def step(label):  # hold the first save inside its commit until the second one has started
        if not slow.is_set():
            slow.set()
            time.sleep(1.0)

    monkeypatch.setattr(export.transaction, "_commit_step", step)
    errors = []

    def save(model, shard):
        try:
            save_checkpoint(model, target, max_shard_size=shard)
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    first = threading.Thread(target=save, args=(a, "100KB"))
    first.start()
    slow.wait(60)
    with caplog.at_level(logging.WARNING, logger="peft_lota.export"):
        save(b, "50GB")
    first.join()
    assert errors == []
    assert "another process is saving into" in caplog.text
    written = json.loads((target / export.MANIFEST).read_text())["files"]
    assert sorted(p.name for p in target.iterdir() if not p.name.startswith(".")) == sorted(written)  # no orphans
    assert torch.equal(logits(load_gptq(target)), logits(b)) and _leftovers(target) == []


def _models_A_and_B(path: Path):
    """Two checkpoints of one model that differ in their codes (B) and in their config too (C: sym -> asym)."""
    a = load_gptq(path)
    b = load_gptq(path)
    layer = gptq_layers(b)[0][1]
    codes = gptq.unpack_qweight(layer.qweight, layer.bits)
    codes[:4] = (codes[:4].to(torch.int16) + 1).clamp(max=15).to(torch.uint8)
    layer.qweight.data = gptq.pack_qweight(codes, layer.bits)
    c = load_gptq(path)
    set_zero(gptq_layers(c)[1][1], 0, 0, 3)  # a symmetric checkpoint becomes asymmetric: config.json changes
    return a, b, c


@pytest.mark.slow
@pytest.mark.parametrize("old_shard,new_shard,new_model", [
    ("50GB", "50GB", "B"), ("50GB", "100KB", "B"), ("100KB", "50GB", "C"), ("100KB", "100KB", "C"), ("50GB", "50GB", "C")])
def test_a_crash_at_any_step_of_the_commit_leaves_the_old_or_the_new_checkpoint(gptq_dir, tmp_path, monkeypatch,
                                                                               old_shard, new_shard, new_model):
    """Kill the save before each change it makes to the folder in turn (>= 20 trials over the parameters): the
    folder then loads as the old checkpoint, or as the new one, or refuses to load and recover() completes it;
    it never loads old weights under a new config or the reverse."""
    path = gptq_dir(V2_SYM_BIAS)
    models = dict(zip("ABC", _models_A_and_B(path)))
    want = {k: logits(m) for k, m in models.items()}
    assert not torch.equal(want["A"], want[new_model])
    trial = 0
    while True:
        target = tmp_path / f"t{trial}"
        _fill_target(target, path)
        save_checkpoint(models["A"], target, max_shard_size=old_shard)
        user = _user_tree(target)
        calls = []

        def crash(label, k=trial):
            calls.append(label)
            if len(calls) > k:
                raise KeyboardInterrupt(f"killed before {label}")

        with monkeypatch.context() as m:
            m.setattr(export.transaction, "_commit_step", crash)
            try:
                save_checkpoint(models[new_model], target, max_shard_size=new_shard)
                finished = True
            except KeyboardInterrupt:
                finished = False
        try:
            got = logits(load_gptq(target))
            state = "old" if torch.equal(got, want["A"]) else "new" if torch.equal(got, want[new_model]) else "WRONG"
        except Exception:  # noqa: BLE001 - a folder without its config refuses to load
            state = "unloadable"
        assert state in ("old", "new") or (state == "unloadable" and (target / export.JOURNAL).exists()), (trial, calls)
        export.recover(target)  # what the next save into the folder does first
        journaled = finished or len(calls) > 1  # the journal is the commit's first step
        assert torch.equal(logits(load_gptq(target)), want[new_model] if journaled else want["A"]), (trial, calls)
        assert _user_tree(target) == user and _leftovers(target) == []
        if finished:
            break
        trial += 1
    assert trial >= 4  # every change the commit makes was interrupted once


# ---- model card --------------------------------------------------------------------------------------

def test_model_card_names_the_base_method_settings_and_refuses_a_contradiction(gptq_dir, tmp_path):
    model = load_gptq(gptq_dir(V2_SYM_BIAS))
    out = save_checkpoint(model, tmp_path / "out", card_info={**LOTA_INFO, "adapters": ["default"]})
    card = (out / "README.md").read_text()
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert 'base_model: "org/tiny-llama"' in front and "library_name: transformers" in front
    assert 'license: "apache-2.0"' in front
    assert all(f'- "{t}"' in front for t in ("gptq", "peft-lota", "lota-qaf"))
    assert "LoTA-QAF" in body and "peft_lota" in body and "integer grid" in body and "GPTQ 4-bit" in body
    for row in ("| bits | 4 |", "| group size | 32 |", "| LoTA rank r | 64 |", "| LoTA threshold omega | 48 |",
                "| LoTA offset mode | none |", "| adapters | default |", "| checkpoint format | `gptq` |"):
        assert row in body
    assert json.loads((out / "quantize_config.json").read_text())["bits"] == 4
    local = export.model_card({"base_model": "/data/my-model", "method": "LoTA-QAF"}, {"format": "GPTQ", "bits": 4})
    assert "base_model:" not in local.split("---")[1] and "`/data/my-model`" in local  # the Hub wants a repo id
    with pytest.raises(ValueError, match="bits"):
        save_checkpoint(model, tmp_path / "bad", card_info={**LOTA_INFO, "bits": 2})
    assert not (tmp_path / "bad").exists()
    assert not (save_checkpoint(model, tmp_path / "plain") / "README.md").exists()  # no card_info, no card


# ---- (f) the Hub, mocked ----------------------------------------------------------------------------

@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """Captures create_repo / upload_folder calls; uploaded folders are copied before they are deleted."""
    from huggingface_hub import HfApi

    calls = {"create_repo": [], "upload_folder": []}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"].append({"repo_id": repo_id, "token": self.token, **kwargs})
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, **kwargs):
        copy = tmp_path / f"uploaded-{len(calls['upload_folder'])}"
        allow = kwargs.get("allow_patterns")
        shutil.copytree(kwargs["folder_path"], copy,
                        ignore=None if allow is None else lambda d, names: [n for n in names if n not in allow])
        calls["upload_folder"].append({**kwargs, "copy": copy})
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_push_to_hub_uploads_a_loadable_checkpoint(gptq_dir, fake_hub):
    src = gptq_dir(V1_ASYM)
    model = load_gptq(src)
    expected = logits(model)
    result = push_checkpoint_to_hub(model, "me/tiny-lota", card_info=LOTA_INFO, private=True, token="tok",
                                         revision="dev", create_pr=True)
    assert result == "commit-info"
    (repo,) = fake_hub["create_repo"]
    assert repo["repo_id"] == "me/tiny-lota" and repo["exist_ok"] and repo["private"] and repo["token"] == "tok"
    (up,) = fake_hub["upload_folder"]
    assert (up["repo_id"], up["revision"], up["create_pr"]) == ("me/tiny-lota", "dev", True)
    assert "model*.safetensors" in up["delete_patterns"]  # no stale shard of an older upload survives
    folder = up["copy"]
    assert not Path(up["folder_path"]).exists()  # the temporary folder is cleaned up
    assert "peft-lota" in (folder / "README.md").read_text() and (folder / "quantize_config.json").exists()
    copy_tokenizer(src, folder)
    assert torch.equal(expected, logits(load_gptq(folder)))


# ---- merged-model methods ------------------------------------------------------------------------

def test_attached_methods_write_correct_checkpoints(gptq_dir, tmp_path, fake_hub):
    from transformers import PreTrainedModel

    model = attach_export(load_gptq(gptq_dir(V1_ASYM)), LOTA_INFO)
    assert type(model).save_pretrained is PreTrainedModel.save_pretrained  # only this instance changed
    expected = logits(model)

    model.save_pretrained(tmp_path / "out", safe_serialization=True)
    assert saved_config(tmp_path / "out")["backend"] == "auto" and (tmp_path / "out" / "README.md").exists()
    assert torch.equal(expected, logits(load_gptq(tmp_path / "out")))
    with pytest.raises(ValueError, match="safe_serialization"):
        model.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    assert not (tmp_path / "pickled").exists()

    model.push_to_hub("me/repo", private=False, tags=["code"])
    up = fake_hub["upload_folder"][-1]
    assert up["repo_id"] == "me/repo" and '- "code"' in (up["copy"] / "README.md").read_text()

    model.save_pretrained(tmp_path / "pushed", push_to_hub=True, repo_id="me/other", commit_message="msg")
    up = fake_hub["upload_folder"][-1]
    assert (up["repo_id"], up["commit_message"]) == ("me/other", "msg")
    assert sorted(p.name for p in up["copy"].iterdir()) == [
        "README.md", "config.json", "generation_config.json", "model.safetensors", "quantize_config.json"]


# ---- refusals ----------------------------------------------------------------------------------------

def test_refuses_layers_not_in_the_standard_layout(gptq_dir, tmp_path):
    model = load_gptq(gptq_dir(V1_ASYM))
    layer = gptq_layers(model)[2][1]
    layer._cpu_transformed = True
    with pytest.raises(ValueError, match="backend='gptq_torch'"):
        save_checkpoint(model, tmp_path / "out")
    layer._cpu_transformed = False

    class MarlinLikeLinear(type(layer)):  # a repacking kernel, recognised by class
        pass

    layer.__class__ = MarlinLikeLinear
    with pytest.raises(ValueError, match="MarlinLikeLinear kernel"):
        save_checkpoint(model, tmp_path / "out")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


# ---- (g) the upstream bug this module exists for -------------------------------------------------------

@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "UPSTREAM BUG (transformers 5.23 + gptqmodel 7.7): save_pretrained of a model loaded from a v1 ('gptq') "
    "checkpoint writes the in-memory v2 zero points under the v1 label, so the reload is wrong. If this XPASSes, "
    "upstream is fixed: revisit peft_lota/export/checkpoint.py (it may be able to defer to save_pretrained)."))
def test_upstream_save_pretrained_round_trip_of_a_v1_checkpoint(gptq_dir, tmp_path):
    model = load_gptq(gptq_dir(V1_ASYM))
    expected = logits(model)
    type(model).save_pretrained(model, tmp_path / "plain")  # transformers' own, not attach_export's
    assert torch.equal(expected, logits(load_gptq(tmp_path / "plain"))), "plain save_pretrained round trip is wrong"
