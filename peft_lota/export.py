"""Writing a merged LoTA model as a standard GPTQ checkpoint, locally or to the Hugging Face Hub.

After `merge_and_unload()` the user holds a plain transformers GPTQ model whose integer codes (and,
for one offset mode, zero points) differ from the original checkpoint. Plain `save_pretrained`
cannot be trusted with it (transformers 5.23): it writes the in-memory zero points, which gptqmodel
keeps as true zero points ("gptq_v2"), under whatever label the checkpoint was loaded with, so a
model loaded from a classic "gptq" (v1, stores z - 1) checkpoint reloads with every zero point off by
one. It also records the load-time kernel (e.g. backend "gptq_torch") for everyone who loads it.

`save_gptq_checkpoint` keeps transformers' own machinery (sharding, safetensors, config and
generation config) and only hands it a correct state dict and quantization config:

- format: classic v1 ("gptq") when every true zero point z is in [1, maxq], which every stock
  loader reads. z = 0 cannot be stored in v1 (it would be -1), and gptqmodel converts v1 to v2 at
  load with a packed integer add that would carry into the neighbouring zero point for a stored
  maxq, so [1, maxq] is exactly the safe range. Otherwise "gptq_v2" (true z), which only
  gptqmodel-based loaders read; a warning says so.
- `sym` stays True only if every zero point is still 2**(bits-1): symmetric kernels (Marlin) may
  ignore qzeros.
- `backend` is "auto": the checkpoint does not pin the kernel the model happened to be trained with.
- `quantize_config.json` is written too, for GPTQModel's own tools (it reads that file first).

Saving is atomic: everything is written into a temporary sibling folder, which then replaces the
target; files of the target that are not ours (tokenizer, notes, ...) are carried over.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from . import __version__, codec

logger = logging.getLogger(__name__)

# Files a save writes or makes stale. Every weight file is ours: a stale single-file checkpoint
# next to a new sharded one would be loaded instead of it.
WEIGHT_PATTERNS = ("model*.safetensors", "model*.safetensors.index.json", "pytorch_model*.bin",
                   "pytorch_model*.bin.index.json")
CONFIG_FILES = ("config.json", "generation_config.json", "quantize_config.json")
CARD_NAME = "README.md"
CARD_MARKER = "<!-- written by peft_lota: safe to regenerate -->"

# Kernels that keep qweight/qzeros/scales/g_idx in the standard GPTQ layout (until a CPU kernel's
# first inference call, see _layout_problem). All others (Marlin, Machete, ExLlama, BitBLAS, ...)
# repack at load and their buffers are not a GPTQ checkpoint.
LAYOUT_KEEPING_KERNELS = ("TorchLinear", "TritonV2Linear", "TorchAtenLinear", "TorchCpuAvx512Linear",
                          "TorchFusedLinear")
_RELOAD_HINT = ("Reload the model with a layout-keeping kernel, e.g. AutoModelForCausalLM.from_pretrained(path, "
                "quantization_config=GPTQConfig(bits={bits}, backend='gptq_torch')), and merge again.")


# ---- what to write ---------------------------------------------------------------------------------

def _gptq_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    return [(n, m) for n, m in model.named_modules() if isinstance(m, BaseQuantLinear)]


def _layout_problem(name: str, layer: nn.Module) -> Optional[str]:
    cls = type(layer).__name__
    if cls not in LAYOUT_KEEPING_KERNELS:
        return f"layer {name} uses the {cls} kernel, which repacks GPTQ weights into its own layout."
    if getattr(layer, "_cpu_transformed", False) or getattr(layer, "linear_mode", None) == "inference":
        return f"layer {name} ({cls}) has repacked its weights for fast CPU inference (on its first call)."
    if getattr(layer, "planar", False) or layer.bits not in (2, 3, 4, 8) or layer.pack_dtype != torch.int32:
        return f"layer {name} ({cls}) holds {layer.bits}-bit codes in a layout a GPTQ checkpoint cannot name."
    K, N, b = layer.in_features, layer.out_features, layer.bits
    if (tuple(layer.qweight.shape) != (K * b // 32, N) or layer.qzeros.shape[0] != layer.scales.shape[0]
            or tuple(layer.g_idx.shape) != (K,)):
        return f"layer {name} ({cls}) has buffers of non-standard shapes."
    return None


def _true_zeros(layer: nn.Module, loaded_format: str) -> torch.Tensor:
    """Packed true zero points (v2) of a layer, whatever its in-memory format.

    gptqmodel's `qzero_format()` marker is 2 only when it converted v1 -> v2 itself; a layer loaded
    from a "gptq_v2" checkpoint holds true zeros under the default marker 1. So: v2 unless the
    checkpoint was v1 and the layer was never converted.
    """
    if layer.qzero_format() == 2 or loaded_format == "gptq_v2":
        return layer.qzeros.data
    return codec.zeros_v1_to_v2(layer.qzeros.data, layer.bits)


def _as_dict(qcfg) -> dict:
    return dict(qcfg) if isinstance(qcfg, dict) else qcfg.to_dict()


def _prepare(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """The state dict and quantization config of a standard GPTQ checkpoint of `model`."""
    _refuse_unmerged(model)
    config = getattr(model, "config", None)
    qcfg = getattr(config, "quantization_config", None)
    if qcfg is None or _as_dict(qcfg).get("quant_method") != "gptq":
        raise ValueError("save_gptq_checkpoint needs a transformers model loaded from a GPTQ checkpoint "
                         "(config.quantization_config with quant_method 'gptq').")
    qc = _as_dict(qcfg)
    loaded_format = (qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
    bits = int(qc["bits"])

    layers = _gptq_layers(model)
    problems = [p for n, m in layers if (p := _layout_problem(n, m))]
    if problems:
        raise ValueError("Cannot write a standard GPTQ checkpoint from this model:\n- " + "\n- ".join(problems[:3])
                         + (f"\n(and {len(problems) - 3} more)" if len(problems) > 3 else "") + "\n"
                         + _RELOAD_HINT.format(bits=bits))
    if not layers:
        raise ValueError("This model has no gptqmodel GPTQ layers; nothing to write as a GPTQ checkpoint.")
    if any(m.bits != bits for _, m in layers):
        raise ValueError(f"Layers of several bit widths (config says {bits}); per-layer bits are not supported.")

    true_zeros = {n: _true_zeros(m, loaded_format) for n, m in layers}
    unpacked = [(codec.unpack_qzeros(true_zeros[n], bits), m.out_features) for n, m in layers]
    fits_v1 = all(int(z.min()) >= 1 for z, _ in unpacked)  # z <= maxq always holds in b bits
    still_sym = all(bool((z[:, :n] == 1 << (bits - 1)).all()) for z, n in unpacked)  # [:, :n]: word padding
    fmt = "gptq" if fits_v1 else "gptq_v2"
    if not fits_v1:
        logger.warning("peft_lota: some zero points are 0, which the classic GPTQ format cannot store; writing a "
                       "'gptq_v2' checkpoint. Only gptqmodel-based loaders (transformers/optimum with gptqmodel, "
                       "GPTQModel) read it; vLLM, TGI, ExLlama and AutoGPTQ do not.")

    # Replace only qzeros: every other tensor is written exactly as it is in memory.
    state_dict = model.state_dict()
    for name, layer in layers:
        z = true_zeros[name]
        state_dict[f"{name}.qzeros" if name else "qzeros"] = codec.zeros_v2_to_v1(z, bits) if fmt == "gptq" else z

    qc.update(format=fmt, checkpoint_format=fmt, sym=bool(qc.get("sym", True)) and still_sym,
              backend="auto",  # what stock loading picks anyway; never pin a training kernel
              dataset=None, tokenizer=None)  # calibration inputs, not part of a checkpoint
    meta = dict(qc.get("meta") or {})
    meta["quantizer"] = [q for q in (meta.get("quantizer") or []) if not q.startswith("peft_lota:")]
    meta["quantizer"].append(f"peft_lota:{__version__}")
    qc["meta"] = meta
    return state_dict, qc


def _refuse_unmerged(model: nn.Module) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    if hasattr(model, "peft_config") or any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise ValueError("This model still holds PEFT adapter layers. Call `merge_and_unload()` first and save the "
                         "model it returns (or save the adapter alone with `peft_model.save_pretrained`).")


def _quantize_config_json(qc: dict) -> dict:
    """What GPTQModel's own save writes to quantize_config.json (its QuantizeConfig.to_dict), minus run-time noise."""
    meta = dict(qc.get("meta") or {})
    for key in ("damp_percent", "true_sequential", "act_group_aware"):
        if qc.get(key) is not None:
            meta.setdefault(key, qc[key])
    return {"bits": qc["bits"], "group_size": qc["group_size"], "desc_act": qc["desc_act"], "sym": qc["sym"],
            "lm_head": False, "method": "gptq", "quant_method": "gptq", "format": qc["format"],
            "checkpoint_format": qc["format"], "pack_dtype": "int32", "meta": meta}


