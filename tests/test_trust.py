"""Trust, round 4: names read from a downloaded checkpoint are names, never paths; no command writes into what it
reads, however the folder is reached; the streaming merge refuses non-finite tensors like the in-memory one;
calibration text is read in bounded pieces; the autoload hook never outlives the package nor touches a file it did
not write. Every refusal is one line and exit 2, with nothing written."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import peft_lota_autoload
from peft_lota import cli
from peft_lota.paths import read_token_ids, separate_output
from peft_lota.stream import INDEX
from tiny_models import no_loading, one_line, reshard, snapshot


@pytest.fixture
def sharded(inputs, tmp_path):
    """(work folder, base cut into 3 shards with an index, adapter)."""
    base, adapter = inputs
    return base.parent, reshard(base, base.parent / "sharded"), adapter


def _index(base: Path) -> dict:
    return json.loads((base / INDEX).read_text())


def _set_index(base: Path, index: dict) -> None:
    (base / INDEX).write_text(json.dumps(index))


def last_line(err: str) -> str:
    """The error line after a progress bar (which the streaming merge shows once it has started): one line, no
    traceback."""
    assert "Traceback" not in err, err
    return one_line(err.rsplit("\r", 1)[-1].split("\n", 1)[-1] if "\r" in err else err)


def _stream(base, adapter, out) -> list:
    return ["merge", str(base), str(adapter), str(out), "--stream"]


# ---- 1. the streaming merge and a hostile index ----------------------------------------------------------------

@pytest.mark.parametrize("case", ["absolute", "climbs", "journal", "null", "config.json", "lacks the tensor",
                                  "not a map"])
def test_stream_merge_with_a_hostile_index_changes_nothing(sharded, tmp_path, capsys, case):
    work, base, adapter = sharded
    victim_dir = tmp_path / "victim"
    victim_dir.mkdir()
    victim = victim_dir / "victim.safetensors"
    save_file({"x": torch.ones(4)}, str(victim))
    (work / "x.safetensors").write_bytes(victim.read_bytes())  # a user's file beside the base
    index = _index(base)
    key = next(k for k in index["weight_map"] if k.endswith(".qweight"))
    index["weight_map"][key] = {"absolute": str(victim), "climbs": "../x.safetensors",
                                "journal": ".peft_lota-commit.json", "null": None, "config.json": "config.json",
                                "lacks the tensor": sorted(set(index["weight_map"].values()) - {index["weight_map"][key]})[0],
                                "not a map": None}[case]
    if case == "not a map":
        index["weight_map"] = [key]
    _set_index(base, index)
    before, outside = snapshot(work), snapshot(victim_dir)
    out = tmp_path / "out"
    assert cli.main(_stream(base, adapter, out)) == 2
    err = one_line(capsys.readouterr().err)
    assert str(base / INDEX) in err, err
    assert snapshot(work) == before and snapshot(victim_dir) == outside and not out.exists()


@pytest.mark.parametrize("case", ["truncated", "header of 2^40", "overlapping ranges", "a FIFO", "g_idx out of range"])
def test_stream_merge_on_a_damaged_shard_is_one_line_and_writes_nothing(sharded, tmp_path, capsys, case):
    work, base, adapter = sharded
    index = _index(base)
    qweight = next(k for k in index["weight_map"] if k.endswith(".qweight"))
    shard = base / index["weight_map"][qweight]
    data = shard.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    if case == "truncated":
        shard.write_bytes(data[: len(data) * 2 // 3])
    elif case == "header of 2^40":
        shard.write_bytes(struct.pack("<Q", 2**40) + data[8:])
    elif case == "overlapping ranges":
        first, second = [k for k in header if k != "__metadata__"][:2]
        header[second]["data_offsets"] = header[first]["data_offsets"]
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        shard.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    elif case == "a FIFO":
        shard.unlink()
        os.mkfifo(shard)
    else:
        tensors = load_file(str(shard))
        g_idx = qweight.replace(".qweight", ".g_idx")
        if g_idx not in tensors:
            pytest.skip("the fixture's shard holds no g_idx")
        tensors[g_idx] = tensors[g_idx].clone()
        tensors[g_idx][3] = 10**6
        save_file(tensors, str(shard), metadata={"format": "pt"})
    before = snapshot(work) if case != "a FIFO" else None
    out = tmp_path / "out"
    assert cli.main(_stream(base, adapter, out)) == 2
    err = last_line(capsys.readouterr().err)
    assert ("g_idx" in err and shard.name in err) if case == "g_idx out of range" else (shard.name in err), err
    assert not out.exists()
    if before is not None:
        assert snapshot(work) == before


def test_stream_merge_refuses_a_nan_it_would_copy(sharded, tmp_path, capsys):
    """A tensor copied as it is (the final norm) holding NaN: refused like the in-memory merge's save; OUT never
    appears."""
    work, base, adapter = sharded
    index = _index(base)
    norm = next(k for k in index["weight_map"] if k.endswith("model.norm.weight"))
    shard = base / index["weight_map"][norm]
    tensors = load_file(str(shard))
    tensors[norm] = tensors[norm].clone()
    tensors[norm][0] = float("nan")
    save_file(tensors, str(shard), metadata={"format": "pt"})
    out = tmp_path / "out"
    assert cli.main(_stream(base, adapter, out)) == 2
    err = last_line(capsys.readouterr().err)
    assert "model.norm.weight holds 1 NaN" in err and "save refused" in err
    assert not out.exists()


# ---- 2-3. outputs apart from inputs, however reached ----------------------------------------------------------

def _out_case(case: str, base: Path, tmp_path: Path) -> Path:
    if case == "inside the base":
        return base / "merged"
    if case == "holds the base":
        return base.parent
    if case == "the base through a linked parent":
        (tmp_path / "link").symlink_to(base.parent, target_is_directory=True)
        return tmp_path / "link" / base.name
    if case == "inside the base through a link":
        (tmp_path / "link").symlink_to(base, target_is_directory=True)
        return tmp_path / "link" / "sub" / "merged"
    if case == "the base spelled with ..":
        return base / "x" / ".." / ".." / base.name
    raise AssertionError(case)


OUT_CASES = ["inside the base", "holds the base", "the base through a linked parent", "inside the base through a link",
             "the base spelled with .."]


@pytest.mark.parametrize("command", ["merge", "merge --stream", "convert"])
@pytest.mark.parametrize("case", OUT_CASES)
def test_merge_and_convert_refuse_an_out_around_or_inside_an_input(inputs, tmp_path, capsys, monkeypatch, command,
                                                                    case):
    base, adapter = inputs
    out = _out_case(case, base, tmp_path)
    before = snapshot(base.parent)
    no_loading(monkeypatch)
    argv = {"merge": ["merge", str(base), str(adapter), str(out)], "merge --stream": _stream(base, adapter, out),
            "convert": ["convert", str(base), str(out), "--to", "awq"]}[command]
    assert cli.main(argv) == 2
    err = one_line(capsys.readouterr().err)
    assert "folder of its own" in err and ("is inside" in err or "holds" in err or " is the " in err), err
    assert snapshot(base.parent) == before


def test_a_bind_mount_of_the_base_is_the_base(inputs, tmp_path, capsys, monkeypatch):
    base, adapter = inputs
    mount = tmp_path / "mnt"
    mount.mkdir()
    if subprocess.run(["mount", "--bind", str(base), str(mount)], capture_output=True).returncode != 0:
        pytest.skip("bind mounts need privileges this machine does not give")
    try:
        no_loading(monkeypatch)
        before = snapshot(base)
        assert cli.main(["convert", str(base), str(mount), "--to", "awq"]) == 2
        assert " is the " in one_line(capsys.readouterr().err)
        assert snapshot(base) == before
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def test_out_inside_the_adapter_is_finetunes_own_layout(inputs, tmp_path):
    base, adapter = inputs
    separate_output(adapter / "merged", {"base": base, "adapter": adapter}, "OUT", may_contain=("adapter",))
    with pytest.raises(ValueError, match="holds the adapter"):
        separate_output(adapter.parent, {"adapter": adapter}, "OUT", may_contain=("adapter",))


@pytest.mark.parametrize("case", ["output_dir is the model", "merged_dir is the model", "merged_dir is output_dir",
                                  "output_dir holds the model", "merged_dir inside the model", "output_dir holds data",
                                  "merged_dir holds output_dir"])
def test_finetune_refuses_outputs_in_its_inputs_before_loading(made, tmp_path, capsys, monkeypatch, case):
    from peft_lota.scripts import finetune

    work = tmp_path / "work"
    model = work / "model"
    model.mkdir(parents=True)
    for f in Path(made[0]).iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    train = work / "data" / "train.jsonl"
    train.parent.mkdir()
    train.write_text('{"text": "a b c"}\n')
    run = tmp_path / "run"
    flags = {"output_dir is the model": ["--output_dir", str(model)],
             "merged_dir is the model": ["--output_dir", str(run), "--merged_dir", str(model)],
             "merged_dir is output_dir": ["--output_dir", str(run), "--merged_dir", str(run)],
             "output_dir holds the model": ["--output_dir", str(work)],
             "merged_dir inside the model": ["--output_dir", str(run), "--merged_dir", str(model / "merged")],
             "output_dir holds data": ["--output_dir", str(train.parent)],
             "merged_dir holds output_dir": ["--output_dir", str(run / "adapter"), "--merged_dir", str(run)]}[case]
    monkeypatch.setattr(finetune, "load_raw_datasets", lambda *a: (_ for _ in ()).throw(AssertionError("loaded")))
    before = snapshot(work)
    assert cli.main(["finetune", "--model_name_or_path", str(model), "--train_file", str(train), "--use_cpu", "true",
                     "--report_to", "none", *flags]) == 2
    err = one_line(capsys.readouterr().err)
    assert "folder of its own" in err, err
    assert snapshot(work) == before


@pytest.mark.parametrize("case", ["the model", "inside the model", "holds the model", "holds the calibration file"])
def test_calibrate_refuses_an_output_in_its_inputs_before_loading(fp_dir, tmp_path, capsys, case):
    work = tmp_path / "work"
    model = work / "fp"
    model.mkdir(parents=True)
    for f in Path(fp_dir("llama")).iterdir():
        if f.is_file():
            (model / f.name).write_bytes(f.read_bytes())
    calib = tmp_path / "texts" / "calib.txt"
    calib.parent.mkdir()
    calib.write_text("some text " * 200)
    out = {"the model": model, "inside the model": model / "q", "holds the model": work,
           "holds the calibration file": calib.parent}[case]
    before = snapshot(work)
    assert cli.main(["calibrate", "--model_name_or_path", str(model), "--output_dir", str(out),
                     "--calib_file", str(calib)]) == 2
    assert "folder of its own" in one_line(capsys.readouterr().err)
    assert snapshot(work) == before


# ---- 5. calibration text, bounded ------------------------------------------------------------------------------

class _Tok:
    """A whitespace tokenizer (the reading, not the tokenization, is under test)."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [len(w) for w in text.split()]}


