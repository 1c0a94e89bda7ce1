r"""Fine-tune a quantized model with LoTA or L4Q through a stock `transformers.Trainer`, merge, save, verify.

    python examples/finetune.py \
        --model_name_or_path path/to/quantized-model --train_file train.jsonl --validation_file val.jsonl \
        --output_dir runs/lota --max_steps 500 --per_device_train_batch_size 8 --learning_rate 1e-4

Methods (`--method`): `lota` (the default: ternary adapters that move a quantized model's integer codes by whole
steps, here trained by the Trainer's own AdamW; `--train_mode ternary` runs the paper's t-SignSGD instead), or `l4q`
(a LoRA trained through a learnable quantizer, from a quantized model or from a full-precision model, which the merge
then turns into a GPTQ (or `--format awq`) checkpoint with `--bits/--group_size/--sym`). Quantized models: GPTQ, AWQ, compressed-tensors
or LLM.int8 checkpoints.

Every `transformers.TrainingArguments` flag works (bf16, gradient_accumulation_steps, gradient_checkpointing,
save_steps, resume_from_checkpoint, ...), and so does `accelerate launch --num_processes N examples/finetune.py ...`.
After training the adapter is merged exactly and the merged model is written to `--merged_dir` (default
`<output_dir>/merged`) as a standard checkpoint of the base's format (from full precision: `--format`, GPTQ by default); it is then reloaded
with stock transformers and compared with the merged model (codes and logits). `--merged_hub_model_id me/model-gptq`
also pushes it.
(`--push_to_hub` is Trainer's own flag: it uploads the adapter checkpoints during training.)

Data (`datasets`): local JSON/JSONL/CSV/text files (`--train_file`, `--validation_file`) or a Hub
dataset (`--dataset_name`, needs network). Two shapes:
- plain text (`--text_column`, default "text"): tokenized, concatenated and cut into blocks of
  `--block_size` tokens, loss on every token;
- instruction pairs (`--prompt_column` and `--response_column`, e.g. "instruction" and "output"):
  one example per sequence, `--prompt_template` around the prompt, loss on the response only.
"""

from __future__ import annotations

import argparse
import codecs
import gc
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Optional

# peft_lota first, even when this file is run directly (as a package module it is loaded first anyway): it registers
# the methods with PEFT and sets gptqmodel's worker count before anything can import gptqmodel (loading.py).
import peft_lota  # isort: skip

import torch
import transformers
from peft import get_peft_model
from transformers import (
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    default_data_collator,
)

from peft_lota import verify
from peft_lota.inputs import UsageError, quantization
from peft_lota.formats import FORMATS, config_format, quantized_tensors
from peft_lota.loading import quantization_config
from peft_lota.paths import separate_output
from peft_lota.registry import METHODS, tuner_layer_classes
from peft_lota.sharded import gather_adapter, is_sharded, load_adapter
from peft_lota.tuner_layer import codes_moved

logger = logging.getLogger("finetune")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "A GPTQ, AWQ, compressed-tensors or LLM.int8 checkpoint (lota, l4q) or a "
                                                      "full-precision model (l4q): local folder or Hub id."})
    backend: Optional[str] = field(
        default=None,
        metadata={"help": "gptqmodel kernel to load with; the default is the format's layout-keeping, trainable "
                          "kernel that runs on every device ('gptq_torch' for GPTQ, 'torch_awq' for AWQ)."},
    )
    dtype: str = field(
        default="auto",
        metadata={"help": "Activation dtype: float32, float16, bfloat16, or auto (float16 on CUDA, float32 on CPU). "
                          "GPTQ scales stay float16 whatever this is."},
    )


@dataclass
class DataArguments:
    train_file: Optional[str] = field(default=None, metadata={"help": "JSON/JSONL/CSV/text file of training data."})
    validation_file: Optional[str] = field(default=None, metadata={"help": "Same format, for evaluation."})
    dataset_name: Optional[str] = field(default=None, metadata={"help": "A `datasets` Hub dataset (needs network)."})
    dataset_config_name: Optional[str] = field(default=None, metadata={"help": "Its configuration name."})
    validation_split_percentage: int = field(
        default=5, metadata={"help": "Share of the training data held out when there is no validation split."})
    text_column: str = field(default="text", metadata={"help": "Column of plain text (causal-LM data)."})
    prompt_column: Optional[str] = field(default=None, metadata={"help": "Column of prompts (instruction data)."})
    response_column: Optional[str] = field(default=None, metadata={"help": "Column of responses (instruction data)."})
    prompt_template: str = field(
        default="{prompt}\n", metadata={"help": "Format of the prompt part; the response follows it directly."})
    block_size: int = field(default=512, metadata={"help": "Tokens per training sequence (longer ones are cut)."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Keep only this many training rows."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Keep only this many evaluation rows."})
    preprocessing_num_workers: Optional[int] = field(default=None, metadata={"help": "Processes for tokenization."})