# ---- writing ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def _saving_as(model: nn.Module, state_dict: dict, qc: dict):
    """Make transformers' save_pretrained write `state_dict` and `qc`; restore the model afterwards.

    For a quantized model, save_pretrained ignores its `state_dict=` argument and asks
    `hf_quantizer.get_state_dict_and_metadata(model)`: we answer that call on this instance only.
    save_pretrained also sets config.dtype/architectures: the whole config is put back as it was.
    """
    config = model.config
    saved_config = dict(vars(config))
    quantizer = getattr(model, "hf_quantizer", None)
    had_hook = quantizer is not None and "get_state_dict_and_metadata" in vars(quantizer)
    old_hook = vars(quantizer).get("get_state_dict_and_metadata") if quantizer is not None else None
    try:
        config.quantization_config = qc
        if quantizer is not None:
            quantizer.get_state_dict_and_metadata = lambda _model: (state_dict, {})
        yield
    finally:
        vars(config).clear()
        vars(config).update(saved_config)
        if quantizer is not None:
            if had_hook:
                quantizer.get_state_dict_and_metadata = old_hook
            else:
                vars(quantizer).pop("get_state_dict_and_metadata", None)


def _write(model, folder: Path, *, lota_info: Optional[dict], write_card: bool, max_shard_size, save_kwargs: dict):
    """Write the complete checkpoint into the empty folder `folder`."""
    state_dict, qc = _prepare(model)
    with _saving_as(model, state_dict, qc):
        # type(model).save_pretrained: attach_gptq_export shadows the instance's own.
        type(model).save_pretrained(model, str(folder), max_shard_size=max_shard_size,
                                    state_dict=None if getattr(model, "hf_quantizer", None) else state_dict,
                                    **save_kwargs)
    (folder / "quantize_config.json").write_text(json.dumps(_quantize_config_json(qc), indent=2) + "\n")
    if lota_info is not None and write_card:
        (folder / CARD_NAME).write_text(model_card(lota_info, qc), encoding="utf-8")
    return qc