def test_a_large_calibration_file_is_read_only_as_far_as_needed(tmp_path):
    big = tmp_path / "big.txt"
    with open(big, "w") as f:
        for i in range(40):
            f.write(("word " * 200_000))  # 40 MB
    ids, read, whole = read_token_ids(_Tok(), big, "--calib_file", want=300_000)
    assert len(ids) >= 300_000 and not whole and read < 3 * 2**20
    small = tmp_path / "small.txt"
    small.write_text("one two three\nfour")
    assert read_token_ids(_Tok(), small, "--calib_file", want=10**6) == ([3, 3, 5, 4], 18, True)


@pytest.mark.parametrize("case", ["a FIFO", "/dev/zero", "UTF-16", "a sparse file", "a folder", "not UTF-8"])
def test_calibration_text_that_is_not_a_text_file_is_refused_at_once(tmp_path, case):
    path = tmp_path / "calib.txt"
    if case == "a FIFO":
        os.mkfifo(path)
    elif case == "/dev/zero":
        path = Path("/dev/zero")
    elif case == "UTF-16":
        path.write_text("hello world " * 100, encoding="utf-16")
    elif case == "a sparse file":
        with open(path, "wb") as f:
            f.truncate(2**31)
    elif case == "a folder":
        path = tmp_path
    else:
        path.write_bytes(b"caf\xe9 " * 100)
    phrase = {"a FIFO": "not a regular file", "/dev/zero": "not a regular file", "UTF-16": "NUL bytes",
              "a sparse file": "NUL bytes", "a folder": "is a folder", "not UTF-8": "not UTF-8"}[case]
    with pytest.raises(ValueError, match=phrase):
        read_token_ids(_Tok(), path, "--calib_file", want=1000)