@dataclass
class MethodArguments:
    method: str = field(default="lota", metadata={
        "help": "lota: ternary adapters on a quantized model (merge moves its codes); l4q: LoRA through a learnable "
                "quantizer, from a quantized or a full-precision model (merge writes a quantized checkpoint: GPTQ "
                "from full precision).",
        "choices": [m.cli_name for m in METHODS]})
    r: Optional[int] = field(default=None, metadata={"help": "Adapter rank (default: 64 for lota, 16 for l4q)."})
    target_modules: str = field(
        default="all-linear", metadata={"help": "Comma-separated layer names, a regex, or all-linear."})
    init_seed: Optional[int] = field(default=None, metadata={"help": "Seed of the adapter's initialisation."})
    # LoTA
    omega: Optional[int] = field(default=None, metadata={"help": "lota: threshold on A @ B (default round(0.75 r))."})
    offset: str = field(default="none", metadata={
        "help": "lota: offset mode; none and integer merge exactly, float does not.", "choices": ["none", "integer", "float"]})
    train_mode: str = field(default="latent", metadata={
        "help": "lota: latent (real-valued A, B under the Trainer's AdamW) or ternary (the paper's t-SignSGD).",
        "choices": ["latent", "ternary"]})
    latent_threshold: Optional[float] = field(default=None, metadata={
        "help": "lota, latent: the latent value where A/B entries turn +-1 (LotaConfig's default)."})
    max_step: int = field(default=1, metadata={"help": "lota: largest code change in quantization steps (1: the paper)."})
    train_scales: Optional[bool] = field(default=None, metadata={
        "help": "lota: also train the adapted layers' scales (exactly mergeable); default: yes in latent mode."})
    q_start: float = field(default=0.95, metadata={"help": "lota, ternary: t-SignSGD's quantile of |grad| at the start."})
    q_mid: float = field(default=0.999, metadata={"help": "lota, ternary: the quantile at the end of the first phase."})
    q_end: float = field(default=0.9999, metadata={"help": "lota, ternary: the quantile at the last step."})
    # L4Q
    lora_alpha: Optional[float] = field(default=None, metadata={"help": "l4q: LoRA alpha (default: r)."})
    bits: Optional[int] = field(default=None, metadata={
        "help": "l4q from full precision: bits of the checkpoint to make (default 4).", "choices": [2, 3, 4, 8]})
    format: Optional[str] = field(default=None, metadata={
        "help": "l4q from full precision: the format of the checkpoint to make (default gptq).",
        "choices": [f.name for f in FORMATS if f.can_hold_trained_scales]})
    group_size: Optional[int] = field(default=None, metadata={"help": "l4q from full precision: group size (default 128)."})
    sym: Optional[bool] = field(default=None, metadata={"help": "l4q from full precision: symmetric grid (default yes)."})
    learn_scales: bool = field(default=True, metadata={"help": "l4q: train the quantization scales."})
    scale_gradient: Optional[str] = field(default=None, metadata={
        "help": "l4q: the scales' gradient, lsq (the paper) or codes (L4QConfig's default).", "choices": ["lsq", "codes"]})
    # after training
    merge: bool = field(default=True, metadata={
        "help": "Merge into the quantized weights and save the merged checkpoint (--no_merge: keep the adapter only)."})
    merged_dir: Optional[str] = field(default=None, metadata={"help": "Where to save it (default output_dir/merged)."})
    merged_hub_model_id: Optional[str] = field(default=None, metadata={"help": "Also push it to this Hub repo."})
    verify: bool = field(default=True, metadata={
        "help": "Reload the saved checkpoint and compare codes and logits (--no_verify: skip)."})
    eval_base: bool = field(default=True, metadata={
        "help": "Also evaluate the model before fine-tuning (--no_eval_base: skip)."})

    def peft_config(self, base_model: str, quantized: bool):
        targets = self.target_modules
        targets = [t.strip() for t in targets.split(",")] if "," in targets else targets
        if self.method == "lota":
            if not quantized:
                raise UsageError(f"{base_model} is a full-precision model: LoTA moves the integer codes of a quantized "
                                 "(GPTQ, AWQ, compressed-tensors, LLM.int8) model. Quantize it first, or use --method "
                                 "l4q, which starts from full precision too.")
            kw = {k: v for k, v in dict(omega=self.omega, latent_threshold=self.latent_threshold,
                                        train_scales=self.train_scales).items() if v is not None}
            return peft_lota.LotaConfig(r=self.r or 64, offset=self.offset, target_modules=targets,
                                        init_seed=self.init_seed, train_mode=self.train_mode, max_step=self.max_step,
                                        base_model_name_or_path=base_model, **kw)
        r = self.r or 16
        kw = {k: v for k, v in dict(bits=self.bits, group_size=self.group_size, sym=self.sym, format=self.format,
                                    scale_gradient=self.scale_gradient).items() if v is not None}
        return peft_lota.L4QConfig(r=r, lora_alpha=self.lora_alpha or r, target_modules=targets,
                                   init_seed=self.init_seed, learn_scales=self.learn_scales,
                                   base_model_name_or_path=base_model, **kw)