def _is_ours(filename: str) -> bool:
    return filename in CONFIG_FILES or any(fnmatch.fnmatch(filename, p) for p in WEIGHT_PATTERNS)


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)  # same filesystem (sibling folder): no data copied
    except OSError:
        shutil.copy2(src, dst)


def _commit(staged: Path, target: Path) -> None:
    """Make `staged` the new `target`, keeping the target's files that are not ours."""
    if not target.exists():
        os.rename(staged, target)
        return
    for entry in target.iterdir():
        if (staged / entry.name).exists() or _is_ours(entry.name):
            continue  # replaced by the new checkpoint, or stale weights of an old one
        if entry.is_symlink():
            os.symlink(os.readlink(entry), staged / entry.name)
        elif entry.is_dir():
            shutil.copytree(entry, staged / entry.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, staged / entry.name)
    # Two renames: at every moment `target` is the complete old or the complete new folder, except
    # for the instant between them (POSIX has no portable atomic directory exchange).
    graveyard = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rename(target, graveyard / target.name)
    try:
        os.rename(staged, target)
    except BaseException:
        os.rename(graveyard / target.name, target)  # put the old folder back (if this fails, it stays there)
        os.rmdir(graveyard)
        raise
    shutil.rmtree(graveyard, ignore_errors=True)


