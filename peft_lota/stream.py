"""Merging an adapter into a quantized checkpoint file by file, without building the model (70B on a small machine).

The base's safetensors files are read through memory maps, one shard at a time. The adapted layers whose tensors
sit in a shard are rebuilt alone from those tensors (`Format.layer_from_tensors`), wrapped by the adapter's own
method exactly as `get_peft_model` wraps them in a whole model, given their part of the adapter file, and merged by
the method's own `merge_and_unload`: the merged tensors are the in-memory merge's, bit for bit. Every other tensor
is copied as it is. The result keeps the base's shard names and index, and its config gains only what the merge
changes (the format's `checkpoint_config`); it is written through export's staged, atomic commit. Peak memory: about
one shard, plus the adapter tensors of that shard's layers.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from . import formats
from .loading import quantization_config
from .paths import check_index, copy_into, own_file, separate_output
from .guards import refuse_non_finite_checkpoint
from .verify import tokenizer_files

logger = logging.getLogger(__name__)

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
COPIED = ("generation_config.json",)  # the tokenizer: verify.tokenizer_files, as every merge path ships it


@dataclass
class StreamReport:
    """What a streaming merge did: layers merged, codes moved, shards written, time and peak memory of the process."""

    layers: int = 0
    codes_moved: int = 0
    codes: int = 0
    shards: int = 0
    seconds: float = 0.0
    peak_rss_mib: float = 0.0
    checkpoint_format: Optional[str] = None
    per_shard_seconds: list = field(default_factory=list)
    verified_tensors: int = 0  # merged tensors read back from the written files, equal to what was computed


def _weight_map(base: Path) -> dict:
    """{tensor name: shard file} of a checkpoint folder (sharded or single-file). Every shard name the index gives
    is checked to be a plain `*.safetensors` name inside `base` before anything is opened (a downloaded index could
    name any path), and every tensor it maps must be in its shard."""
    weight_map = check_index(base)
    if weight_map is not None:
        with _Shards(base) as shards:
            for shard in sorted(set(weight_map.values())):
                held = shards.keys(shard)
                lacking = [k for k, s in weight_map.items() if s == shard and k not in held]
                if lacking:
                    raise ValueError(f"{base / INDEX} maps {lacking[0]} to {shard}, which does not hold it: the index "
                                     "and the shards are from different checkpoints; copy the checkpoint again.")
                shards.close()
        return weight_map
    if not (base / SINGLE).is_file():
        raise ValueError(f"{base} holds no {SINGLE} or {INDEX}: the streaming merge reads safetensors checkpoints.")
    with _Shards(base) as shards:
        return {k: SINGLE for k in shards.keys(SINGLE)}


def adapter_layers(adapter: Path, prefix: str) -> dict:
    """{layer name in the base: [adapter tensor keys]} from the adapter file's keys ("base_model.model.<layer>.<prefix>...").
    Any other tensor (modules_to_save: whole modules trained in full precision) is refused: this merge writes only the
    adapted layers' codes."""
    from safetensors import safe_open

    layers = {}
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        for key in f.keys():
            head, sep, _ = key.partition(f".{prefix}")
            if not sep:
                raise ValueError(f"the adapter also holds {key} (a module trained whole: modules_to_save), which the "
                                 "streaming merge does not write; merge in memory (peft-lota merge without --stream).")
            layers.setdefault(head.removeprefix("base_model.model."), []).append(key)
    return layers


class _Tree(nn.Module):
    """An empty model holding modules at dotted paths (what PEFT's injection and key mapping expect)."""

    def place(self, name: str, module: nn.Module) -> None:
        parent = self
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, module)


def _merge_group(names: list, tensors: dict, adapter: Path, adapter_config, adapter_keys: dict, qc: dict, fmt,
                 safe: bool, count: bool):
    """Merge the adapter into these layers, rebuilt alone from their tensors (merge_layers)."""
    layers = {}
    for name in names:
        try:
            layers[name] = fmt.layer_from_tensors(tensors[name], qc)
        except ValueError as err:
            raise ValueError(f"{name}: {str(err).splitlines()[0]}") from None
    return merge_layers(layers, adapter, adapter_config, adapter_keys, qc, safe, count)