# ---- data ----------------------------------------------------------------------------------------

def check_data_file(path: str, flag: str) -> None:
    """Up front, in one line each: a missing, empty or non-UTF-8 file (datasets would fail with a traceback, or read
    UTF-16 text as garbage: its NUL bytes are valid UTF-8)."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"{flag} {path}: {'not a file' if file.exists() else 'no such file'}.")
    decoder, offset, blank = codecs.getincrementaldecoder("utf-8")(), 0, True  # strict
    try:
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                if b"\0" in chunk:
                    raise UsageError(f"{flag} {path} holds NUL bytes: it is not UTF-8 text (UTF-16?); save it as "
                                     "UTF-8.")
                blank = not decoder.decode(chunk).strip() and blank
                offset += len(chunk)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError as err:
        raise UsageError(f"{flag} {path} is not UTF-8 text (byte {err.object[err.start]:#04x} near offset "
                         f"{offset + err.start}; latin-1?): save it as UTF-8.") from None
    except OSError as err:
        raise UsageError(f"{flag} {path}: cannot read it ({err.strerror or err}).") from None
    if blank:
        raise UsageError(f"{flag} {path} is empty: give a file with the data.")


def needed_columns(data_args: DataArguments) -> list[str]:
    if data_args.prompt_column is None and data_args.response_column is None:
        return [data_args.text_column]
    if data_args.prompt_column is None or data_args.response_column is None:
        raise UsageError("instruction data needs both --prompt_column and --response_column.")
    return [data_args.prompt_column, data_args.response_column]


def check_rows(raw, data_args: DataArguments, sources: dict) -> None:
    """Every row must have each field the run reads: a missing one would train on the string "None"."""
    import pyarrow.compute as pc

    for split, ds in raw.items():
        where = sources.get(split) or f"the {split} split of {data_args.dataset_name}"
        for col in needed_columns(data_args):
            if col not in ds.column_names:
                raise UsageError(f"{where} has no {col!r} field (its fields: {', '.join(ds.column_names)}); set "
                                 "--text_column, or --prompt_column and --response_column for instruction data.")
            row = pc.index(ds.data.column(col).is_null(), True).as_py()
            if row >= 0:
                raise UsageError(f"{where}: row {row + 1} (counting from 1) has no {col!r} (or it is null); every "
                                 "row needs one: fix or drop that row.")


def load_raw_datasets(data_args: DataArguments):
    from datasets import load_dataset
    from datasets.exceptions import DatasetGenerationError

    sources = {}
    if data_args.dataset_name:
        raw = load_dataset(data_args.dataset_name, data_args.dataset_config_name)
    else:
        if not data_args.train_file:
            raise UsageError("give --train_file (local JSON/JSONL/CSV/text) or --dataset_name.")
        sources = {"train": data_args.train_file}
        if data_args.validation_file:
            sources["validation"] = data_args.validation_file
        builders = {"jsonl": "json", "json": "json", "csv": "csv", "txt": "text"}
        for split, path in sources.items():
            flag = f"--{split if split == 'validation' else 'train'}_file"
            if Path(path).suffix.lstrip(".").lower() not in builders:
                raise UsageError(f"{flag} {path}: use a .json, .jsonl, .csv or .txt file.")
            check_data_file(path, flag)
        kinds = {builders[Path(path).suffix.lstrip(".").lower()] for path in sources.values()}
        if len(kinds) > 1:
            raise UsageError("--train_file and --validation_file are read the same way: give both as JSON/JSONL, CSV "
                             "or text.")
        builder = kinds.pop()
        try:
            raw = load_dataset(builder, data_files=sources)
        except DatasetGenerationError as err:  # a malformed line (JSON) or row (CSV)
            cause = str(err.__cause__ or err).strip().splitlines()
            raise UsageError(f"{' / '.join(sources.values())}: not readable as {builder} "
                             f"({cause[0] if cause else type(err).__name__}).") from None
    check_rows(raw, data_args, sources)
    if "validation" not in raw:
        try:
            split = raw["train"].train_test_split(test_size=data_args.validation_split_percentage / 100, seed=0)
        except ValueError:  # datasets: one of the two parts would be empty
            raise UsageError(f"{sources.get('train', 'the training data')}: {len(raw['train'])} row(s) are too few to "
                             f"hold out --validation_split_percentage {data_args.validation_split_percentage} for "
                             "evaluation; give more rows, or a --validation_file.") from None
        raw["train"], raw["validation"] = split["train"], split["test"]
    return raw


def tokenize_datasets(raw, tokenizer, data_args: DataArguments, training_args: TrainingArguments):
    """Causal-LM blocks from a text column, or prompt/response pairs with the loss on the response."""
    columns = raw["train"].column_names
    block = data_args.block_size
    instruction = len(needed_columns(data_args)) == 2
    if instruction:
        for col in (data_args.prompt_column, data_args.response_column):
            if col not in columns:
                raise UsageError(f"Column {col!r} not found; the data has {columns}. Set --prompt_column and "
                                 "--response_column.")
        eos = tokenizer.eos_token or ""

        def encode(batch):
            out = {"input_ids": [], "attention_mask": [], "labels": []}
            for prompt, response in zip(batch[data_args.prompt_column], batch[data_args.response_column]):
                p = tokenizer(data_args.prompt_template.format(prompt=prompt), add_special_tokens=False)["input_ids"]
                r = tokenizer(str(response) + eos, add_special_tokens=False)["input_ids"]
                ids = (p + r)[:block]
                out["input_ids"].append(ids)
                out["attention_mask"].append([1] * len(ids))
                out["labels"].append(([-100] * len(p) + r)[:block])
            return out

        collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True)
    else:
        if data_args.text_column not in columns:
            raise UsageError(f"Column {data_args.text_column!r} not found; the data has {columns}. Set --text_column, "
                             "or --prompt_column/--response_column for instruction data.")
        eos_id = tokenizer.eos_token_id

        def encode(batch):  # documents joined with EOS, cut into full blocks (run_clm's group_texts)
            ids = tokenizer([str(t) for t in batch[data_args.text_column]], add_special_tokens=False)["input_ids"]
            stream = list(chain.from_iterable(d + ([eos_id] if eos_id is not None else []) for d in ids))
            n = len(stream) // block * block
            blocks = [stream[i:i + block] for i in range(0, n, block)]
            return {"input_ids": blocks, "attention_mask": [[1] * block for _ in blocks], "labels": [list(b) for b in blocks]}

        collator = default_data_collator

    with training_args.main_process_first(desc="tokenizing"):
        data = raw.map(encode, batched=True, remove_columns=columns, num_proc=data_args.preprocessing_num_workers,
                       desc="tokenizing")
    for split, limit in (("train", data_args.max_train_samples), ("validation", data_args.max_eval_samples)):
        if limit is not None and len(data[split]) > limit:
            data[split] = data[split].select(range(limit))
    if len(data["train"]) == 0:
        raise UsageError(f"No training sequence: the training text is shorter than --block_size {block}.")
    return data["train"], data["validation"], collator


# ---- model ---------------------------------------------------------------------------------------

def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.float16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, name)


def load_base(path: str, backend: Optional[str] = None, dtype: torch.dtype = torch.float32, device_map=None):
    """peft_lota.load_model with finetune's --backend (a kernel of the checkpoint's format) and device map."""
    kwargs = {"device_map": device_map}
    qc = quantization_config(path)
    if qc is not None and backend is not None:
        config = config_format(qc).load_config(qc)
        if config is None:
            raise UsageError(f"--backend {backend}: {config_format(qc).name} checkpoints load without a "
                             "kernel choice; drop --backend.")
        config.backend = backend
        kwargs["quantization_config"] = config
    return peft_lota.load_model(path, dtype=dtype, **kwargs)


@torch.no_grad()
def token_nll(model, dataset, collator, batch_size: int = 8, max_batches: Optional[int] = None):
    """Summed next-token NLL and token count over `dataset`, in fixed order; also the first batch's logits."""
    model.eval()
    device = next(model.parameters()).device
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collator)
    nll, count, first_logits = 0.0, 0, None
    with torch.compiler.set_stance("force_eager"):  # TorchLinear's compile warm-up costs more than it saves here
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            if first_logits is None:
                first_logits = logits.detach().cpu()
            labels = batch["labels"][:, 1:]
            nll += torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                                     ignore_index=-100, reduction="sum").item()
            count += int((labels != -100).sum())
    return nll, count, first_logits