def save_gptq_checkpoint(model: nn.Module, save_directory, *, lota_info: Optional[dict] = None,
                         max_shard_size: int | str = "50GB", overwrite_readme: bool = False, **save_kwargs) -> Path:
    """Write `model` (a merged transformers GPTQ model) as a standard GPTQ checkpoint into `save_directory`.

    The checkpoint holds exactly the in-memory codes, zero points, scales, g_idx and bias, and loads with
    stock `AutoModelForCausalLM.from_pretrained(save_directory)`. Format, `sym` and backend are chosen as
    described in this module's docstring.

    Args:
        lota_info: if given, a model card (README.md) is written from it: keys base_model, r, omega,
            offset, and optionally license, datasets, adapters, bits, group_size (checked against the model).
        overwrite_readme: an existing README.md in `save_directory` that peft_lota did not write is kept
            unless this is True (a card we wrote earlier is always refreshed).
        save_kwargs: passed to transformers' save_pretrained (e.g. `variant`, `is_main_process`).
            `safe_serialization=False`, `state_dict` and `push_to_hub` are refused.

    The write is atomic: on any error the target folder is untouched. Files in an existing target that are
    not part of a checkpoint (tokenizer files, notes, ...) are kept.
    Returns the path of the checkpoint folder.
    """
    _check_save_kwargs(save_kwargs)
    if not save_kwargs.pop("is_main_process", True):
        return Path(save_directory)  # like transformers: only the main process writes
    target = Path(save_directory).resolve()
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} exists and is not a directory.")
    target.parent.mkdir(parents=True, exist_ok=True)
    existing_card = target / CARD_NAME
    write_card = (overwrite_readme or not existing_card.exists()
                  or CARD_MARKER in existing_card.read_text(encoding="utf-8", errors="replace"))
    if lota_info is not None and not write_card:
        logger.warning("peft_lota: %s already has a README.md that peft_lota did not write; keeping it "
                       "(pass overwrite_readme=True to replace it with the LoTA model card).", target)
    staged = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _write(model, staged, lota_info=lota_info, write_card=write_card, max_shard_size=max_shard_size,
               save_kwargs=save_kwargs)
        _commit(staged, target)
    finally:
        shutil.rmtree(staged, ignore_errors=True)  # gone already after a successful commit
    if (target / "adapter_config.json").exists():
        logger.warning("peft_lota: %s also holds adapter_config.json; transformers will load the folder as a PEFT "
                       "adapter, not as this merged checkpoint. Remove it or save elsewhere.", target)
    return target


def _check_save_kwargs(save_kwargs: dict) -> None:
    if save_kwargs.pop("safe_serialization", True) is False:
        raise ValueError("GPTQ checkpoints are written as safetensors only; safe_serialization=False is not supported.")
    if save_kwargs.get("state_dict") is not None:
        raise ValueError("save_gptq_checkpoint computes the state dict itself; do not pass `state_dict`.")
    save_kwargs.pop("state_dict", None)
    if save_kwargs.pop("distributed_checkpoint", False):
        raise ValueError("distributed_checkpoint=True writes DCP shards, not a GPTQ checkpoint; it is not supported.")
    if save_kwargs.get("push_to_hub"):
        raise ValueError("Use push_gptq_checkpoint_to_hub (or model.push_to_hub after attach_gptq_export).")
    save_kwargs.pop("push_to_hub", None)


# ---- the Hub ---------------------------------------------------------------------------------------