def test_merge_lora_with_a_fifo_calibration_file_is_one_line(made, tmp_path, capsys, monkeypatch):
    from peft import LoraConfig, get_peft_model
    from tiny_models import load_gptq

    base = made[0]
    lora = tmp_path / "lora"
    get_peft_model(load_gptq(base), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(lora)
    no_loading(monkeypatch)  # the text is read before the model loads
    fifo = tmp_path / "calib.txt"
    os.mkfifo(fifo)
    assert cli.main(["merge", str(base), str(lora), str(tmp_path / "out"), "--calib_file", str(fifo)]) == 2
    assert "not a regular file" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


# ---- 6. the autoload hook --------------------------------------------------------------------------------------

@pytest.fixture
def site(tmp_path, monkeypatch):
    folder = tmp_path / "site-packages"
    folder.mkdir()
    monkeypatch.setattr(peft_lota_autoload, "_site_packages", lambda: folder)
    return folder


def test_autoload_line_is_silent_once_the_package_is_gone(site, capsys):
    assert peft_lota_autoload.main(["install"]) == 0
    code = ("import sys; sys.modules['peft_lota_autoload'] = None; import site; "  # None: the import fails, as uninstalled
            f"site.addsitedir({str(site)!r}); print('started')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "started" and proc.stderr == "", proc.stderr
    hooked = subprocess.run([sys.executable, "-c", f"import site, sys; site.addsitedir({str(site)!r}); "
                             "print(any(type(f).__name__ == '_AfterPeft' for f in sys.meta_path))"],
                            capture_output=True, text=True, timeout=120)
    assert hooked.stdout.strip() == "True", hooked.stderr  # and with the package, the hook is there


@pytest.mark.parametrize("case", ["foreign file", "symlink"])
def test_autoload_install_and_uninstall_touch_only_their_own_file(site, tmp_path, capsys, case):
    pth = site / peft_lota_autoload.PTH
    target = tmp_path / "elsewhere.pth"
    target.write_text("import something_of_mine\n")
    if case == "foreign file":
        pth.write_text("import something_of_mine\n")
    else:
        pth.symlink_to(target)
    for action in ("install", "uninstall"):
        assert peft_lota_autoload.main([action]) == 2
        assert "not written by peft_lota_autoload" in one_line(capsys.readouterr().err)
    assert target.read_text() == "import something_of_mine\n" and os.path.lexists(pth)
    assert pth.is_symlink() == (case == "symlink")


def test_autoload_round_trip_and_a_site_packages_it_cannot_write(site, capsys, monkeypatch):
    pth = site / peft_lota_autoload.PTH
    pth.write_text("import peft_lota_autoload; peft_lota_autoload.activate()\n")  # an earlier release's line: ours
    assert peft_lota_autoload.main(["install"]) == 0 and pth.read_text() == peft_lota_autoload.LINE
    assert peft_lota_autoload.main(["uninstall"]) == 0 and not pth.exists()
    capsys.readouterr()
    if os.geteuid() == 0:  # root writes into a read-only folder: a site-packages path that is a file fails the same way
        blocked = site / "not-a-folder"
        blocked.write_text("")
        monkeypatch.setattr(peft_lota_autoload, "_site_packages", lambda: blocked)
        assert peft_lota_autoload.main(["install"]) == 2
        assert "Not a directory" in one_line(capsys.readouterr().err)
        return
    site.chmod(0o555)
    try:
        assert peft_lota_autoload.main(["install"]) == 2
        assert "Permission denied" in one_line(capsys.readouterr().err)
    finally:
        site.chmod(0o755)


# ---- 7. damaged inputs: one line naming the file, exit 2 -------------------------------------------------------

@pytest.fixture(scope="module")
def lora_adapter(made, tmp_path_factory):
    """A PEFT LoRA (random B, so it changes the model) saved for the GPTQ fixture, and calibration text."""
    from peft import LoraConfig, get_peft_model
    from tiny_models import calibration_texts, load_gptq

    folder = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    model = get_peft_model(load_gptq(made[0]), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    model.save_pretrained(folder / "lora")
    (folder / "calib.txt").write_text("\n".join(calibration_texts(24, seed=3, chars=600)))
    return folder / "lora", folder / "calib.txt"


@pytest.mark.parametrize("case", ["lora_alpha NaN", "lora_alpha 1e300", "lora_alpha '16'", "alpha_pattern null",
                                  "r disagrees, rank_pattern {}", "rank_pattern a list"])
def test_merge_lora_with_a_damaged_config_is_one_line(made, lora_adapter, tmp_path, capsys, case):
    lora, calib = lora_adapter
    adapter = tmp_path / "lora"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes((lora / "adapter_model.safetensors").read_bytes())
    config = json.loads((lora / "adapter_config.json").read_text())
    key, value = {"lora_alpha NaN": ("lora_alpha", math.nan), "lora_alpha 1e300": ("lora_alpha", 1e300),
                  "lora_alpha '16'": ("lora_alpha", "16"), "alpha_pattern null": ("alpha_pattern", None),
                  "r disagrees, rank_pattern {}": ("r", 8), "rank_pattern a list": ("rank_pattern", [4])}[case]
    config[key] = value
    if case == "r disagrees, rank_pattern {}":
        config["rank_pattern"] = {}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    rc = cli.main(["merge", str(made[0]), str(adapter), str(tmp_path / "out"), "--calib_file", str(calib),
                   "--calib_len", "32"])
    captured = capsys.readouterr()
    if case == "alpha_pattern null":  # PEFT's own default when absent: merges as {}
        assert rc == 0, captured.err
        return
    assert rc == 2
    err = one_line(captured.err)
    assert {"lora_alpha NaN": "lora_alpha is nan", "lora_alpha 1e300": "lora_alpha is 1e+300",
            "lora_alpha '16'": "lora_alpha is '16'", "r disagrees, rank_pattern {}": "says r=8",
            "rank_pattern a list": "rank_pattern is [4]"}[case] in err, err
    assert not (tmp_path / "out").exists()


def test_a_target_pattern_that_backtracks_is_refused_not_hung_on(inputs, capsys, monkeypatch):
    from peft_lota import inputs as checks

    monkeypatch.setattr(checks, "PROBE_SECONDS", 1.0)  # (the pattern hangs: the test would wait out any budget)
    _, adapter = inputs
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["target_modules"] = "(.|.)*Z"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert cli.main(["inspect", str(adapter)]) == 2
    assert "takes seconds to match" in one_line(capsys.readouterr().err)


@pytest.mark.parametrize("case", ["200,000 deep", "meta a string", "ct bits 0", "ct bits null", "ct bits 2^40",
                                  "ct groups a string"])
def test_inspect_on_a_damaged_config_is_one_line(made, ct_dir, tmp_path, capsys, case):
    from tiny_models import CtSpec

    folder = tmp_path / "model"
    source = Path(ct_dir(CtSpec()) if case.startswith("ct") else made[0])
    folder.mkdir()
    (folder / "config.json").write_bytes((source / "config.json").read_bytes())
    config = json.loads((folder / "config.json").read_text())
    qc = config["quantization_config"]
    if case == "200,000 deep":
        (folder / "config.json").write_text('{"a": ' + "[" * 200_000 + "]" * 200_000 + "}")
    else:
        if case == "meta a string":
            qc["meta"] = "x"
        elif case == "ct groups a string":
            qc["config_groups"] = "x"
        else:
            for group in qc["config_groups"].values():
                group["weights"]["num_bits"] = {"ct bits 0": 0, "ct bits null": None, "ct bits 2^40": 2**40}[case]
        (folder / "config.json").write_text(json.dumps(config))
    rc = cli.main(["inspect", str(folder)])
    captured = capsys.readouterr()
    if case == "meta a string":  # nothing to describe in it, the rest is whole
        assert rc == 0 and "made by" in captured.out, captured.err
        return
    assert rc == 2 and str(folder) in last_line(captured.err)
    assert "yes" not in captured.out  # never described as servable


def test_tokenizer_files_keep_their_permissions_and_never_come_from_outside(inputs, tmp_path, capsys):
    """A tokenizer file that links out of the base's folder (a cloned repo's link to a private file) is not copied
    into OUT (which a --push would upload); one that is the base's own keeps its permission bits."""
    base, adapter = inputs
    for name in ("tokenizer.json", "tokenizer_config.json"):
        for folder in (base, adapter):
            (folder / name).unlink(missing_ok=True)
    secret = tmp_path / "secret.json"
    secret.write_text('{"private": true}')
    secret.chmod(0o600)
    (base / "tokenizer.json").symlink_to(secret)
    (base / "tokenizer_config.json").write_text("{}")
    (base / "tokenizer_config.json").chmod(0o600)
    out = tmp_path / "out"
    assert cli.main(["merge", str(base), str(adapter), str(out)]) == 0
    err = capsys.readouterr().err
    assert "links out of its folder" in err and not (out / "tokenizer.json").exists()
    assert (out / "tokenizer_config.json").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("stream", [False, True])
def test_a_full_disk_is_one_line_and_leaves_out_as_it_was(made, tmp_path, capsys, stream):
    disk = tmp_path / "small"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a small file system needs privileges this machine does not give")
    try:
        (disk / "out").mkdir()
        (disk / "out" / "notes.txt").write_text("mine")
        base, adapter = made
        assert cli.main(["merge", str(base), str(adapter), str(disk / "out"), *(["--stream"] if stream else [])]) == 2
        err = capsys.readouterr().err
        assert "No space left on device" in err.strip().splitlines()[-1] and "Traceback" not in err, err
        assert sorted(p.name for p in (disk / "out").iterdir()) == ["notes.txt"]
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_both_merge_paths_ship_the_same_tokenizer_inside_the_commit(inputs, tmp_path, capsys, monkeypatch):
    """The in-memory merge and --stream ship the same tokenizer files, all from one folder: the adapter's when it
    holds a tokenizer (what training used), else the base's; written inside the checkpoint's commit (a manifest
    entry), not after it."""
    from peft_lota import export

    base, adapter = inputs
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (adapter / name).write_bytes((base / name).read_bytes())
    config = json.loads((adapter / "tokenizer_config.json").read_text())
    (adapter / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "<unk>"}))
    outs = {kind: tmp_path / kind for kind in ("memory", "stream")}
    assert cli.main(["merge", str(base), str(adapter), str(outs["memory"])]) == 0
    assert cli.main(["merge", str(base), str(adapter), str(outs["stream"]), "--stream"]) == 0
    capsys.readouterr()
    for out in outs.values():
        manifest = json.loads((out / export.MANIFEST).read_text())
        assert {"tokenizer.json", "tokenizer_config.json"} <= set(manifest["files"])
        for name in ("tokenizer.json", "tokenizer_config.json"):
            assert (out / name).read_bytes() == (adapter / name).read_bytes(), (out, name)


def test_a_checkpoint_that_ships_its_own_model_code_is_refused_and_never_run(made, tmp_path, capsys):
    base = tmp_path / "custom"
    base.mkdir()
    for f in Path(made[0]).iterdir():
        (base / f.name).write_bytes(f.read_bytes())
    config = json.loads((base / "config.json").read_text())
    config.update(model_type="my-own-model", auto_map={"AutoConfig": "configuration_x.C",
                                                        "AutoModelForCausalLM": "modeling_x.M"})
    (base / "config.json").write_text(json.dumps(config))
    ran = tmp_path / "ran"
    for name in ("configuration_x.py", "modeling_x.py"):
        (base / name).write_text(f"open({str(ran)!r}, 'w').write('x')\n")
    assert cli.main(["convert", str(base), str(tmp_path / "out"), "--to", "awq"]) == 2
    assert "never runs code from a checkpoint" in last_line(capsys.readouterr().err)
    assert not ran.exists() and not (tmp_path / "out").exists()


# ---- the red-team pass over round 4 -------------------------------------------------------------------------------

def test_the_in_memory_merge_also_refuses_an_index_that_names_a_file_elsewhere(sharded, tmp_path, capsys):
    """transformers joins an index's shard names onto the folder as they are: `../x.safetensors` would load another
    checkpoint's tensors into the merge (and a --push would publish them)."""
    work, base, adapter = sharded
    index = _index(base)
    key = next(k for k in index["weight_map"] if k.endswith("lm_head.weight") or k.endswith("embed_tokens.weight"))
    index["weight_map"][key] = "../x.safetensors"
    _set_index(base, index)
    before = snapshot(work)
    assert cli.main(["merge", str(base), str(adapter), str(tmp_path / "out")]) == 2
    assert "not a shard file name inside the folder" in last_line(capsys.readouterr().err)
    assert snapshot(work) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["index 200,000 deep", "config.json a list"])
