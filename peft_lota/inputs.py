"""What a command was given, checked before anything loads: model folders, adapters, outputs, calibration text.

Every check raises UsageError with one line that says what is wrong and what to do; the command line prints it
and exits 2, and the scripts (finetune, calibrate) raise it the same way. Loading goes through `load_checked`,
which turns a damaged checkpoint into such a line.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

class UsageError(Exception):
    """A mistake in what the user asked for: reported as one line, exit code 2."""



def read_json(file: Path) -> dict:
    """A JSON object from a file; a damaged or unreadable file is a usage mistake naming the file."""
    try:
        data = json.loads(file.read_bytes().decode("utf-8"))
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise UsageError(f"{file} is not valid JSON ({err}): it is damaged or cut short; copy it again from where "
                         "it came from.") from None
    except RecursionError:
        raise UsageError(f"{file} nests its JSON too deeply to be a config: it is damaged; copy it again.") from None
    except OSError as err:
        raise UsageError(f"cannot read {file}: {err.strerror or err}.") from None
    if not isinstance(data, dict):
        raise UsageError(f"{file} holds a JSON {type(data).__name__}, not an object: it is damaged; copy it again.")
    return data


def gguf_file(path) -> Optional[Path]:
    """The GGUF file `path` names: a .gguf file, or a folder without config.json holding exactly one (what a GGUF
    model's save_pretrained writes); else None."""
    p = Path(path)
    if p.is_file():
        return p if p.suffix == ".gguf" else None
    if p.is_dir() and not (p / "config.json").exists():
        found = sorted(p.glob("*.gguf"))
        return found[0] if len(found) == 1 else None
    return None


def model_config(path: str) -> dict:
    """config.json of a local folder or a Hub repo."""
    folder = Path(path)
    if folder.is_file():
        raise UsageError(f"{path} is a file, not a model folder (a folder with config.json and the weights).")
    if folder.exists():
        if not (folder / "config.json").is_file():
            raise UsageError(f"{path} has no config.json: it is not a model folder.")
        return read_json(folder / "config.json")
    if os.path.lexists(path):
        raise UsageError(f"{path} is a broken symbolic link (to {os.readlink(path)}): point it at the model folder.")
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(path).to_dict()
    except Exception as err:  # noqa: BLE001
        raise UsageError(f"{path}: no such folder, and not a model on the Hub ({type(err).__name__}); check the "
                         "path.") from None


def quantization(path: str) -> Optional[dict]:
    """The checkpoint's quantization_config in a format peft_lota reads, None for full precision."""
    from peft_lota.loading import quantization_config

    if gguf_file(path) is not None:
        return {"quant_method": "gguf"}
    model_config(path)  # a clear error for a path that is no model
    try:
        return quantization_config(path)
    except ValueError as err:
        raise UsageError(str(err)) from None


def format_of(qc: dict):
    from peft_lota.formats import config_format

    return config_format(qc)


DTYPES = ("float32", "bfloat16", "float16")


def own_dtype(path: str) -> str:
    """The dtype a checkpoint loads in by default (its config's dtype, or legacy torch_dtype; float32 if none): what
    the merge and its checks run in unless --dtype says otherwise, so the merged config keeps the base's dtype."""
    if gguf_file(path) is not None:
        return "float32"  # (GGUF's products are float32: the merge's checks compare them exactly)
    config = model_config(path)
    value = config.get("dtype") or config.get("torch_dtype")
    return value if value in DTYPES else "float32"


def load_checked(path: str, dtype: Optional[str] = None):
    """peft_lota.load_model for the command line: dtype None is the checkpoint's own, and a missing or damaged
    model is a one-line usage error."""
    import torch
    from safetensors import SafetensorError

    from peft_lota.loading import load_model as load

    quantization(path)
    file = gguf_file(path)
    if file is not None:
        from peft_lota.formats.gguf import load_gguf

        try:
            return load_gguf(file, dtype=getattr(torch, dtype or "float32"))
        except (OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UsageError(f"cannot load the GGUF file {file}: {first}") from None
    try:
        return load(path, dtype=getattr(torch, dtype or own_dtype(path)))
    except (OSError, ValueError, SafetensorError) as err:  # missing or damaged weights, a config transformers refuses
        from peft_lota.formats import MissingLibraryError

        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if isinstance(err, MissingLibraryError):
            raise UsageError(f"{path}: {first}") from None
        if "custom code" in first:  # config.json's auto_map names code of its own, for a model_type transformers lacks
            raise UsageError(f"{path} needs the model code it ships (auto_map in config.json), and peft_lota never "
                             "runs code from a checkpoint: use a checkpoint of an architecture transformers knows.") from None
        raise UsageError(f"cannot load the model in {path}: {first.rstrip('.')}. Check that its files are complete "
                         "(copy or download them again).") from None


def adapter_config(path: str) -> dict:
    """The adapter's config, checked as its method's config class checks it, and its weights file's header."""
    folder = Path(path)
    file = folder / "adapter_config.json"
    if not file.is_file():
        raise UsageError(f"{path} has no adapter_config.json: it is not a saved adapter.")
    config = read_json(file)
    from peft import PeftConfig

    from peft_lota.registry import METHODS  # (importing peft_lota registers its methods with PEFT)

    if config.get("peft_type") not in {"LORA", *(m.name for m in METHODS)}:
        raise UsageError(f"{path} is a {config.get('peft_type')} adapter; peft-lota merges "
                         f"{', '.join(m.title for m in METHODS)} and LoRA adapters.")

    try:
        PeftConfig.from_peft_type(**config)
    except (ValueError, TypeError) as err:
        raise UsageError(f"{file}: {str(err).splitlines()[0]} Fix the file, or save the adapter again.") from None
    check_target_pattern(config, file)
    if config["peft_type"] == "LORA":
        adapter_weights(folder)
        return config
    targets, layers = config.get("target_modules"), config.get("base_layers")
    if not (targets is None or isinstance(targets, str) or (isinstance(targets, list)
                                                            and all(isinstance(t, str) for t in targets))):
        raise UsageError(f"{file}: target_modules must be a layer name pattern or a list of names, got {targets!r}.")
    if not (layers is None or (isinstance(layers, dict) and all(isinstance(v, list) and len(v) >= 5
                                                                  for v in layers.values()))):
        raise UsageError(f"{file}: base_layers must map layer names to what the adapter was made for (as saved), "
                         "or be null; save the adapter again.")
    adapter_weights(folder)
    return config


# Module names shaped like real ones (Llama/Qwen/Mistral, OPT, GPT-2, GPT-NeoX), as PEFT sees them while injecting.
PROBE_SECONDS = 3.0  # what a pattern may take on the probe names before it is called one that hangs PEFT
PROBE_NAMES = ("model.layers.0.self_attn.q_proj", "model.layers.27.mlp.down_proj", "model.layers.13.self_attn.o_proj",
               "model.decoder.layers.11.fc1", "transformer.h.3.attn.c_attn", "gpt_neox.layers.5.attention.dense",
               "lm_head", "model.embed_tokens", "model.layers.123.self_attn.q_proj.base_layer.lora_A.default_x")
# How PEFT matches each kind of pattern: target_modules whole, rank_pattern / alpha_pattern keys at a name's end.
_PROBE = """import json, re, sys
job = json.load(sys.stdin)
for name in job["names"]:
    for p in job["full"]:
        re.fullmatch(p, name)
    for key in job["keys"]:
        re.match(r"(.*\\.)?(%s)$" % key, name)
"""


def check_target_pattern(config: dict, file: Path) -> None:
    """The regular expressions of an adapter config (target_modules as a string, the keys of rank_pattern and
    alpha_pattern) compile, and match module names in reasonable time. PEFT matches them with Python's `re`, which
    has no time limit: a pattern like `(.|.)*Z` backtracks for hours. They are tried first in a child process given
    PROBE_SECONDS, on module names shaped like real ones (a probe, not a proof: a pattern made to dodge these names
    could still hang PEFT)."""
    import json
    import re
    import subprocess

    targets = config.get("target_modules")
    full = [targets] if isinstance(targets, str) else []
    keys = [k for field in ("rank_pattern", "alpha_pattern") if isinstance(config.get(field), dict)
            for k in config[field]]
    for what, pattern, template in [*(("target_modules", p, "{}") for p in full),
                                    *(("a rank_pattern / alpha_pattern key", k, r"(.*\.)?({})$") for k in keys)]:
        try:
            re.compile(template.format(pattern) if isinstance(pattern, str) else None)
        except (re.error, OverflowError, ValueError, TypeError, RecursionError) as err:
            raise UsageError(f"{file}: {what} {pattern!r:.60} is not a regular expression ({str(err)[:80]}).") from None
    if not full and not keys:
        return
    try:
        subprocess.run([sys.executable, "-I", "-S", "-c", _PROBE], input=json.dumps(
            {"full": full, "keys": keys, "names": PROBE_NAMES}), text=True, timeout=PROBE_SECONDS, capture_output=True)
    except subprocess.TimeoutExpired:
        raise UsageError(f"{file}: a module-name pattern of this adapter ({(full + keys)[0]!r:.60}...) takes seconds "
                         "to match one module name (it backtracks: PEFT would hang on it). Write a simpler pattern, or "
                         "list the names.") from None


def adapter_weights(folder: Path) -> None:
    """adapter_model.safetensors must be there and its header whole; a pickle (.bin) is refused, not loaded."""
    from safetensors import SafetensorError, safe_open

    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        if (folder / "adapter_model.bin").exists():
            raise UsageError(f"{folder} holds adapter_model.bin, a pickle file (loading one can run code): peft-lota "
                             "reads only adapter_model.safetensors; save the adapter with save_pretrained (its "
                             "default writes safetensors).")
        raise UsageError(f"{folder} has no adapter_model.safetensors (the adapter's weights): copy it there, or "
                         "save the adapter again.")
    try:
        with safe_open(str(weights), "pt") as f:
            f.keys()
    except (SafetensorError, OSError) as err:
        raise UsageError(f"{weights} is damaged ({err}): copy it again, or save the adapter again.") from None


def apply_adapter(base, adapter: str):
    """PeftModel.from_pretrained, with an adapter made for another base refused in one line."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(base, adapter)
    except ValueError as err:  # the tuner's "made for a base whose layer ... is ..."; PEFT's "target modules not found"
        raise UsageError(str(err).splitlines()[0]) from None
    except RuntimeError as err:  # torch's "size mismatch for ...": a LoRA of another model
        if "size mismatch" not in str(err):
            raise
        first = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err))
        raise UsageError(f"the adapter {adapter} does not fit this base ({first.rstrip('.')}): it was trained on "
                         "another model. Give the base it was trained on (adapter_config.json names it in "
                         "base_model_name_or_path).") from None


def check_base(cfg: dict, base: str) -> None:
    """Before loading: an adapter of a method that moves a quantized base's integer codes needs that base."""
    from peft_lota.registry import method

    m = method(cfg["peft_type"])
    if m is not None and m.needs_quantized_base and quantization(base) is None:
        raise UsageError(f"{base} is a full-precision model, and a {m.title} adapter moves the integer codes of the "
                         "quantized checkpoint it was trained on: give that checkpoint as the base "
                         f"(adapter_config.json names {cfg.get('base_model_name_or_path')!r}).")


def check_output(out: str, inputs: dict, action: tuple[str, str] = ("merge", "merged")) -> None:
    """Refuse, before loading anything, an OUT that is a file, or that is an input folder, sits inside one or holds
    one (compared by device and inode: a symlink or a bind mount of an input is that input): the merge must never
    write over the files it reads. OUT inside the adapter's folder is fine (runs/lota/merged: finetune's own
    layout); a save writes only its own files into OUT."""
    from peft_lota.paths import separate_output

    if str(out).endswith(".gguf"):  # one file, written atomically next to nothing else
        if os.path.lexists(out):
            raise UsageError(f"OUT {out} already exists: give a new file name (nothing was written, nothing "
                             f"overwritten: the {action[0]} is refused).")
        out = str(Path(out).parent / ".peft_lota-new-gguf")  # its folder, checked against the inputs below
    try:
        separate_output(out, inputs, "OUT", may_contain=("adapter",))
    except ValueError as err:
        raise UsageError(f"{err} (nothing was written: the {action[0]} is refused)") from None


def calibration_blocks(args, tokenizer_dirs: list) -> list:
    """--calib_file cut into [calib_batch, calib_len] token blocks (at most calib_blocks of them, spread over what was
    read), tokenized with the adapter's tokenizer (else the base's). The file is read in pieces only until eight
    times the tokens kept are in hand: a corpus of any size costs a few MB of memory."""
    import torch
    from transformers import AutoTokenizer

    from peft_lota.paths import read_token_ids

    from peft_lota.verify import tokenizer_files

    files = tokenizer_files(tokenizer_dirs)  # the tokenizer the merged checkpoint ships, the same folder's
    source = next(iter(files.values())).parent if files else None
    gguf = next((g for d in tokenizer_dirs if d is not None and (g := gguf_file(d)) is not None), None)
    if source is None and gguf is None:
        raise UsageError("no tokenizer next to the adapter or the base: copy the tokenizer files (tokenizer.json, "
                         "tokenizer_config.json) into one of them.")
    file = Path(args.calib_file)
    try:
        tokenizer = (AutoTokenizer.from_pretrained(source) if source is not None else  # a GGUF file holds its own
                     AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name))
        ids, read, whole = read_token_ids(tokenizer, file, "--calib_file", 8 * args.calib_blocks * args.calib_len)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if not whole:
        print(f"peft-lota merge: --calib_file {file}: read its first {human_size(read)} ({len(ids):,} tokens, 8x the "
              f"{args.calib_blocks} blocks of {args.calib_len} kept), not the whole file.", file=sys.stderr)
    n = len(ids) // args.calib_len
    if n < 2:
        raise UsageError(f"--calib_file {file} holds {len(ids):,} tokens: at least two blocks of --calib_len "
                         f"{args.calib_len} are needed (one is held out to score the merge); give more text like the "
                         "LoRA's training data (128 blocks of 512 tokens is typical).")
    blocks = torch.tensor(ids[: n * args.calib_len]).view(n, args.calib_len)
    if n > args.calib_blocks:  # spread over what was read, not its first pages
        blocks = blocks[torch.linspace(0, n - 1, args.calib_blocks).round().long()]
    return list(blocks.split(max(1, min(args.calib_batch, len(blocks) // 2))))  # two batches at least: one held out


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