def push_gptq_checkpoint_to_hub(model: nn.Module, repo_id: str, *, lota_info: Optional[dict] = None,
                                private: Optional[bool] = None, token=None,
                                commit_message: str = "Upload GPTQ model fine-tuned with LoTA-QAF (peft_lota)",
                                commit_description: Optional[str] = None, revision: Optional[str] = None,
                                create_pr: bool = False, max_shard_size: int | str = "50GB", **save_kwargs):
    """Save through save_gptq_checkpoint into a temporary folder and upload it to the Hub repo `repo_id`.

    The model card (when `lota_info` is given) replaces the repo's README.md. Weight files of an earlier
    upload that this one does not contain are deleted from the repo, so that no stale shard or index
    shadows the new checkpoint. Returns the commit info of `HfApi.upload_folder`.
    """
    from huggingface_hub import HfApi

    with tempfile.TemporaryDirectory() as tmp:
        folder = save_gptq_checkpoint(model, Path(tmp) / "checkpoint", lota_info=lota_info,
                                      max_shard_size=max_shard_size, **save_kwargs)
        return _upload(HfApi(token=token), folder, repo_id, private=private, commit_message=commit_message,
                       commit_description=commit_description, revision=revision, create_pr=create_pr)


def _upload(api, folder: Path, repo_id: str, *, private, commit_message, commit_description, revision, create_pr,
            allow_patterns=None):
    repo_id = api.create_repo(repo_id, exist_ok=True, private=private).repo_id
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                             commit_description=commit_description, revision=revision, create_pr=create_pr,
                             allow_patterns=allow_patterns, delete_patterns=list(WEIGHT_PATTERNS))


# ---- merged model methods ------------------------------------------------------------------------

def attach_gptq_export(model: nn.Module, lota_info: Optional[dict] = None) -> nn.Module:
    """Make `model.save_pretrained(dir)` and `model.push_to_hub(repo)` write correct GPTQ checkpoints.

    Installs instance methods (the class is untouched) that go through save_gptq_checkpoint and
    push_gptq_checkpoint_to_hub with `lota_info` for the model card. Returns `model`.
    """

    def save_pretrained(save_directory, is_main_process: bool = True, state_dict=None, push_to_hub: bool = False,
                        max_shard_size: int | str = "50GB", variant: Optional[str] = None, token=None, *,
                        safe_serialization: bool = True, overwrite_readme: bool = False, **kwargs):
        if state_dict is not None:
            raise ValueError("This merged LoTA model writes its own GPTQ state dict; do not pass `state_dict`.")
        hub_kwargs = {k: kwargs.pop(k) for k in ("repo_id", "commit_message", "commit_description", "private",
                                                 "create_pr", "revision") if k in kwargs}
        folder = save_gptq_checkpoint(model, save_directory, lota_info=lota_info, max_shard_size=max_shard_size,
                                      overwrite_readme=overwrite_readme, is_main_process=is_main_process,
                                      variant=variant, safe_serialization=safe_serialization, **kwargs)
        if push_to_hub and is_main_process:  # as transformers does: upload what this save wrote
            from huggingface_hub import HfApi

            written = [p.name for p in folder.iterdir() if _is_ours(p.name) or p.name == CARD_NAME
                       and CARD_MARKER in p.read_text(encoding="utf-8", errors="replace")]
            _upload(HfApi(token=token), folder, hub_kwargs.pop("repo_id", Path(save_directory).name),
                    private=hub_kwargs.get("private"),
                    commit_message=hub_kwargs.get("commit_message") or "Upload GPTQ model (peft_lota)",
                    commit_description=hub_kwargs.get("commit_description"), revision=hub_kwargs.get("revision"),
                    create_pr=hub_kwargs.get("create_pr", False), allow_patterns=written)

    def push_to_hub(repo_id: str, *, commit_message: Optional[str] = None, commit_description: Optional[str] = None,
                    private: Optional[bool] = None, token=None, revision: Optional[str] = None,
                    create_pr: bool = False, max_shard_size: int | str = "50GB", tags: Optional[list[str]] = None,
                    safe_serialization: bool = True, **kwargs):
        info = lota_info if not tags or lota_info is None else {**lota_info, "tags": list(tags)}
        return push_gptq_checkpoint_to_hub(
            model, repo_id, lota_info=info, private=private, token=token,
            commit_message=commit_message or "Upload GPTQ model fine-tuned with LoTA-QAF (peft_lota)",
            commit_description=commit_description, revision=revision, create_pr=create_pr,
            max_shard_size=max_shard_size, safe_serialization=safe_serialization, **kwargs)

    model.save_pretrained = save_pretrained
    model.push_to_hub = push_to_hub
    return model