def perplexity(model, dataset, collator, batch_size: int = 8) -> tuple[float, torch.Tensor]:
    nll, count, first_logits = token_nll(model, dataset, collator, batch_size)
    return math.exp(nll / max(count, 1)), first_logits


def adapter_digest(model) -> str:
    """sha256 of every adapter tensor, in name order: equal digests mean identical adapters."""
    parts = tuple(f".{m.prefix}" for m in METHODS)  # ".lota_", ".l4q_": the methods' parameter names
    h = hashlib.sha256()
    for name, p in sorted((n, p) for n, p in model.named_parameters() if any(part in n for part in parts)):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def quant_buffers(model) -> dict[str, torch.Tensor]:
    """{name: tensor} of the model's quantized tensors (codes, zeros, scales, ...; formats.quantized_tensors)."""
    return quantized_tensors(model)


# ---- the run -------------------------------------------------------------------------------------

def setup_logging(training_args: TrainingArguments) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)])
    level = training_args.get_process_log_level()
    for name in ("finetune", "peft_lota"):
        logging.getLogger(name).setLevel(min(level, logging.INFO) if training_args.should_log else level)
    transformers.utils.logging.set_verbosity(level)
    logging.getLogger("optimum").setLevel(logging.WARNING)
    # PeftModel reads transformers' deprecated `is_gradient_checkpointing` (peft 0.21): not ours to fix.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    try:  # gptqmodel's banner and per-layer chatter
        from logbar import LogBar

        LogBar.shared().setLevel(logging.WARNING)
    except ImportError:
        pass