def test_stream_merge_on_a_damaged_json_is_one_line(sharded, tmp_path, capsys, case):
    work, base, adapter = sharded
    if case == "index 200,000 deep":
        (base / INDEX).write_text('{"weight_map": ' + "[" * 200_000 + "]" * 200_000 + "}")
    else:
        (base / "config.json").write_text("[]")
    assert cli.main(_stream(base, adapter, tmp_path / "out")) == 2
    assert "Traceback" not in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_text_pieces_stay_bounded_keep_line_ends_and_never_split_a_character(tmp_path):
    from peft_lota.paths import PIECE, text_pieces

    flat = tmp_path / "flat.txt"
    flat.write_text("a" * (3 * PIECE + 5))  # no space, no line end
    pieces = list(text_pieces(flat, "--calib_file", 1 << 40))
    assert max(map(len, pieces)) <= 2 * PIECE and "".join(pieces) == flat.read_text()
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(b"one two\r\nthree\r\n" * 200_000)  # pieces cut between \r and \n would double the line ends
    assert "".join(text_pieces(crlf, "--calib_file", 1 << 40)) == "one two\nthree\n" * 200_000
    wide = tmp_path / "wide.txt"
    wide.write_text("é" * PIECE)  # 2 bytes each: a cap of an odd number of bytes cuts one
    assert "".join(text_pieces(wide, "--calib_file", PIECE + 1)) == "é" * (PIECE // 2)


@pytest.mark.parametrize("config, phrase", [
    ({"target_modules": "(?!.*default_x)(.|.)*Z"}, "takes seconds"),  # made to dodge one probe name
    ({"target_modules": "q_proj{4294967296}"}, "is not a regular expression"),
    ({"rank_pattern": {"q_proj(": 4}}, "is not a regular expression"),
    ({"alpha_pattern": {"(.|.)*Z": 8}}, "takes seconds")])
def test_adapter_patterns_that_hang_or_break_peft_are_refused(config, phrase, monkeypatch):
    from peft_lota import inputs as checks
    from peft_lota.inputs import UsageError, check_target_pattern

    monkeypatch.setattr(checks, "PROBE_SECONDS", 1.0)  # (a pattern that hangs would wait out any budget)
    with pytest.raises(UsageError, match=phrase):
        check_target_pattern(config, Path("adapter_config.json"))


def test_the_autoload_line_is_silent_when_the_module_is_broken(site, tmp_path):
    assert peft_lota_autoload.main(["install"]) == 0
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "peft_lota_autoload.py").write_text("raise RuntimeError('half-written')\n")
    code = f"import sys; sys.path.insert(0, {str(broken)!r}); import site; site.addsitedir({str(site)!r}); print('up')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "up" and proc.stderr == "", proc.stderr


def test_a_read_only_tokenizer_is_shipped_read_only(inputs, tmp_path, capsys):
    base, adapter = inputs
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (base / name).chmod(0o444)
    assert cli.main(["merge", str(base), str(adapter), str(tmp_path / "out")]) == 0
    capsys.readouterr()
    assert (tmp_path / "out" / "tokenizer.json").stat().st_mode & 0o777 == 0o444