def merge_layers(layers: dict, adapter: Path, adapter_config, adapter_keys: dict, qc: Optional[dict], safe: bool,
                 count: bool):
    """Merge the saved adapter into `layers` ({name in the base: quantized layer}, built alone): each is placed at its
    name in an empty model, wrapped by the adapter's method as get_peft_model wraps it in the whole model, given its
    part of the adapter file (`adapter_keys[name]`) and merged by the method's merge_and_unload. Returns ({name:
    merged layer}, (codes moved, codes)), the counts only if `count` (decoding every code twice costs about as much
    as the merge)."""
    import copy

    from peft import get_peft_model, set_peft_model_state_dict
    from safetensors import safe_open
    from transformers import PretrainedConfig

    names = list(layers)
    config = copy.deepcopy(adapter_config)  # (get_peft_model writes into it)
    tree = _Tree()
    tree.name_or_path = config.base_model_name_or_path  # (PEFT records it from the model)
    tree.config = PretrainedConfig()
    if qc is not None:
        tree.config.quantization_config = dict(qc)
    before = {}
    for name, layer in layers.items():
        tree.place(name, layer)
        if count:  # the state holds the base's packed codes, whatever the merge swaps in
            before[name] = formats.dispatch(layer, name).read()
    config.target_modules = set(names)  # exactly these layers, by full name
    config.layers_to_transform = config.layers_pattern = None
    config.task_type = None  # a plain PeftModel around the tree
    config.inference_mode = True
    model = get_peft_model(tree, config)
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        state = {k: f.get_tensor(k) for n in names for k in adapter_keys[n]}
    try:
        set_peft_model_state_dict(model, state)
    except RuntimeError as err:  # (load_state_dict's size mismatch)
        if "size mismatch" not in str(err):
            raise
        detail = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), "")
        raise ValueError(f"the adapter's tensors do not fit the base's layers ({detail}): it was made for another "
                         "base model.") from None
    merged = model.merge_and_unload(safe_merge=safe)
    layers = {n: merged.get_submodule(n) for n in names}
    for n in names:  # out of the tree, whose reference cycles (PEFT's, export's) would keep them until a collection
        parent, _, leaf = n.rpartition(".")
        delattr(merged.get_submodule(parent) if parent else merged, leaf)
    moved = codes = 0
    for n, layer in layers.items() if count else ():  # decoded before and after, a few rows at a time (memory), and compared
        after, base = formats.dispatch(layer, n).read(), before.pop(n)
        step = base.row_align * max(1, 1024 // base.row_align)
        for k0 in range(0, base.in_features, step):
            k1 = min(k0 + step, base.in_features)
            moved += int(torch.count_nonzero(after.codes_rows(k0, k1) != base.codes_rows(k0, k1)))
        codes += base.in_features * base.scales.shape[1]
    return layers, (moved, codes)


def merge_checkpoint(base, adapter, out, *, safe: bool = False, count_codes: bool = False,
                     progress: bool = True, tokenizer_from: Optional[list] = None) -> StreamReport:
    """Merge the saved adapter (a method of peft_lota's, trained on the quantized checkpoint `base`) into `base`'s
    files, shard by shard, and write the merged checkpoint into `out` (its own folder: never `base`).

    The merged tensors equal those of `merge_and_unload()` on the loaded model, saved: the method's own merge runs on
    each layer, rebuilt alone. The base's shard layout, tensor names and other tensors are kept. Returns a
    StreamReport (also logged); `count_codes` also counts the codes the merge moved (about 1.5x the time). The
    tokenizer written with it, in the same commit: `verify.tokenizer_files(tokenizer_from)`, by default the
    adapter's folder's, else the base's (what the in-memory merge ships). Formats: those that stream
    (`Format.can_stream`); others are refused with the way out (`peft-lota merge` without --stream).
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from .export import commit_checkpoint
    from .registry import method as method_named

    started = time.time()
    base, adapter, out = Path(base), Path(adapter), Path(out)
    separate_output(out, {"base": base, "adapter": adapter}, "OUT", may_contain=("adapter",))
    qc = quantization_config(base)
    if qc is None:
        raise ValueError(f"{base} is a full-precision model: the streaming merge reads a quantized checkpoint's codes "
                         "(merge an adapter trained from full precision in memory: peft-lota merge without --stream).")
    fmt = formats.config_format(qc)
    if not fmt.can_stream:
        raise ValueError(f"the streaming merge does not read {fmt.title} checkpoints yet; merge in memory (peft-lota "
                         "merge without --stream).")
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    method = method_named(str(adapter_config.get("peft_type")))
    if method is None:
        raise ValueError(f"{adapter} holds a {adapter_config.get('peft_type')} adapter; the streaming merge merges "
                         "peft_lota's own methods exactly (a LoRA: peft-lota merge --calib_file).")
    peft_config = method.config_class.from_pretrained(str(adapter))  # read once, copied for each shard
    tokenizer = tokenizer_files(tokenizer_from if tokenizer_from is not None else [adapter, base])
    weight_map = _weight_map(base)
    layers = adapter_layers(adapter, method.prefix)
    missing = [n for n in layers if f"{n}.{fmt.layer_tensor_names[0]}" not in weight_map]
    if missing:
        raise ValueError(f"the adapter adapts {missing[0]}, which {base} has no {fmt.title} layer of: it was made for "
                         "another base model.")
    # Each adapted layer is merged with the first shard (in writing order) that holds any of its tensors; a layer whose
    # tensors straddle shards keeps its merged tensors for the later ones (`pending`).
    order = sorted(set(weight_map.values()))
    by_shard: dict = {}
    for name in layers:
        shards_of = [weight_map[f"{name}.{s}"] for s in fmt.layer_tensor_names if f"{name}.{s}" in weight_map]
        by_shard.setdefault(min(shards_of, key=order.index), []).append(name)

    # The checkpoint format is decided before any shard is written, from the base's zero points (cheap to read):
    # merges keep every zero point inside the format's storable range, so one that fits stays fitting.
    fits, still_sym = True, True  # (whether the base was symmetric: the format's checkpoint_config knows)
    with _Shards(base) as shards:
        zeros = fmt.zero_point_tensors  # (a format that stores none: every zero point is the centre, which fits)
        for name in sorted({k.rsplit(".", 1)[0] for k in weight_map if zeros and k.endswith(f".{zeros[0]}")}):
            tensors = shards.layer(name, zeros, weight_map)  # only what the zero points need: not the codes
            fits = fits and int(fmt.true_zeros_of(tensors, qc).min()) >= 1
        shards.close()  # (pages of a memory map count as resident while it is open)
        qc_out, _, facts = fmt.checkpoint_config(dict(qc), fits, True)  # sym: settled after the merge
        report = StreamReport(checkpoint_format=facts.get("checkpoint_format"))

        def write(staged: Path, write_card: bool) -> None:
            nonlocal still_sym
            pending = {}  # merged tensors of layers merged with an earlier shard
            for shard in tqdm(order, desc="merging shards", disable=not progress, unit="shard"):
                t0 = time.time()
                names = by_shard.get(shard, [])
                try:
                    merged, moved = ({}, (0, 0)) if not names else _merge_group(
                        names, {n: shards.layer(n, fmt.layer_tensor_names, weight_map) for n in names}, adapter,
                        peft_config, layers, qc, fmt, safe, count_codes)
                except ValueError as err:  # a damaged layer: which file (nothing of OUT is written yet)
                    message = str(err).splitlines()[0]
                    raise ValueError(message if str(base) in message else f"{base / shard}: {message}") from None
                for n, layer in merged.items():
                    written = fmt.layer_tensors(layer, qc_out)
                    center = (formats.dispatch(layer, n).maxq + 1) // 2
                    still_sym = still_sym and bool((fmt.true_zeros_of(written, qc_out) == center).all())
                    pending.update({f"{n}.{k}": v.contiguous() for k, v in written.items()})
                    digests.update({f"{n}.{k}": _digest(v) for k, v in written.items()})
                keys = [k for k, s in weight_map.items() if s == shard]
                tensors = {k: pending.pop(k) if k in pending else shards.get(k, weight_map) for k in keys}
                refuse_non_finite_checkpoint(tensors)  # copied tensors too: the in-memory merge's save refuses them
                save_file(tensors, str(staged / shard), metadata={"format": "pt"})
                report.layers += len(merged)
                report.codes_moved += moved[0]
                report.codes += moved[1]
                report.shards += 1
                report.per_shard_seconds.append(round(time.time() - t0, 2))
                del tensors, merged
                shards.close()
                gc.collect()  # the shard's PEFT model is a graph of reference cycles: free its buffers now
            if pending:
                raise RuntimeError(f"merged tensors {sorted(pending)[:3]} were never written: a bug in peft_lota.")
            if (base / INDEX).is_file():
                (staged / INDEX).write_text((base / INDEX).read_text())
            final_qc, final_extra, _ = fmt.checkpoint_config(dict(qc), fits, still_sym)
            config = json.loads((base / "config.json").read_text())
            config["quantization_config"] = final_qc
            (staged / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            for name, text in final_extra.items():
                (staged / name).write_text(text)
            for name in COPIED:
                source = own_file(base, name)  # (a link out of the base's folder is not its file)
                if source is not None:
                    copy_into(source, staged, name)
            for name, source in tokenizer.items():
                copy_into(source, staged, name)

        digests: dict = {}
        # What exists now is never garbage: frozen, the collection after each shard scans only the new objects. A
        # caller who froze objects of their own keeps them frozen (unfreeze has no undo of one freeze only).
        caller_froze = gc.get_freeze_count() > 0
        gc.freeze()
        try:
            commit_checkpoint(out, write)
        finally:
            if not caller_froze:
                gc.unfreeze()
    report.verified_tensors = _verify(out, digests)
    report.seconds = round(time.time() - started, 1)
    report.peak_rss_mib = peak_rss_mib()
    logger.info("peft_lota: streamed %d layers over %d shards in %.0f s (peak RSS %.0f MiB).", report.layers,
                report.shards, report.seconds, report.peak_rss_mib)
    return report


def _digest(t: torch.Tensor) -> tuple:
    """A CRC-32 of the tensor's bytes (a check against what the disk returns, not against an adversary), its dtype
    and shape."""
    import zlib

    data = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()  # a view: no copy of the tensor
    return zlib.crc32(memoryview(data)), str(t.dtype), tuple(t.shape)


def _verify(out: Path, digests: dict) -> int:
    """Read every merged tensor back from the written checkpoint and compare it with what the merge computed."""
    weight_map = _weight_map(out)
    bad = []
    with _Shards(out) as shards:
        for shard in sorted({weight_map[k] for k in digests}):  # one shard mapped at a time (resident pages)
            bad += [k for k, d in digests.items() if weight_map[k] == shard and _digest(shards.get(k, weight_map)) != d]
            shards.close()
    if bad:
        raise RuntimeError(f"{out}: the written {bad[0]} differs from the merged one (disk or filesystem trouble?); "
                           "write the checkpoint again.")
    return len(digests)


class _Shards:
    """The base's shard files, opened once each (memory-mapped) for reading tensors by name."""

    def __init__(self, base: Path):
        self.base, self.open = base, {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        for f in self.open.values():
            f.__exit__(None, None, None)
        self.open.clear()

    def _file(self, shard: str):
        """The opened shard: a regular file (or a link to one: a Hub cache snapshot), its header checked by
        safetensors; a damaged one is a ValueError naming it."""
        import os
        import stat

        from safetensors import SafetensorError, safe_open

        if shard not in self.open:
            path = self.base / shard
            try:
                regular = stat.S_ISREG(os.stat(path).st_mode)
            except OSError as err:
                raise ValueError(f"{path}: {err.strerror or err} (the index names a shard the folder lacks: copy the "
                                 "checkpoint again).") from None
            if not regular:
                raise ValueError(f"{path} is not a regular file: copy the checkpoint again.")
            try:
                self.open[shard] = safe_open(str(path), "pt").__enter__()
            except (SafetensorError, OSError) as err:
                raise ValueError(f"{path} is damaged ({str(err).splitlines()[0]}): copy the checkpoint again.") from None
        return self.open[shard]

    def keys(self, shard: str) -> set:
        return set(self._file(shard).keys())

    def get(self, key: str, weight_map: dict) -> torch.Tensor:
        from safetensors import SafetensorError

        shard = weight_map[key]
        try:
            return self._file(shard).get_tensor(key)
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{self.base / shard}: cannot read {key} ({str(err).splitlines()[0]}): the file is "
                             "damaged; copy the checkpoint again.") from None

    def layer(self, name: str, suffixes: tuple, weight_map: dict) -> dict:
        return {s: self.get(f"{name}.{s}", weight_map) for s in suffixes if f"{name}.{s}" in weight_map}


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