def load_tokenizer(path: str):
    """The model's tokenizer; one without a pad token pads with EOS (batches of uneven sequences need one)."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def adapted_model(model_args: ModelArguments, method_args: MethodArguments, training_args: TrainingArguments,
                  quantized: bool, dtype: torch.dtype, device_map):
    """The base model with the method's fresh adapter injected, ready for the Trainer."""
    config = method_args.peft_config(model_args.model_name_or_path, quantized)
    base = load_base(model_args.model_name_or_path, model_args.backend, dtype, device_map)
    try:
        model = get_peft_model(base, config)
    except ValueError as err:  # a config this model cannot take (a grid its layers or the format cannot hold, ...)
        raise UsageError(str(err).splitlines()[0]) from None
    if training_args.gradient_checkpointing or getattr(training_args, "activation_checkpointing", False):
        model.enable_input_require_grads()  # the frozen embedding output must carry grad into checkpointed blocks
    if training_args.should_log:
        model.print_trainable_parameters()
    return model


def make_trainer(model, tokenizer, train_ds, eval_ds, collator, method_args: MethodArguments,
                 training_args: TrainingArguments) -> Trainer:
    """A stock Trainer: its own optimizer, except the paper's t-SignSGD for LoTA's ternary mode."""
    kwargs = dict(model=model, args=training_args, train_dataset=train_ds, eval_dataset=eval_ds,
                  data_collator=collator, processing_class=tokenizer)
    if method_args.method == "lota" and method_args.train_mode == "ternary":
        # the paper's t-SignSGD, built where the Trainer builds its optimizer (so FSDP works); every other trainable
        # tensor trains under AdamW with the Trainer's learning rate; LotaCallback also stops at a NaN/inf
        return peft_lota.LotaTrainer(**kwargs, lota_kwargs=dict(
            ternary_kwargs=dict(q_start=method_args.q_start, q_mid=method_args.q_mid, q_end=method_args.q_end),
            other_kwargs=dict(lr=training_args.learning_rate, weight_decay=training_args.weight_decay)))
    return Trainer(**kwargs, callbacks=[peft_lota.NonFiniteCallback()])  # stop at the first NaN/inf, before a save


