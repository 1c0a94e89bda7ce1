"""The streaming merge of a GGUF file: the adapted layers merged a few at a time, the model never built.

`load_gguf` builds the whole model through transformers, which dequantizes every tensor on the way (a 70B file
becomes 280 GB of float32). Here the file is read through gguf's memory map and only its header is parsed into a
model skeleton on the meta device (names and shapes, no values). Each adapted layer is rebuilt alone from its
tensor's blocks (rows in the order transformers' loader gives them, as `load_gguf` does), merged by the adapter's own
method (`stream.merge_layers`: the very `merge_and_unload` of the in-memory merge) and its blocks written back, in
the file's row order, over a copy of the source: the bytes `write_gguf` writes after an in-memory merge. Peak
memory: one group of layers' blocks and their adapter tensors.
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import json
import logging
import os
import time
from pathlib import Path

import torch
from torch import nn

from .formats import gguf as fgguf
from .stream import StreamReport, adapter_layers, merge_layers, peak_rss_mib

logger = logging.getLogger(__name__)


def _skeleton(base: Path):
    """The model a GGUF file holds, on the meta device (its config from the file's header; no tensor is read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(base.parent), gguf_file=base.name)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def merge_gguf(base, adapter, out, *, count_codes: bool = False, progress: bool = True,
               group: int = 16) -> StreamReport:
    """Merge the saved adapter (a method of peft_lota's, trained on the GGUF file `base` loaded by load_gguf) into
    `base`'s blocks, `group` layers at a time, and write the merged file to `out` (never `base`): the bytes of the
    in-memory merge's `write_gguf`. `count_codes` also counts the codes the merge moved."""
    from tqdm.auto import tqdm

    from .registry import method as method_named

    started = time.time()
    base, adapter, out = Path(base), Path(adapter), Path(out)
    if not base.is_file():
        raise ValueError(f"{base}: no such GGUF file.")
    if out.is_dir():
        raise ValueError(f"{out} is a directory; give the path of the .gguf file to write.")
    if out.exists() and os.path.samefile(out, base):
        raise ValueError(f"{out} is the base file itself: write the merged file to another path.")
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    method = method_named(str(adapter_config.get("peft_type")))
    if method is None:
        raise ValueError(f"{adapter} holds a {adapter_config.get('peft_type')} adapter; the streaming merge merges "
                         "peft_lota's own methods exactly (a LoRA: peft-lota merge --calib_file, in memory).")
    peft_config = method.config_class.from_pretrained(str(adapter))
    keys = adapter_layers(adapter, method.prefix)
    source = fgguf.GGUFSource(base.resolve(), fgguf._identity(base))
    reader = fgguf.read_header(base)
    arch = str(reader.fields["general.architecture"].contents())
    skeleton = _skeleton(base)
    processor, to_gguf = fgguf._processor(skeleton.config, arch), fgguf._name_map(skeleton, arch)
    tensors = {t.name: t for t in reader.tensors}
    plan = []  # (layer name, tensor, out_features, in_features), checked before anything is written
    modules = dict(skeleton.named_modules())
    for name in keys:
        module = modules.get(name)
        tensor = tensors.get(to_gguf.get(f"{name}.weight", ""))
        if not isinstance(module, nn.Linear) or tensor is None:
            raise ValueError(f"the adapter adapts {name}, which {base} holds no linear layer of: it was made for "
                             "another model.")
        qtype, (N, K) = tensor.tensor_type.name, (module.out_features, module.in_features)
        bt = fgguf.BLOCK_TYPES.get(qtype)
        if bt is None:
            raise ValueError(f"the adapter adapts {name}, whose tensor {tensor.name} is {qtype}: peft_lota keeps that "
                             f"type frozen ({'/'.join(fgguf.BLOCK_TYPES)} are adapted), so the adapter was not "
                             f"trained on {base}.")
        if K % bt.block or tuple(tensor.data.shape) != (N, K // bt.block * bt.nbytes):
            raise ValueError(f"{base}: {tensor.name} does not hold the [{N}, {K}] weight of {name}; the file is "
                             "damaged or not the model its header names.")
        plan.append((name, tensor, N, K, fgguf._row_order(processor, tensor, N)))
    del skeleton, modules
    report = StreamReport(checkpoint_format="gguf")
    digests = {}  # offset -> (length, sha256) of every block range written

    def groups():
        for i in range(0, len(plan), group):
            t0 = time.time()
            layers, sources = {}, {}
            for name, tensor, N, K, order in plan[i:i + group]:
                sources[name] = tensor
                raw = torch.from_numpy(tensor.data.copy())
                layers[name] = fgguf.GGUFLinear(raw if order is None else raw[order], tensor.tensor_type.name, K, N,
                                                None, tensor.name, order)
            merged, (moved, codes) = merge_layers(layers, adapter, peft_config, keys, None, False, count_codes)
            for name, layer in merged.items():
                offset, nbytes = int(sources[name].data_offset), int(sources[name].n_bytes)
                data = fgguf._file_rows(layer).numpy().tobytes()
                if len(data) != nbytes:
                    raise RuntimeError(f"{layer.tensor_name}: merged blocks of {len(data)} bytes for a tensor of "
                                       f"{nbytes}: a bug in peft_lota.")
                digests[offset] = (nbytes, hashlib.sha256(data).hexdigest())
                patches.append((offset, data))
            report.layers += len(merged)
            report.codes_moved += moved
            report.codes += codes
            report.per_shard_seconds.append(round(time.time() - t0, 2))
            bar.update(len(merged))
            del merged, layers
            gc.collect()  # each group's PEFT model is a graph of reference cycles: free its blocks now
            yield from patches
            patches.clear()

    patches: list = []
    with tqdm(total=len(plan), desc="merging layers", disable=not progress, unit="layer") as bar:
        merging = groups()
        # The first group is merged before the copy starts: an adapter that does not fit this file (its base-layer
        # fingerprint, its shapes) is refused before a byte of a large file is written.
        first = [next(merging)] if plan else []
        fgguf.write_patched(source, out, itertools.chain(first, merging))
    del reader, tensors
    report.shards = 1
    with open(out, "rb") as f:  # read back: every merged tensor's bytes as computed
        for offset, (nbytes, digest) in digests.items():
            f.seek(offset)
            if hashlib.sha256(f.read(nbytes)).hexdigest() != digest:
                raise RuntimeError(f"{out}: the bytes at {offset} read back differ from what was written; the disk "
                                   "or file system lost a write. Write it again.")
    report.verified_tensors = len(digests)
    report.seconds = round(time.time() - started, 1)
    report.peak_rss_mib = peak_rss_mib()
    logger.info("peft_lota: streamed %d layers of %s in %.0f s (peak RSS %.0f MiB).", report.layers, base,
                report.seconds, report.peak_rss_mib)
    return report
