"""The peft-lota command line on mistakes: an OUT that would overwrite the inputs, links in OUT, damaged or wrong
inputs, bad fine-tuning data. Each is one line on stderr and exit 2, before anything is written; a failed check of
`finetune` is exit 1; a bug shows its traceback and says where to report it."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from peft_lota import cli
from peft_lota.scripts import finetune
from tiny_models import Spec, no_loading, one_line, snapshot


@pytest.mark.parametrize("case", ["out is base", "out is adapter", "out links to base", "out is a file"])
def test_merge_refuses_an_out_that_would_write_over_its_inputs(inputs, tmp_path, capsys, monkeypatch, case):
    base, adapter = inputs
    work = base.parent
    if case == "out links to base":
        (tmp_path / "link").symlink_to(base, target_is_directory=True)
    if case == "out is a file":
        (work / "notes.txt").write_text("mine")
    out = {"out is base": base, "out is adapter": adapter, "out links to base": tmp_path / "link",
           "out is a file": work / "notes.txt"}[case]
    before = snapshot(work)
    no_loading(monkeypatch)  # refused before anything loads (and so before anything is written)
    assert cli.main(["merge", str(base), str(adapter), str(out)]) == 2
    err = one_line(capsys.readouterr().err)
    assert "existing file" in err if case == "out is a file" else "folder of its own" in err
    assert snapshot(work) == before


def test_merge_into_a_folder_inside_the_adapters_leaves_the_adapter_as_it_was(inputs, capsys):
    base, adapter = inputs
    before = snapshot(base, adapter)
    assert cli.main(["merge", str(base), str(adapter), str(adapter / "merged")]) == 0  # finetune's own layout
    capsys.readouterr()
    assert {k: v for k, v in snapshot(base, adapter).items() if not k.startswith(str(adapter / "merged"))} == before


def test_merge_never_writes_through_a_symlink_in_out(made, tmp_path, capsys):
    """A dangling tokenizer.json link in OUT is replaced by the file, not followed out of OUT."""
    base, adapter = made
    out, outside = tmp_path / "out", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    (out / "tokenizer.json").symlink_to(outside / "tokenizer.json")
    assert cli.main(["merge", str(base), str(adapter), str(out)]) == 0
    capsys.readouterr()
    assert list(outside.iterdir()) == []
    assert not (out / "tokenizer.json").is_symlink()
    assert (out / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def _damage(case: str, base: Path, adapter: Path, tmp_path: Path, fp_dir, gptq_dir) -> tuple[list, str]:
    """Make the mistake; return the command and a phrase its one line must hold."""
    out = str(tmp_path / "out")
    merge = ["merge", str(base), str(adapter), out]
    other = str(gptq_dir(Spec("qwen2", 4, True, False, "gptq_v2")))
    if case == "truncated adapter weights":
        f = adapter / "adapter_model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        return merge, "adapter_model.safetensors is damaged"
    if case == "pickle adapter weights":
        (adapter / "adapter_model.safetensors").unlink()
        torch.save({}, adapter / "adapter_model.bin")
        return merge, "reads only adapter_model.safetensors"
    if case == "missing adapter weights":
        (adapter / "adapter_model.safetensors").unlink()
        return merge, "has no adapter_model.safetensors"
    if case == "full-precision base":
        return ["merge", str(fp_dir("llama")), str(adapter), out], "is a full-precision model"
    if case == "5-bit base":
        config = json.loads((base / "config.json").read_text())
        config["quantization_config"]["bits"] = 5
        (base / "config.json").write_text(json.dumps(config))
        return merge, "5-bit GPTQ checkpoint"
    if case == "truncated config.json":
        (base / "config.json").write_text((base / "config.json").read_text()[:100])
        return merge, "config.json is not valid JSON"
    if case == "base without weights":
        (base / "model.safetensors").unlink()
        return merge, f"cannot load the model in {base}"
    if case == "missing base":
        return ["merge", str(tmp_path / "nothing"), str(adapter), out], f"{tmp_path / 'nothing'}: no such folder"
    if case == "inspect random bytes":
        junk = tmp_path / "junk"
        junk.mkdir()
        (junk / "config.json").write_bytes(os.urandom(300))
        return ["inspect", str(junk)], "config.json is not valid JSON"
    if case == "inspect a file":
        (tmp_path / "junk.bin").write_bytes(os.urandom(300))
        return ["inspect", str(tmp_path / "junk.bin")], "is a file, not a model folder"
    if case == "inspect r='x'":
        config = json.loads((adapter / "adapter_config.json").read_text())
        config["r"] = "x"
        (adapter / "adapter_config.json").write_text(json.dumps(config))
        return ["inspect", str(adapter)], "r must be a positive integer"
    if case == "adapter file without some tensors":
        from safetensors.torch import load_file, save_file

        f = adapter / "adapter_model.safetensors"
        tensors = load_file(str(f))
        save_file({k: v for k, v in tensors.items() if "layers.0." not in k}, str(f))
        return merge, "adapter file lacks"
    if case == "empty adapter file":
        from safetensors.torch import save_file

        save_file({}, str(adapter / "adapter_model.safetensors"))
        return merge, "adapter file lacks"
    if case == "OUT with a forged journal":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / ".peft_lota-commit.json").write_text('{"staged": "../x"}')
        return merge, "not a commit journal peft_lota wrote"
    if case == "OUT where nothing can be written":
        return ["merge", str(base), str(adapter), "/proc/peft-lota-out"], "cannot write into /proc"
    if case == "inspect an incomplete AWQ config":
        junk = tmp_path / "junk"
        junk.mkdir()
        (junk / "config.json").write_text(json.dumps({"model_type": "llama",
                                                      "quantization_config": {"quant_method": "awq", "bits": 4}}))
        return ["inspect", str(junk)], "quantization_config is incomplete or damaged"
    if case == "inspect --base another base":
        return ["inspect", str(adapter), "--base", other], "made for a base"
    if case == "verify --base another base":
        return ["verify", str(base), "--against", str(adapter), "--base", other], "made for a base"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["truncated adapter weights", "pickle adapter weights", "missing adapter weights",
                                  "full-precision base", "5-bit base", "truncated config.json", "base without weights",
                                  "missing base", "inspect random bytes", "inspect a file", "inspect r='x'",
                                  "inspect --base another base", "verify --base another base",
                                  "adapter file without some tensors", "empty adapter file", "OUT with a forged journal",
                                  "OUT where nothing can be written", "inspect an incomplete AWQ config"])
def test_a_damaged_or_wrong_input_is_one_line_and_exit_2(inputs, tmp_path, capsys, fp_dir, gptq_dir, monkeypatch,
                                                         case):
    base, adapter = inputs
    argv, phrase = _damage(case, base, adapter, tmp_path, fp_dir, gptq_dir)
    before, out_before = snapshot(base.parent), snapshot(tmp_path / "out")
    if case.startswith("OUT"):
        no_loading(monkeypatch)  # refused before the merge's work
    assert cli.main(argv) == 2
    assert phrase in one_line(capsys.readouterr().err)
    assert snapshot(base.parent) == before and snapshot(tmp_path / "out") == out_before


def test_a_bug_shows_its_traceback_and_where_to_report_it(made, capsys, monkeypatch):
    def broken(args):
        raise RuntimeError("an internal error")

    monkeypatch.setattr(cli, "cmd_inspect", broken)
    assert cli.main(["inspect", str(made[1])]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: an internal error" in err
    assert "bug in peft_lota" in err.splitlines()[-1] and "issue tracker" in err.splitlines()[-1]


# ---- finetune -------------------------------------------------------------------------------------------------

def _finetune(base: Path, train: Path, tmp_path: Path, *extra: str) -> int:
    return cli.main(["finetune", "--model_name_or_path", str(base), "--train_file", str(train), "--output_dir",
                     str(tmp_path / "run"), "--use_cpu", "true", "--report_to", "none", *extra])


@pytest.mark.parametrize("summary, failed", [
    ({"merged_equals_adapter": False, "ppl_adapter": 3.0}, "merged logits == adapter logits: False"),
    ({"merged_equals_adapter": True, "ppl_adapter": math.nan}, "ppl_adapter is nan"),
    ({"merged_equals_adapter": True, "reloaded_logits_equal": True, "ppl_adapter": 3.0}, None)])
def test_finetune_exits_1_when_its_checks_fail(made, tmp_path, capsys, monkeypatch, summary, failed):
    monkeypatch.setattr(finetune, "run", lambda *args: dict(summary, steps=1))
    train = tmp_path / "train.jsonl"
    train.write_text('{"text": "a"}\n')
    assert _finetune(made[0], train, tmp_path) == (1 if failed else 0)
    captured = capsys.readouterr()
    assert "| merged logits == adapter logits |" in captured.out  # the summary is still printed
    if failed:
        assert failed in one_line(captured.err)
    else:
        assert captured.err == ""


@pytest.mark.parametrize("rows, flags, phrase", [
    ([{"text": "a b c"}, {"body": "x"}, {"text": "d e"}], [], "row 2 (counting from 1) has no 'text'"),
    ([{"q": "a", "a": "b"}, {"q": "c", "a": "d"}, {"q": "e"}], ["--prompt_column", "q", "--response_column", "a"],
     "row 3 (counting from 1) has no 'a'")])
def test_finetune_refuses_rows_without_the_field_it_trains_on(made, tmp_path, capsys, rows, flags, phrase):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _finetune(made[0], train, tmp_path, *flags) == 2
    assert phrase in one_line(capsys.readouterr().err)


@pytest.mark.parametrize("content, phrase", [
    (b"", "is empty"), ('{"text": "caf\u00e9"}\n'.encode("latin-1"), "is not UTF-8 text"),
    ('{"text": "cafe"}\n'.encode("utf-16"), "is not UTF-8 text"),
    ('{"text": "cafe"}\n'.encode("utf-16-le"), "is not UTF-8 text"), (None, "no such file")])
def test_finetune_refuses_an_unreadable_data_file_naming_it(made, tmp_path, capsys, content, phrase):
    train = tmp_path / "train.jsonl"
    if content is not None:
        train.write_bytes(content)
    assert _finetune(made[0], train, tmp_path) == 2
    err = one_line(capsys.readouterr().err)
    assert f"--train_file {train}" in err and phrase in err