def check_ranks_agree(model) -> bool:
    """True when every process ended with the same adapter; raises otherwise (the merge would depend on the rank)."""
    from accelerate.utils import gather_object

    digests = gather_object([adapter_digest(model)])
    if len(set(digests)) != 1:
        raise RuntimeError(f"the processes ended with different adapters ({digests}); not merging.")
    return True


def train_adapter(trainer: Trainer, model, training_args: TrainingArguments) -> dict:
    """Train and save the adapter to output_dir; the summary's training rows (time, loss, steps, processes)."""
    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    out = {"train_seconds": round(time.time() - t0, 1), "train_loss": result.training_loss,
           "steps": trainer.state.global_step}
    trainer.save_model()  # the adapter (LoTA's ternary tensors at 2 bits per value) in output_dir
    trainer.log_metrics("train", result.metrics)
    out["world_size"] = training_args.world_size
    if torch.distributed.is_initialized():
        out["distributed_backend"] = torch.distributed.get_backend()
    if training_args.world_size > 1 and not is_sharded(model):
        # DDP averages gradients, so t-SignSGD must have made the same moves everywhere (FSDP2's ranks hold shards)
        out["ranks_agree"] = check_ranks_agree(model)
    return out


def evaluate_adapter(model, eval_ds, collator, batch_size: int) -> tuple[dict, torch.Tensor]:
    """Perplexity with the adapter and, from a quantized base, how many codes it moves; also its first logits."""
    ppl, logits = perplexity(model, eval_ds, collator, batch_size)
    layers = [m for m in model.modules() if isinstance(m, tuner_layer_classes())]
    out = {"ppl_adapter": ppl, "weights": sum(layer.in_features * layer.out_features for layer in layers)}
    moved = codes_moved(model)
    if moved is not None:  # from a quantized model: how many of its integer codes the adapter changes
        out["codes_moved"] = moved[0]
        logger.info("perplexity with the adapter: %.3f (%d of %d codes moved)", out["ppl_adapter"],
                    out["codes_moved"], out["weights"])
    else:
        logger.info("perplexity with the adapter: %.3f", out["ppl_adapter"])
    return out, logits


def merge_and_save(model, tokenizer, eval_ds, collator, batch_size: int, adapter_logits: torch.Tensor,
                   method_args: MethodArguments, training_args: TrainingArguments):
    """Merge into the quantized weights, compare with the adapter model on the evaluation data, save with the
    tokenizer the adapter was trained with (in the checkpoint's commit).

    Returns (merged model, the summary's merge rows)."""
    rounded = method_args.method == "lota" and method_args.offset == "float"
    if rounded:
        logger.warning("offset='float' cannot be merged exactly; merging with round_float_offset=True.")
    t0 = time.time()
    merged = model.merge_and_unload(**({"round_float_offset": True} if rounded else {}))
    out = {"merge_seconds": round(time.time() - t0, 2)}
    out["ppl_merged"], merged_logits = perplexity(merged, eval_ds, collator, batch_size)
    out["merged_equals_adapter"] = bool(torch.equal(merged_logits, adapter_logits))
    merged_dir = Path(method_args.merged_dir or Path(training_args.output_dir) / "merged")
    with tempfile.TemporaryDirectory() as work:
        merged.save_pretrained(merged_dir, extra_files=verify.tokenizer_from_object(tokenizer, Path(work)))
    out["merged_dir"] = str(merged_dir)
    logger.info("merged model: perplexity %.3f, saved to %s", out["ppl_merged"], merged_dir)
    return merged, out


def verify_reload(merged, merged_dir: str, model_args: ModelArguments, dtype: torch.dtype, device_map) -> dict:
    """Reload the saved checkpoint as a user would; compare its quantized tensors and logits with the merged model
    (verify.reload_checked)."""
    ids = verify.probe_ids(merged)
    check = verify.reload_checked(merged, merged_dir, ids, verify.logits(merged, ids),
                                  lambda folder: load_base(str(folder), model_args.backend, dtype, device_map))
    return {"reloaded_buffers_equal": check.same_tensors, "reloaded_logits_equal": check.same_logits}