# ---- model card ----------------------------------------------------------------------------------

def model_card(lota_info: dict, quantization_config: dict) -> str:
    """README.md for a merged LoTA checkpoint. Strings are written as JSON, which YAML reads verbatim."""
    qc, info = quantization_config, dict(lota_info)
    for key in ("bits", "group_size"):
        if info.get(key) is not None and int(info[key]) != int(qc[key]):
            raise ValueError(f"lota_info says {key}={info[key]}, but the checkpoint has {key}={qc[key]}.")
    base = info.get("base_model")
    tags = ["gptq", "peft-lota", "lota-qaf"]
    tags += [t for t in info.get("tags") or [] if t not in tags]
    # The Hub rejects a base_model that is not a repo id (e.g. a local path): that one goes in the text only.
    is_hub_id = bool(base) and re.fullmatch(r"[\w.-]+/[\w.-]+", str(base)) is not None
    base_ref = f"[{base}](https://huggingface.co/{base})" if is_hub_id else f"`{base}`"
    front = [f"base_model: {json.dumps(str(base))}"] if is_hub_id else []
    front.append("library_name: transformers")
    if info.get("license"):
        front.append(f"license: {json.dumps(str(info['license']))}")
    datasets = info.get("datasets")
    if datasets:
        datasets = [datasets] if isinstance(datasets, str) else datasets
        front += ["datasets:"] + [f"- {json.dumps(str(d))}" for d in datasets]
    front += ["tags:"] + [f"- {json.dumps(t)}" for t in tags]

    v1 = qc["format"] == "gptq"
    rows = [("bits", qc["bits"]), ("group size", qc["group_size"]), ("act-order (desc_act)", qc.get("desc_act")),
            ("symmetric", qc["sym"]), ("checkpoint format", f"`{qc['format']}`"),
            ("LoTA rank r", info.get("r")), ("LoTA threshold omega", info.get("omega")),
            ("LoTA offset mode", info.get("offset"))]
    known = {"base_model", "bits", "group_size", "r", "omega", "offset", "license", "datasets", "tags"}
    rows += [(k, v) for k, v in info.items() if k not in known and v is not None]
    show = lambda v: "" if v is None else ", ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
    table = "\n".join(f"| {k} | {show(v)} |" for k, v in rows)
    return "\n".join([
        "---", *front, "---", CARD_MARKER, "",
        f"# {base.split('/')[-1] + ' ' if base else ''}LoTA-QAF (GPTQ {qc['bits']}-bit)", "",
        f"This model{f' is {base_ref}, quantized with GPTQ and' if base else ' was'} "
        "fine-tuned with [LoTA-QAF](https://arxiv.org/abs/2505.18724) (lossless ternary adaptation for "
        "quantization-aware fine-tuning) using `peft_lota`.",
        "", "The ternary adapters were merged losslessly on the integer grid: their thresholded product moved "
        "each GPTQ integer code by -1, 0 or +1, and the result was written back into the packed integer "
        "weights. It is a standard GPTQ checkpoint with no adapter and no extra tensors, and runs at plain "
        "GPTQ speed.", "",
        "| setting | value |", "|---|---|", table, "",
        "## Use", "", "```python", "from transformers import AutoModelForCausalLM", "",
        'model = AutoModelForCausalLM.from_pretrained("<this repo or folder>")', "```", "",
        "Needs `gptqmodel` (and `optimum`) installed." if v1 else
        "This checkpoint is in the `gptq_v2` format (some zero points are 0, which the classic format cannot "
        "store): it loads with transformers/optimum + gptqmodel and with GPTQModel, not with vLLM, TGI, "
        "ExLlama or AutoGPTQ.", "",
    ])
