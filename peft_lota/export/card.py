"""The model card (README.md) a merged checkpoint is written with."""

from __future__ import annotations

import json
import re
from pathlib import Path

CARD_NAME = "README.md"
CARD_MARKER = "<!-- written by peft_lota: safe to regenerate -->"


def _check_card_info(info: dict, facts: dict) -> None:
    for key in ("bits", "group_size"):
        if info.get(key) is not None and int(info[key]) != int(facts[key]):
            raise ValueError(f"card_info says {key}={info[key]}, but the checkpoint has {key}={facts[key]}.")


def model_card(card_info: dict, facts: dict) -> str:
    """README.md for a merged checkpoint. Strings are written as JSON, which YAML reads verbatim.

    card_info (from the method's merge_and_unload, or the user): base_model, and optionally license,
    datasets, tags; method (its name), method_url, method_tag, summary (a paragraph on what the method
    did to the codes) and settings ({label: value}); other keys become rows of the settings table.
    facts (from the format): format, bits, group_size, desc_act, sym, checkpoint_format, loaders (a sentence).
    """
    info = dict(card_info)
    base = info.get("base_model")
    method = info.get("method") or "peft_lota"
    fmt = facts.get("format", "quantized")
    tags = [t for t in (fmt.lower(), "peft-lota", info.get("method_tag")) if t]
    tags += [t for t in info.get("tags") or [] if t not in tags]
    # The Hub rejects a base_model that is not a repo id (e.g. a local path): that one goes in the text only.
    # A local folder (it exists here, or is written as a path) is not a repo id even when it looks like one.
    is_hub_id = (bool(base) and re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", str(base)) is not None
                 and not Path(str(base)).exists())
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

    rows = [("bits", facts.get("bits")), ("group size", facts.get("group_size")),
            ("act-order (desc_act)", facts.get("desc_act")), ("symmetric", facts.get("sym")),
            ("checkpoint format", f"`{facts['checkpoint_format']}`" if facts.get("checkpoint_format") else None)]
    rows += list((info.get("settings") or {}).items())
    known = {"base_model", "bits", "group_size", "license", "datasets", "tags", "method", "method_url", "method_tag",
             "summary", "settings"}
    rows += [(k, v) for k, v in info.items() if k not in known and v is not None]
    show = lambda v: "" if v is None else ", ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)  # noqa: E731
    table = "\n".join(f"| {k} | {show(v)} |" for k, v in rows)
    link = f"[{method}]({info['method_url']})" if info.get("method_url") else method
    return "\n".join([
        "---", *front, "---", CARD_MARKER, "",
        f"# {base.split('/')[-1] + ' ' if base else ''}{method} ({fmt} {facts.get('bits')}-bit)", "",
        f"This model{f' is {base_ref}, quantized with {fmt} and' if base else ' was'} fine-tuned with {link} "
        "using `peft_lota`.", "",
        *([info["summary"], ""] if info.get("summary") else []),
        "It is a standard checkpoint with no adapter and no extra tensors, and runs at the base model's speed.", "",
        "| setting | value |", "|---|---|", table, "",
        "## Use", "", "```python", "from transformers import AutoModelForCausalLM", "",
        'model = AutoModelForCausalLM.from_pretrained("<this repo or folder>")', "```", "",
        facts.get("loaders", ""), "",
    ])