def engine_note(training_args: TrainingArguments) -> None:
    """Say out loud that accelerate trains with DDP on CPU whatever the launch asked for (it shards on GPUs only)."""
    if training_args.world_size < 2 or training_args.device.type != "cpu" or training_args.process_index != 0:
        return
    for env, engine in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(env, "").lower() == "true":
            logger.warning("accelerate runs %s on GPUs only: on CPU this run is DDP, and every process holds the whole "
                           "model.", engine)


def check_outputs(model_args: ModelArguments, data_args: DataArguments, method_args: MethodArguments,
                  training_args: TrainingArguments) -> None:
    """Before anything loads: the adapter folder (--output_dir) and the merged checkpoint's (--merged_dir) are never
    the model folder, inside it or around it, nor hold a data file, and the merged checkpoint has a folder of
    its own, never the adapter's (inside it is the default: output_dir/merged). Folders compared by device and
    inode, however they are spelled."""
    model = {"model (--model_name_or_path)": model_args.model_name_or_path}
    data = {f"--{k}": getattr(data_args, k) for k in ("train_file", "validation_file") if getattr(data_args, k, None)}
    outputs = {"--output_dir": training_args.output_dir}
    if method_args.merge:
        outputs["--merged_dir"] = method_args.merged_dir or str(Path(training_args.output_dir) / "merged")
    for flag, out in outputs.items():
        try:
            separate_output(out, {**model, **data}, flag)
        except ValueError as err:
            raise UsageError(str(err)) from None
    if "--merged_dir" in outputs:
        merged, adapter = Path(os.path.realpath(outputs["--merged_dir"])), Path(os.path.realpath(training_args.output_dir))
        if merged == adapter or merged in adapter.parents:  # (neither exists yet: compared as real paths)
            raise UsageError(f"--merged_dir {outputs['--merged_dir']} {'is' if merged == adapter else 'holds'} the "
                             f"adapter folder (--output_dir) {training_args.output_dir}: give the merged checkpoint a "
                             "folder of its own (by default output_dir/merged).")
        try:
            separate_output(outputs["--merged_dir"], {"adapter folder (--output_dir)": training_args.output_dir},
                            "--merged_dir", may_contain=("adapter folder (--output_dir)",))
        except ValueError as err:
            raise UsageError(str(err)) from None


def run(model_args: ModelArguments, data_args: DataArguments, method_args: MethodArguments,
        training_args: TrainingArguments) -> dict:
    """Train, merge, save and verify; returns a summary (on the main process; {} elsewhere)."""
    check_outputs(model_args, data_args, method_args, training_args)
    setup_logging(training_args)
    engine_note(training_args)
    if training_args.ddp_find_unused_parameters is None:  # every adapter tensor is used in every step
        training_args.ddp_find_unused_parameters = False
    transformers.set_seed(training_args.seed)
    quantized = quantization(model_args.model_name_or_path) is not None  # a missing or damaged model: one line
    raw = load_raw_datasets(data_args)  # the data's mistakes, before the model loads
    tokenizer = load_tokenizer(model_args.model_name_or_path)
    train_ds, eval_ds, collator = tokenize_datasets(raw, tokenizer, data_args, training_args)
    logger.info("data: %d training and %d evaluation sequences", len(train_ds), len(eval_ds))

    dtype = resolve_dtype(model_args.dtype)
    device_map = {"": training_args.device} if training_args.device.type != "cpu" else None
    model = adapted_model(model_args, method_args, training_args, quantized, dtype, device_map)
    trainer = make_trainer(model, tokenizer, train_ds, eval_ds, collator, method_args, training_args)

    summary: dict = {"train_sequences": len(train_ds), "eval_sequences": len(eval_ds)}
    is_main = training_args.process_index == 0
    batch = training_args.per_device_eval_batch_size
    if method_args.eval_base and is_main:
        with model.disable_adapter():
            summary["ppl_base"], _ = perplexity(model, eval_ds, collator, batch)
        logger.info("perplexity before fine-tuning: %.3f", summary["ppl_base"])
    summary.update(train_adapter(trainer, model, training_args))
    if is_sharded(model):  # FSDP2: every rank joins the gather; the main process goes on with an unsharded copy
        state = gather_adapter(model)
        trainer.accelerator.free_memory()  # the sharded model and its optimizer, before the copy is built
        del trainer, model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if not is_main:
            return {}
        model = adapted_model(model_args, method_args, training_args, quantized, dtype, device_map)
        load_adapter(model, state)
        model.save_pretrained(training_args.output_dir)  # a standard adapter, whatever FSDP's state-dict type wrote
    if not is_main:  # every rank holds the same adapter; the main process merges and writes
        return {}

    adapter_rows, adapter_logits = evaluate_adapter(model, eval_ds, collator, batch)
    summary.update(adapter_rows)
    if not method_args.merge:
        return summary
    merged, merge_rows = merge_and_save(model, tokenizer, eval_ds, collator, batch, adapter_logits, method_args,
                                        training_args)
    summary.update(merge_rows)
    if method_args.verify:
        summary.update(verify_reload(merged, summary["merged_dir"], model_args, dtype, device_map))
    if method_args.merged_hub_model_id:
        merged.push_to_hub(method_args.merged_hub_model_id)
        summary["pushed_to"] = method_args.merged_hub_model_id
    summary["method"] = method_args.method
    (Path(training_args.output_dir) / "lota_summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def format_summary(s: dict) -> str:
    rows = [("perplexity, base model", s.get("ppl_base")), ("perplexity, adapter model", s.get("ppl_adapter")),
            ("perplexity, merged", s.get("ppl_merged")), ("optimizer steps", s.get("steps")),
            ("training time (s)", s.get("train_seconds")), ("merge time (s)", s.get("merge_seconds")),
            ("codes moved", f"{s['codes_moved']} of {s['weights']}" if "codes_moved" in s else None),
            ("merged logits == adapter logits", s.get("merged_equals_adapter")),
            ("reloaded codes/scales == merged", s.get("reloaded_buffers_equal")),
            ("reloaded logits == merged", s.get("reloaded_logits_equal")), ("merged checkpoint", s.get("merged_dir"))]
    show = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    return "\n".join(["| | |", "|---|---|"] + [f"| {k} | {show(v)} |" for k, v in rows if v is not None])


COMMON_TRAINING_FLAGS = ("output_dir", "max_steps", "num_train_epochs", "per_device_train_batch_size",
                         "gradient_accumulation_steps", "learning_rate", "lr_scheduler_type", "warmup_steps", "bf16",
                         "activation_checkpointing", "save_steps", "resume_from_checkpoint", "logging_steps", "use_cpu",
                         "seed")


def short_help() -> str:
    """--help: this script's own flags by group, then the few Trainer flags most runs set (--help-all: all ~600)."""
    parser = HfArgumentParser((ModelArguments, DataArguments, MethodArguments),
                              description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n", 1)[1].split(
                                  "Every `transformers")[0].strip(),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.usage = ("finetune.py --model_name_or_path PATH (--train_file FILE | --dataset_name NAME) --output_dir DIR "
                    f"[--method {'|'.join(m.cli_name for m in METHODS)}] [options]")
    for action in parser._actions:  # HfArgumentParser gives --no_x the help of --x
        negated = [o for o in action.option_strings if o.startswith("--no_")]
        if negated:
            action.help = f"turn {negated[0].replace('--no_', '--')} off"
    text = parser.format_help()
    fields = TrainingArguments.__dataclass_fields__
    common = "\n".join(f"  --{name:<30} {fields[name].metadata.get('help', '').split('.')[0][:70]}"
                        for name in COMMON_TRAINING_FLAGS if name in fields)
    return (text + "\ntransformers.TrainingArguments (every one is accepted; these are the usual ones, "
            "--help-all lists all of them):\n" + common + "\n")


def main(argv: Optional[list[str]] = None) -> dict:
    """Parse, run, print the summary and return it (`peft-lota finetune` exits 1 when one of its checks failed)."""
    parser = HfArgumentParser((ModelArguments, DataArguments, MethodArguments, TrainingArguments),
                              description=__doc__.split("\n")[0])
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(short_help())
        sys.exit(0)
    if "--help-all" in argv:
        parser.print_help()
        sys.exit(0)
    if len(argv) == 1 and argv[0].endswith(".json"):
        args = parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    else:
        args = parser.parse_args_into_dataclasses(args=argv)
    summary = run(*args)
    if summary:
        print(format_summary(summary))
    return summary
