"""Accuracy benchmark: exact-merge fine-tuning (LoTA, L4Q) against LoRA-family baselines on small GPTQ models.

    python benchmarks/bench_accuracy.py --preset cpu --root demo_out

Two settings, each at every bit width of the preset (GPTQ, asymmetric, the model preset's group size):

- recovery: fine-tune on the held-in ``finetune`` split of the pretraining corpus, report held-out
  perplexity on the ``eval`` split (both from examples/demo_model.py);
- task: learn a downstream task derived from the standard library (benchmarks/tasks.py), report
  exact match of greedy decodes on a test split whose items share no source file with training.

Methods (same data, same batches in the same order, same number of optimizer steps, same rank and
layers; every AdamW-trained method at its own learning rate from the pilot): GPTQ with no fine-tuning;
PEFT LoRA on the GPTQ model (unmerged); PEFT QA-LoRA (unmerged: PEFT cannot merge it into GPTQ); LoRA
merged the only way users can today (dequantize, add the LoRA delta, re-quantize with GPTQ); the same LoRA
turned into L4Q (`l4q_from_lora`) and trained for a fifth of the steps, merged; LoTA with its defaults
(latent A, B under AdamW, trained scales), merged; LoTA as the paper trains it (t-SignSGD), merged; L4Q
from the GPTQ model and from the full-precision model, merged; full precision and full precision + LoRA
as the ceilings. Candidates for LoTA's defaults are further method keys (``--methods``).

``--tune`` runs the pilot instead, at one bit width: each AdamW-trained method at each candidate
learning rate (LoTA's paper variant at each omega), trained on 90% of the training data and scored on
the other 10% (never on the test split). Results go to benchmarks/results/accuracy-<preset>.{md,json,png}
(pilot: accuracy-<preset>-tune.{md,json}).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "examples"), str(HERE)]
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # gptqmodel fails to size its pool on 2-core machines

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import demo_model as dm  # noqa: E402  (examples/demo_model.py: corpus, model presets, GPTQ, perplexity)
import real_model  # noqa: E402  (examples/real_model.py: SmolLM2-135M-Instruct and its quantized variants)
import tasks  # noqa: E402
from _machine import machine_info  # noqa: E402

RESULTS = HERE / "results"
THREADS = [1]  # torch threads for training and evaluation (set in main)
AUTOCAST = [None]  # the training steps' autocast dtype (None: float32), from the preset or --autocast (set in main)
ANSWER = [" {}\n"]  # how a task answer is written after its prompt (the chat model's: "{}<|im_end|>"; set in main)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# ----------------------------------------------------------------------------- presets
# Every method sees the same batches for the same number of optimizer steps, at the same rank (64).
# lrs: each AdamW-trained method's peak learning rate per setting, from --tune on the cpu preset (grid
# 1e-4..1e-2, 2 bits, scored on held-out finetune files chosen by hash: results/accuracy-cpu-tune.md). The pilot's
# best rate, except where the next lower one was within noise of it (recovery LoRA: 1e-3 24.60 vs 3e-3 24.56):
# higher rates overshoot at 3-4 bits, where the model is close to full precision, and the lower one favours the
# baseline. The paper's LoTA has no learning rate (t-SignSGD); its omega (16 at r = 64) is the pilot's best too
# (the paper's 0.75 r moves no code in 100 steps under t-SignSGD). LoTA's defaults train under AdamW at 1e-4.
# qalora_group: PEFT's default pooling size (16). 128 (= the GPTQ group, the size that would make the
# delta foldable into zero points) leaves one pooled feature for 128-wide layers (a task pilot: 33% vs 90%).
# The gpu preset reuses the cpu preset's choices (untested; re-run --tune there).
# lora_r16 (not in that pilot) takes LoRA's rate.
_LRS = {"recovery": {"lora": 1e-3, "lora_r16": 1e-3, "qalora": 3e-4, "fp_lora": 3e-4, "lota": 1e-4, "l4q": 3e-3,
                     "l4q_fp": 1e-3, "lora_l4q": 3e-3},
        "task": {"lora": 3e-3, "lora_r16": 3e-3, "qalora": 3e-3, "fp_lora": 3e-3, "lota": 1e-4, "l4q": 3e-3,
                 "l4q_fp": 3e-3, "lora_l4q": 3e-3}}
# The real model's rates: its pilot's best (--preset real --tune, recovery at 4 bits, 20 steps, scored on held-out
# training docstrings; results/accuracy-real-tune*.md), used in both settings; L4Q from full precision and lora->L4Q
# take L4Q's rate, full-precision LoRA LoRA's. LoTA: 1e-4 since its latent_threshold became 1e-3 (issue 29: the
# stock-Trainer runs of results/trainer-runs.md; that pilot's 3.3e-5 was the best under the old threshold 1e-4, where
# higher rates flipped the factors en masse).
_REAL = {"lora": 3e-3, "lora_r16": 3e-3, "fp_lora": 3e-3, "lota": 1e-4, "lota_noscales": 1e-4, "l4q": 3e-3,
         "l4q_fp": 3e-3, "lora_l4q": 3e-3}
_REAL_LRS = {"recovery": dict(_REAL), "task": dict(_REAL)}
# real-long's rates: its own pilot's best (--preset real-long --tune at 4 bits, 60 steps in float32, every grid
# bracketed: results/accuracy-real-long-tune.md); recovery: 8 x 128 tokens a step, the task: 8 chats a step.
# lora_l4q (not piloted) takes L4Q's rate: from the GPTQ model for recovery, from full precision for the task.
_LONG_LRS = {"recovery": {"lora": 3e-3, "lora_r16": 3e-3, "lota": 1e-4, "lota_scales_only": 1e-4,
                          "lota_noscales": 1e-3, "l4q": 3e-3, "l4q_fp": 3e-3, "lora_l4q": 3e-3},
             "task": {"lora": 1e-3, "lora_r16": 1e-3, "lota": 3e-5, "lota_scales_only": 3e-5,
                      "lota_noscales": 1e-4, "l4q_fp": 3e-4, "lora_l4q": 3e-4}}
_COMMON = dict(rank=64, paper_omega=16, qalora_group=16, task="count_params", lrs=_LRS, tune_bits=2,
               tune_lrs=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2), tune_omegas=(48, 16, 8), l4q_from_lora_fraction=0.2,
               methods=("fp_lora", "lora", "qalora", "lota", "lota_paper", "l4q", "l4q_fp"),
               tune_methods=("fp_lora", "lora", "qalora", "lota", "lota_paper", "l4q", "l4q_fp", "lora_l4q"))
BENCH_PRESETS: dict[str, dict] = {
    # CI: a tiny model built on the spot (~1-2 min); checks the pipeline, not the numbers.
    "smoke": dict(_COMMON, model=dm.get_preset("demo", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                               num_attention_heads=2, seq_len=64, batch_size=8, steps=30, warmup=5,
                                               group_size=64, eval_blocks=16, calib_samples=16, calib_len=128),
                  model_name="smoke", bits=(2,), rank=8, paper_omega=2, recovery_steps=5, recovery_batch=4,
                  task_steps=5, task_batch=8, max_test=24, tune_lrs=(1e-3,), tune_omegas=(2,),
                  # LoTA with fast factors at a high rate: codes move in 5 steps, so its parts' ablation runs too
                  methods=(*_COMMON["methods"], "lota_fast"),
                  lrs={k: dict(v, lota_fast=1e-2) for k, v in _LRS.items()}),
    # 2 CPU cores: the demo model (the cached build shared with the demo; ~5 min to build).
    "cpu": dict(_COMMON, model="demo", model_name="demo", bits=(4, 3, 2), recovery_steps=100, recovery_batch=16,
                task_steps=100, task_batch=32, max_test=None),
    # The second base model (examples/demo_model.py "alt": wider, shallower, 64-wide groups): do the choices carry over?
    "cpu-alt": dict(_COMMON, model="alt", model_name="alt", bits=(4, 3, 2), recovery_steps=100, recovery_batch=16,
                    task_steps=100, task_batch=32, max_test=None),
    # The real pretrained chat model (examples/real_model.py), all 30 layers, on 2 CPU cores (~60 min; the pilot
    # ~15 min). GPTQ 4-bit symmetric (the common GPTQ checkpoint, the demo's) and 3-bit asymmetric, group 64.
    # A step of 4 x 128 tokens takes ~3 s here (8 x 256: ~14 s, the 49k-vocabulary logits dominate).
    # Recovery: packed 128-token blocks of stdlib docstrings (the first 64 calibrated the quantizers, the next 64
    # are held out); task: count_params as a chat. Cut to fit: 30 steps; the task at 4 bits only, without the
    # full-precision runs; at 3 bits no LoRA r16 or L4Q from full precision; no QA-LoRA (it trains like LoRA, and PEFT
    # cannot merge it either); no 2-bit runs. The pilot: recovery only, 20 steps, 3 rates for LoRA (r 64 and r 16),
    # LoTA (with and without trained scales) and L4Q, one more where the best sat at the grid's edge (the others
    # take their family's rate).
    "real": dict(_COMMON, source="real", model="real", model_name="SmolLM2-135M-Instruct", layers=None,
                 variants={4: "gptq-4b-sym", 3: "gptq-3b-asym", 2: "gptq-2b-asym"}, bits=(4, 3), seq_len=128,
                 eval_docs=64, eval_blocks=48, recovery_steps=30, recovery_batch=4, task_steps=30, task_batch=8,
                 max_test=128, threads=2, lrs=_REAL_LRS, setting_bits={"task": (4,)}, tune_bits=4,
                 setting_methods={"task": ("lora", "lora_r16", "lota", "lota_noscales", "lota_paper", "l4q")},
                 bits_methods={3: ("lora", "lota", "lota_noscales", "lota_paper", "l4q")},
                 tune_lrs={"lora": (3e-4, 1e-3, 3e-3), "lora_r16": (3e-4, 1e-3, 3e-3), "lota": (1e-4, 3e-4, 1e-3),
                           "l4q": (3e-4, 1e-3, 3e-3)},
                 tune_methods=("lora", "lora_r16", "lota", "l4q"), tune_omegas=(16,),
                 methods=("fp_lora", "lora", "lora_r16", "lota", "lota_noscales", "lota_paper", "l4q", "l4q_fp")),
    # A budget a user would recognise (issue 29): 200 optimizer steps of 8 sequences, two seeds (adapter initialisation
    # and data order), GPTQ 4-bit symmetric and 3-bit asymmetric. The references (unmerged LoRA r16 and r64), the
    # LoRA r64 merged every way (re-quantized, merge_lora, merge_lora + distillation), LoTA's defaults and its two
    # ablations (scales only, codes only), L4Q from full precision. Cut to fit 2 cores (~14 h in all, in parts with
    # --resume): 128-token recovery blocks, the task at 4 bits only, its head computed on the answer tokens only, the
    # training steps under bf16 autocast (what a Trainer with bf16=True runs; 1.45x faster than float32 on this
    # machine's CPU, for LoRA and LoTA alike; scoring and merges stay float32).
    # Its pilot (--tune): 60 steps in float32, each method's grid bracketing its best; its rates are _LONG_LRS.
    "real-long": dict(_COMMON, source="real", model="real", model_name="SmolLM2-135M-Instruct", layers=None,
                      variants={4: "gptq-4b-sym", 3: "gptq-3b-asym"}, bits=(4, 3), seq_len=128, eval_docs=64,
                      eval_blocks=48, recovery_steps=200, recovery_batch=8, task_steps=200, task_batch=8, max_test=256,
                      threads=2, seeds=(0, 1), lrs=_LONG_LRS, setting_bits={"task": (4,)}, autocast="bf16",
                      methods=("lora", "lora_r16", "lota", "lota_scales_only", "lota_noscales", "l4q_fp"),
                      tune_bits=4, tune_methods=("lora", "lora_r16", "lota", "lota_scales_only",
                                                 "lota_noscales", "l4q"),
                      tune_lrs={"lora": (3e-4, 1e-3, 3e-3), "lora_r16": (3e-4, 1e-3, 3e-3),
                                "lota": (3e-5, 1e-4, 3e-4),
                                "lota_scales_only": (3e-5, 1e-4, 3e-4),
                                "lota_noscales": (3e-5, 1e-4, 3e-4), "l4q": (3e-4, 1e-3, 3e-3)}, tune_omegas=(16,)),
    # The guard of every change to a method (a few minutes; its history: results/real-quick-history.md): the real
    # model at GPTQ 3-bit asymmetric g64, where code moves weigh most, recovery only, 40 steps of 4 x 128 tokens, one
    # seed, each method at the real preset's rate: LoRA r16 (the reference), LoTA's defaults, L4Q, every exact one
    # merged. A figure that moves is a change in what a method learns: say why in the commit that moves it.
    "real-quick": dict(_COMMON, source="real", model="real", model_name="SmolLM2-135M-Instruct", layers=None,
                       variants={3: "gptq-3b-asym"}, bits=(3,), seq_len=128, eval_docs=64, eval_blocks=48,
                       recovery_steps=40, recovery_batch=4, task_steps=40, task_batch=8, max_test=128, threads=2,
                       lrs=_REAL_LRS, settings=("recovery",), methods=("lora_r16", "lota", "l4q"), history=True),
    # CI: the real model's first 2 layers, a few steps: the real-model path runs (~2 min); the numbers mean nothing.
    "real-smoke": dict(_COMMON, source="real", model="real", model_name="SmolLM2-135M-Instruct, 2 layers", layers=2,
                       variants={4: "gptq-4b-sym"}, bits=(4,), seq_len=64, eval_docs=8, eval_blocks=4,
                       recovery_steps=2, recovery_batch=2, task_steps=2, task_batch=2, max_test=4, threads=2,
                       rank=8, paper_omega=2, lrs=_REAL_LRS, tune_bits=4, tune_lrs=(1e-3,), tune_omegas=(2,),
                       methods=("lora", "lora_r16", "lota", "l4q")),
    # One GPU (UNTESTED): demo_model's "gpu" model (~10M layer parameters), 5x the steps and 2x the batch.
    "gpu": dict(_COMMON, model="gpu", model_name="gpu", bits=(4, 3, 2), recovery_steps=500, recovery_batch=32,
                task_steps=500, task_batch=64, max_test=None),
}

# LoTA's variants: LotaConfig fields over the package's defaults, and how they train ("adamw": the optimizer any
# trainer builds; "tsign": the paper's t-SignSGD through create_lota_optimizer). "omega": "paper" takes the preset's
# paper_omega. lota is the package's default configuration, whatever it is; the rest are candidates and references.
LOTA_VARIANTS = {
    "lota": ({}, "adamw"),
    "lota_noscales": ({"train_scales": False}, "adamw"),
    "lota_scales_only": ({"freeze_factors": True}, "adamw"),  # the ternary factors frozen at their start (B = 0)
    "lota_fast": ({"latent_threshold": 1e-4}, "adamw"),  # the default until issue 29's round: flips in a step or two
    # Under AdamW the factors' ternary path depends only on latent_threshold / rate (A starts at +-2 thresholds, B at 0):
    # a lower threshold is the factors training faster than the scales, at the scales' own rate.
    "lota_thr3e-4": ({"latent_threshold": 3e-4}, "adamw"),
    "lota_step2": ({"max_step": 2, "omega": 24}, "adamw"),  # two thresholds need 2 omega <= r
    "lota_w16": ({"omega": "paper"}, "adamw"),
    "lota_paper": ({"train_mode": "ternary", "omega": "paper", "train_scales": False}, "tsign"),
    "lota_paper_w48": ({"train_mode": "ternary", "omega": None, "train_scales": False}, "tsign"),
    "lota_paper_momentum": ({"train_mode": "ternary", "omega": "paper", "train_scales": False}, "tsign-momentum"),
    "lota_integer": ({"train_mode": "ternary", "omega": "paper", "train_scales": False, "offset": "integer"}, "tsign"),
    "lota_float": ({"train_mode": "ternary", "omega": "paper", "train_scales": False, "offset": "float"}, "tsign"),
}
# L4Q's variants from the GPTQ model: L4QConfig fields over the benchmark's L4Q, trained at plain LoRA's rate.
# Anchored: the LoRA's update rounds onto the base's own grid (a code moves where it passes half a step of it, the
# rest carried as the rounding error of the next step), with scales that move as LoTA's do at its rate: scale_rate =
# LOTA_SCALE_UNIT * LoTA's rate / LoRA's (100 * 1e-4 / 3e-3, the long run's recovery rates).
L4Q_VARIANTS = {
    "l4q_anchored": {"anchor_codes": True,
                     "scale_rate": 100 * _LONG_LRS["recovery"]["lota"] / _LONG_LRS["recovery"]["lora"]},
    "l4q_anchored_s1": {"anchor_codes": True},  # the scales at L4Q's own rate (scale_rate 1)
}
# merge_lora candidates over its routes (MERGE_VARIANTS), run only when named in --methods (in a candidates file, on
# the main run's kept LoRA): the distillation's rate bracketed (at 4 bits, seed 0: 18.51 at 1e-4, 16.94 at the
# default 3e-5, 16.82 at 1e-5, the grid's lower edge: 3e-6 next).
MERGE_CANDIDATES = {"lora_merge_distill_lr1e-5": {"distill_steps": None, "distill_lr": 1e-5},
                    "lora_merge_distill_lr3e-6": {"distill_steps": None, "distill_lr": 3e-6}}
# Item 2's joint route (a candidate): LoTA's trained scales and a float LoRA trained together, each at its own pilot
# rate, so that the LoRA learns only what the scales cannot; then the scales merged exactly and the LoRA onto that
# trained grid by merge_lora (codes by GPTQ error feedback; its options here). What the codes carry is the LoRA's
# residual, and the row records the model without it (the scales alone) beside the merged one. At the two pilot
# rates (4 bits, seed 0) the joint model, unmerged, did worse than either alone (16.85 against LoRA's 16.32 and
# LoTA's 16.68; a higher training loss too): two paths at their own best rates overshoot. With the LoRA at 1e-3 the
# pair did 16.75 unmerged, and its residual over the scales was below half a step nearly everywhere (merge_lora moved
# 0.5% of the codes): merged 17.12. Neither beats LoTA's defaults (benchmarks/README.md, "Item 2's candidates").
# Keys: merge_lora's options, and "lora_lr" (the LoRA's rate, default plain LoRA's).
JOINT_CANDIDATES = {"lota_lora_merge": {}, "lota_lora_merge_distill": {"distill_steps": None},
                    "lota_lora1e-3_merge": {"lora_lr": 1e-3}}
TRAINED = ("fp_lora", "lora", "lora_r16", "qalora", "l4q", "l4q_fp", *LOTA_VARIANTS, *L4Q_VARIANTS, *JOINT_CANDIDATES)
METHODS = {  # key: (label, description, ships as)
    "fp": ("full precision, no fine-tuning", "the unquantized model", "fp model"),
    "fp_lora": ("full precision + LoRA", "LoRA on the unquantized model: the ceiling of this fine-tuning", "fp model"),
    "gptq": ("GPTQ, no fine-tuning", "the quantized base", "GPTQ"),
    "lora": ("GPTQ + LoRA (unmerged)", "PEFT LoRA, 16-bit adapter kept beside the GPTQ layers", "GPTQ + adapter"),
    "lora_r16": ("GPTQ + LoRA r16 (unmerged)", "PEFT LoRA at the common recipe: r 16, alpha 32", "GPTQ + adapter"),
    "qalora": ("GPTQ + QA-LoRA (unmerged)", "PEFT use_qalora; PEFT cannot merge it into GPTQ", "GPTQ + adapter"),
    "lora_requant": ("LoRA merged by re-quantizing", "dequantize, add the LoRA delta, GPTQ again", "GPTQ"),
    "lora_merge": ("LoRA merged by merge_lora, codes only", "the same LoRA onto the base's own grid: codes by GPTQ "
                   "error feedback on the LoRA's training data (1/8 held out to score it), scales kept",
                   "GPTQ, base grid"),
    "lora_merge_scales": ("LoRA merged by merge_lora (defaults: codes + scales)", "merge_lora's defaults: codes and "
                          "each group's fp16 scale refit, zero points kept", "GPTQ, base grid"),
    "lora_merge_distill": ("LoRA merged by merge_lora + distillation", "the defaults, then as many steps of LoTA as "
                           "the LoRA trained, distilling the unmerged LoRA's next-token distribution",
                           "GPTQ, base grid"),
    "lora_merge_distill_lr1e-5": ("LoRA merged by merge_lora + distillation at 1e-5", "candidate: the same "
                                  "distillation at a third of merge_lora's default rate", "GPTQ, base grid"),
    "lora_merge_distill_lr3e-6": ("LoRA merged by merge_lora + distillation at 3e-6", "candidate: the same "
                                  "distillation at a tenth of merge_lora's default rate", "GPTQ, base grid"),
    "lora_l4q": ("LoRA -> l4q_from_lora (+1/5 of the steps), merged", "the same LoRA inside L4Q's quantizer, a short "
                 "quantization-aware run, merged exactly", "GPTQ, exact"),
    "l4q": ("L4Q from the GPTQ model, merged", "LoRA through a learnable quantizer on the GPTQ grid", "GPTQ, exact"),
    "l4q_fp": ("L4Q from full precision, merged", "LoRA through a learnable quantizer from the fp weights, the grid "
               "initialised by L4Q (same bits, group size, asymmetric)", "GPTQ, exact"),
    "l4q_anchored": ("L4Q anchored to the GPTQ grid, LoTA-rate scales, merged", "candidate: a LoRA at LoRA's rate "
                     "whose update rounds onto the base's grid (codes move where it passes half a step), trained "
                     "scales moving as LoTA's", "GPTQ, exact"),
    "l4q_anchored_s1": ("L4Q anchored to the GPTQ grid, merged", "candidate: the same at L4Q's own scale rate (a "
                        "step moves a scale by ~lr)", "GPTQ, exact"),
    "lota_lora_merge": ("LoTA scales + LoRA trained together, merge_lora onto the trained grid", "candidate: "
                        "the scales merged exactly, the LoRA's residual by merge_lora's defaults", "GPTQ, base grid"),
    "lota_lora_merge_distill": ("the same + distillation", "candidate: merge_lora's distillation of the joint "
                                "model after it", "GPTQ, base grid"),
    "lota_lora1e-3_merge": ("the same, the LoRA at 1e-3", "candidate: the joint route with the LoRA at a third of "
                            "its own pilot's rate", "GPTQ, base grid"),
    "lota": ("LoTA, defaults (latent A, B + scales, AdamW), merged", "LotaConfig() defaults under AdamW", "GPTQ, exact"),
    "lota_noscales": ("LoTA latent, codes only (no trained scales), merged", "the ablation: what moved codes learn",
                      "GPTQ, exact"),
    "lota_scales_only": ("LoTA latent, scales only (factors frozen), merged", "the ablation: what trained scales "
                         "learn (no code moves)", "GPTQ, exact"),
    "lota_fast": ("LoTA latent, latent_threshold 1e-4, merged", "the old default: an entry of A or B flips after "
                  "a step or two of a consistent gradient at 1e-4", "GPTQ, exact"),
    "lota_thr3e-4": ("LoTA latent, latent_threshold 3e-4, merged", "candidate: the factors flip after ~3 steps of a "
                     "consistent gradient at 1e-4 (as if they trained at 3.3x the scales' rate)", "GPTQ, exact"),
    "lota_step2": ("LoTA latent, omega 24, steps of up to 2, merged", "candidate: max_step=2 (omega 0.375 r, so that "
                   "2 omega <= r)", "GPTQ, exact"),
    "lota_w16": ("LoTA latent, omega 16, merged", "candidate: the paper variant's omega under AdamW", "GPTQ, exact"),
    "lota_paper": ("LoTA, paper's t-SignSGD (omega from the pilot), merged", "train_mode='ternary', t-SignSGD", "GPTQ, exact"),
    "lota_paper_w48": ("LoTA, paper's t-SignSGD (omega 0.75 r), merged", "the paper's own defaults", "GPTQ, exact"),
    "lota_paper_momentum": ("LoTA, t-SignSGD with momentum 0.9, merged", "candidate", "GPTQ, exact"),
    "lota_integer": ("LoTA paper, offset=integer, merged", "t-SignSGD, zero-point shift", "GPTQ, exact"),
    "lota_float": ("LoTA paper, offset=float (unmerged)", "t-SignSGD, fractional offset", "GPTQ + adapter"),
    "lota_float_rounded": ("LoTA paper, offset=float, merged with rounding", "round_float_offset=True", "GPTQ"),
}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def quiet() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for name in ("logbar", "gptqmodel", "peft", "peft_lota", "accelerate", "optimum", "torch", "matplotlib",
                 "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    try:  # gptqmodel logs through LogBar, whose shared logger resets its level when first created
        from logbar import LogBar

        LogBar.shared().setLevel(logging.ERROR)
    except ImportError:
        pass


# ----------------------------------------------------------------------------- models
BASES: dict[str, str] = {}  # the real presets' base models: folder -> fingerprint when the run began (set in main)


def check_base(folder) -> None:
    """Refuse a base model that changed under a running benchmark (a second build on the same --root replaces it):
    the rows measured before and after would be on two different models."""
    want = BASES.get(str(Path(folder).resolve()))
    if want is None:  # (not a base model of a real preset)
        return
    try:
        now = real_model.fingerprint(folder)
    except FileNotFoundError:  # (caught in the middle of being replaced)
        now = None
    if now != want:
        raise RuntimeError(f"{folder} changed while this benchmark ran (its fingerprint was {want}; another build on "
                           "the same --root?): rows on two base models cannot be mixed. Run it again with --resume, "
                           "which keeps the rows measured so far only if they were on the model now there.")


def load_fp(fp_dir):
    from transformers import AutoModelForCausalLM

    check_base(fp_dir)
    return AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.float32).to(device())


def load_quant(q_dir):
    check_base(q_dir)
    # float32 activations everywhere: the adapters train in float32 and CPU has no fast fp16 matmul.
    return dm.load_gptq(q_dir, dtype=torch.float32, device_map={"": device()})


def lora_config(rank: int, qalora_group: int | None = None, alpha: int | None = None):
    from peft import LoraConfig

    kw = dict(use_qalora=True, qalora_group_size=qalora_group) if qalora_group else {}
    # lora_alpha = r (scaling 1): the learning rate is tuned per method, which absorbs the scale.
    return LoraConfig(r=rank, lora_alpha=alpha or rank, lora_dropout=0.0, target_modules=LORA_TARGETS,
                      task_type="CAUSAL_LM", **kw)


def lota_config(method: str, cfg: dict):
    import peft_lota

    fields, _ = LOTA_VARIANTS[method]
    fields = {k: (cfg["paper_omega"] if v == "paper" else v) for k, v in fields.items() if k != "freeze_factors"}
    return peft_lota.LotaConfig(r=cfg["rank"], target_modules=LORA_TARGETS, init_seed=cfg.get("seed", 0), **fields)


def l4q_config(cfg: dict, quant_dir=None, **fields):
    """L4Q at the benchmark's rank (lora_alpha = r, like LoRA here); from full precision with the GPTQ base's grid;
    `fields`: further L4QConfig fields (L4Q_VARIANTS)."""
    import peft_lota

    grid = {}
    if quant_dir is not None:
        qc = json.loads((Path(quant_dir) / "config.json").read_text())["quantization_config"]
        grid = dict(bits=qc["bits"], group_size=qc["group_size"], sym=qc["sym"])
    return peft_lota.L4QConfig(r=cfg["rank"], lora_alpha=cfg["rank"], target_modules=LORA_TARGETS,
                               init_seed=cfg.get("seed", 0), **grid, **fields)


def make_adapter_model(method: str, dirs: dict, bits: int | None, cfg: dict):
    """A fresh model for `method`, with its adapter injected (same seed for every method)."""
    from peft import get_peft_model

    torch.manual_seed(cfg.get("seed", 0))
    if method == "fp_lora":
        return get_peft_model(load_fp(dirs["fp"]), lora_config(cfg["rank"]))
    if method == "l4q_fp":
        return get_peft_model(load_fp(dirs["fp"]), l4q_config(cfg, dirs[bits]))
    base = load_quant(dirs[bits])
    if method == "lora":
        return get_peft_model(base, lora_config(cfg["rank"]))
    if method == "lora_r16":
        return get_peft_model(base, lora_config(16, alpha=32))
    if method == "qalora":
        return get_peft_model(base, lora_config(cfg["rank"], cfg["qalora_group"]))
    if method == "l4q" or method in L4Q_VARIANTS:
        return get_peft_model(base, l4q_config(cfg, **L4Q_VARIANTS.get(method, {})))
    model = get_peft_model(base, lota_config(method, cfg))
    if LOTA_VARIANTS[method][0].get("freeze_factors"):  # only the scales train: B stays 0, no code moves
        for name, p in model.named_parameters():
            if ".lota_A." in name or ".lota_B." in name:
                p.requires_grad_(False)
    return model


# ----------------------------------------------------------------------------- training
def recovery_loss(model, blocks: torch.Tensor) -> torch.Tensor:
    b = blocks.to(device())
    logits = model(input_ids=b[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), b[:, 1:].flatten())


def task_loss(model, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The answer tokens' loss. The output head runs on those positions only: on the real model its 49k-wide logits
    cost more than the rest of a step, and a task's answers are a few tokens of each sequence."""
    ids, labels = (t.to(device()) for t in batch)
    targets = labels[:, 1:]
    keep = targets != -100
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not (hasattr(inner, "model") and hasattr(inner, "lm_head")):  # not a *ForCausalLM: the whole forward
        logits = model(input_ids=ids[:, :-1]).logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
    hidden = inner.model(input_ids=ids[:, :-1]).last_hidden_state
    return torch.nn.functional.cross_entropy(inner.lm_head(hidden[keep]).float(), targets[keep])


def train(model, method: str, batches: list, loss_fn, lr: float | None, desc: str, groups: list | None = None) -> dict:
    """One run: AdamW (5% warm-up + cosine, clip 1.0), what any trainer builds, for every method but the
    paper's LoTA, which trains with t-SignSGD (its quantile schedule, no clipping). `groups`: AdamW's parameter
    groups, each with its own rate (the one schedule scales them all), instead of every trainable parameter at lr."""
    import peft_lota

    steps = len(batches)
    params = [p for g in groups for p in g["params"]] if groups else [p for p in model.parameters() if p.requires_grad]
    rule = LOTA_VARIANTS.get(method, (None, "adamw"))[1]
    if rule.startswith("tsign"):
        kwargs = {"momentum": 0.9} if rule == "tsign-momentum" else {}
        opt, sched, clip = peft_lota.create_lota_optimizer(model, ternary_kwargs=kwargs, total_steps=steps), None, None
    else:
        opt = torch.optim.AdamW(groups or params, lr=lr or 0.0, weight_decay=0.0)
        warmup = max(1, steps // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: dm._lr_factor(s, warmup, steps))
        clip = 1.0
    model.train()
    t0, losses = time.time(), []
    bar = tqdm(batches, desc=desc, mininterval=5, leave=False)
    for batch in bar:
        with torch.autocast(device().type, dtype=AUTOCAST[0] or torch.float32, enabled=AUTOCAST[0] is not None):
            loss = loss_fn(model, batch)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}", refresh=False)
    model.eval()
    tail = losses[-max(1, steps // 10):]
    return dict(train_s=round(time.time() - t0, 1), first_loss=round(losses[0], 4),
                final_loss=round(sum(tail) / len(tail), 4))


# ----------------------------------------------------------------------------- data
def pack(tok, texts: list[str], seq: int) -> torch.Tensor:
    """`texts` tokenized and concatenated (EOS after each), cut into [n, seq] blocks."""
    ids = []
    for text in texts:
        ids += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = len(ids) // seq
    return torch.tensor(ids[: n * seq]).view(n, seq)


def real_recovery_blocks(fp_dir, cfg: dict, validation: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The real model's (fine-tuning blocks, scored blocks): stdlib docstrings in real_model.prose's order, whose
    first 64 calibrated the quantizers; the next `eval_docs` are held out for scoring, the rest are trained on.
    validation=True (the pilot): the last tenth of the training docstrings is scored instead."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(fp_dir)
    docs = real_model.prose(10**6, seed=1)[64:]
    held, docs = docs[: cfg["eval_docs"]], docs[cfg["eval_docs"]:]
    if validation:
        cut = len(docs) * 9 // 10
        docs, held = docs[:cut], docs[cut:]
    held = pack(tok, held, cfg["seq_len"])
    pick = torch.linspace(0, len(held) - 1, min(cfg["eval_blocks"], len(held))).long()
    return pack(tok, docs, cfg["seq_len"]), held[pick]


def recovery_data(fp_dir, cfg: dict, steps: int, batch: int, validation: bool = False):
    """(train batches, eval blocks): the finetune split's blocks in a fixed random order, and the eval
    split's blocks (demo_model.eval_blocks). validation=True (the pilot): one finetune file in ten, chosen by
    a hash of its path (demo_model.pilot_blocks), is held out for scoring. The real model: real_recovery_blocks."""
    model_preset = cfg.get("model")
    if cfg.get("source") == "real":
        blocks, evaluation = real_recovery_blocks(fp_dir, cfg, validation)
    elif validation:
        blocks, held = dm.pilot_blocks(fp_dir, model_preset)
        n_eval = dm.get_preset(model_preset)["eval_blocks"]
        evaluation = held[torch.linspace(0, len(held) - 1, min(n_eval, len(held))).long()]
    else:
        blocks = dm.finetune_blocks(fp_dir, model_preset)
        evaluation = dm.eval_blocks(fp_dir, model_preset)
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(cfg.get("data_seed", 0)))
    idx = torch.arange(steps * batch) % len(order)  # wraps around if the split is small (smoke)
    train_blocks = blocks[order[idx]].view(steps, batch, -1)
    return list(train_blocks), evaluation


def encode_items(tok, items) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids): prompt and answer (written as ANSWER says) tokenized apart, so the decode sees
    exactly the prompt tokens it was trained on."""
    prompts = tok([p for p, _ in items], add_special_tokens=False)["input_ids"]
    answers = tok([ANSWER[0].format(a) for _, a in items], add_special_tokens=False)["input_ids"]
    return list(zip(prompts, answers))


def task_batches(tok, items, steps: int, batch: int) -> list:
    enc = encode_items(tok, items)
    pad = tok.eos_token_id
    out = []
    for s in range(steps):
        chunk = [enc[(s * batch + j) % len(enc)] for j in range(batch)]
        n = max(len(p) + len(a) for p, a in chunk)
        ids = torch.full((batch, n), pad, dtype=torch.long)
        labels = torch.full((batch, n), -100, dtype=torch.long)
        for j, (p, a) in enumerate(chunk):  # right padding: causal attention never looks at it
            ids[j, : len(p) + len(a)] = torch.tensor(p + a)
            labels[j, len(p): len(p) + len(a)] = torch.tensor(a)
        out.append((ids, labels))
    return out


def task_data(fp_dir, cfg: dict, validation: bool = False):
    """(train batches, scored items). validation=True (the pilot): items of the finetune files are
    scored and only the train files' items are trained on (tasks.load_task)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(fp_dir)
    include_tests = False if cfg.get("source") == "real" else dm.get_preset(cfg["model"])["include_tests"]
    train_items, test_items = tasks.load_task(cfg["task"], include_tests, cfg["max_test"], validation=validation)
    if cfg.get("source") == "real":  # a chat model is asked in its chat template
        train_items, test_items = (tasks.as_chat(tok, cfg["task"], items) for items in (train_items, test_items))
    return task_batches(tok, train_items, cfg["task_steps"], cfg["task_batch"]), test_items


_WORD = re.compile(r"\s*([A-Za-z0-9_]+)")


def first_word(text: str) -> str | None:
    """The answer a decode gives: its first identifier (every task's answer is one identifier or number)."""
    m = _WORD.match(text)
    return m.group(1) if m else None


def _finished(text: str) -> bool:
    m = _WORD.match(text)
    return bool(m) and m.end() < len(text) or (not m and text.strip() != "")


@torch.no_grad()
def exact_match(model, tok, items, batch_size: int = 64, max_new: int = 16) -> dict:
    """Greedy decoding (left padding, explicit positions); the first identifier of the decode must
    equal the answer exactly. Decoding stops once every row has finished its first identifier."""
    was_training = model.training
    model.eval()
    enc = encode_items(tok, items)
    correct, samples = 0, []
    for i in range(0, len(enc), batch_size):
        chunk = enc[i: i + batch_size]
        n = max(len(p) for p, _ in chunk)
        ids = torch.full((len(chunk), n), tok.eos_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), n), dtype=torch.long)
        for j, (p, _) in enumerate(chunk):
            ids[j, n - len(p):], mask[j, n - len(p):] = torch.tensor(p), 1
        ids, mask = ids.to(device()), mask.to(device())
        for _ in range(max_new):
            pos = (mask.cumsum(-1) - 1).clamp_min(0)
            nxt = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].argmax(-1)
            ids = torch.cat([ids, nxt[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            if all(_finished(t) for t in tok.batch_decode(ids[:, n:].tolist())):
                break
        for j, (_, answer) in enumerate(items[i: i + batch_size]):
            text = tok.decode(ids[j, n:].tolist())
            correct += first_word(text) == answer
            if len(samples) < 8:
                samples.append([answer, text])
    model.train(was_training)
    return dict(em=round(100 * correct / len(items), 2), n=len(items), samples=samples)


# ----------------------------------------------------------------------------- LoRA merged the user's way
def lora_requantize(lora_model, dirs: dict, bits: int, cfg: dict, work: Path, probe: torch.Tensor):
    """Dequantize every GPTQ layer, add the LoRA delta in float32, GPTQ-quantize again with the
    base's bits, group size and calibration (demo_model.quantize on the merged fp model; the real model:
    real_model.reproducible_quantize, the pinned quantizer and calibration its GPTQ variants were made with)."""
    from peft.tuners.lora import LoraLayer

    fp = load_fp(dirs["fp"]).cpu()
    n_merged = 0
    for name, m in lora_model.named_modules():
        if not isinstance(m, LoraLayer):
            continue
        base = m.get_base_layer()
        w = base.dequantize_weight().t().float()  # [out, in], exactly what the GPTQ kernel uses
        for a in m.active_adapters:
            w = w + (m.lora_B[a].weight @ m.lora_A[a].weight).float() * m.scaling[a]
        target = fp.get_submodule(name.removeprefix("base_model.model."))
        target.weight.data.copy_(w.cpu())
        n_merged += 1
    with torch.no_grad():  # the merged full-precision model must be the LoRA model (up to float rounding)
        fp_diff = float((fp(input_ids=probe.cpu()).logits - lora_model(input_ids=probe).logits.cpu()).abs().max())
    merged_fp, merged_q = work / "merged-fp", work / f"merged-gptq-{bits}bit"
    shutil.rmtree(merged_fp, ignore_errors=True)
    shutil.rmtree(merged_q, ignore_errors=True)
    fp.save_pretrained(merged_fp)
    for f in ("tokenizer.json", "tokenizer_config.json", "train_tokens.pt"):  # tokens: the same calibration windows
        if (Path(dirs["fp"]) / f).exists():
            shutil.copy(Path(dirs["fp"]) / f, merged_fp / f)
    (merged_fp / "DONE").touch()
    t0 = time.time()
    if cfg.get("source") == "real":
        real_model.copy_tokenizer(dirs["fp"], merged_fp)
        real_model.reproducible_quantize(merged_fp, merged_q, cfg["variants"][bits])
    else:
        p = dm.get_preset(cfg["model"])
        q_cfg = json.loads((Path(dirs[bits]) / "quant_log.json").read_text())
        # THREADS[0] threads: on the shared 2-core machine a re-quantization took ~4 min with 2 threads and ~30 s
        # with 1 (oversubscribed threads spin).
        dm.quantize(merged_fp, merged_q, bits, q_cfg["group_size"], q_cfg["sym"], q_cfg["desc_act"],
                    calib_samples=p["calib_samples"], calib_len=p["calib_len"], threads=THREADS[0])
    requant_s = time.time() - t0
    model = load_quant(merged_q)
    return model, dict(requant_s=round(requant_s, 1), layers=n_merged,
                       max_logit_diff_merged_fp_vs_lora=fp_diff), [merged_fp, merged_q]


# merge_lora's routes for one LoRA: codes only, its defaults (codes and scales), and the defaults plus a distillation
# of as many steps as the LoRA trained (None: the number of training batches), at merge_lora's default rate (3e-5).
MERGE_VARIANTS = {"lora_merge": {"train_scales": False}, "lora_merge_scales": {},
                  "lora_merge_distill": {"distill_steps": None}}
MERGES = {**MERGE_VARIANTS, **MERGE_CANDIDATES}  # every merge_lora route a run may name


def lora_merged(q_dir, lora_dir, calib: list, options: dict, base=None):
    """The saved LoRA on a fresh copy of its GPTQ base (or on `base`, a quantized model in memory), merged by
    peft_lota.merge_lora; (model, what it reported)."""
    from peft import PeftModel

    import peft_lota

    t0 = time.time()
    if base is None:
        model = PeftModel.from_pretrained(load_quant(q_dir), str(lora_dir))
        merged = peft_lota.merge_lora(model, calib, progress=False, **options)
    else:
        merged = peft_lota.merge_lora(base, calib, lora=str(lora_dir), progress=False, **options)
    merge_s = time.time() - t0
    r = merged.merge_lora_report
    layers = r.layers.values()
    codes = sum(dispatch_numel(merged, n) for n in r.layers)
    return merged, dict(merge_s=round(merge_s, 1), calib_loss_lora=round(r.loss_lora, 5),
                        calib_loss_merged=round(r.loss_merged, 5), calib_gap_pct=round(r.gap_pct, 3),
                        top1_agreement_pct=round(r.top1_agreement_pct, 2),
                        codes_moved_pct=round(100 * sum(x["codes_moved"] for x in layers) / max(codes, 1), 3),
                        mean_layer_error=round(sum(x["error"] for x in layers) / max(len(r.layers), 1), 4),
                        mean_layer_error_nearest=round(sum(x["error_nearest"] for x in layers) / max(len(r.layers), 1), 4),
                        distill=r.distill)


def dispatch_numel(model, name: str) -> int:
    from peft_lota.formats import dispatch

    layer = model.get_submodule(name.removeprefix("base_model.model."))
    q = dispatch(layer, name)
    return q.in_features * q.out_features


# ----------------------------------------------------------------------------- runs
def max_logit_diff(a, b, probe: torch.Tensor) -> float:
    with torch.no_grad():
        return float((a(input_ids=probe).logits - b(input_ids=probe).logits).abs().max())


def codes_moved_pct(model) -> float:
    """Share of the adapted layers' integer codes that the adapter moves, in %."""
    from peft_lota.tuner_layer import codes_moved

    moved = codes_moved(model)
    return None if moved is None else float(f"{100 * moved[0] / moved[1]:.3g}")  # 3 significant digits: 1 code shows


@torch.no_grad()
def lora_update_in_steps(model) -> dict:
    """How large a trained LoRA's update is on its quantized base's grid: |B A * scaling| over each weight's
    quantization step, over every adapted quantized layer. The share past half a step is what nearest rounding
    would move as a code; the share past a whole step, what a LoTA move of one step could reach alone.
    (Issue 29: whether code moves can carry a fine-tune of this length at all.)"""
    from peft.tuners.lora import LoraLayer

    from peft_lota import formats

    n = half = whole = 0
    sq = 0.0
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        quant = formats.dispatch(layer.get_base_layer(), name)
        if quant is None or any(layer.lora_A[a].in_features != layer.in_features for a in layer.lora_A):
            continue  # (not quantized, or QA-LoRA, whose A reads pooled inputs: no per-weight update)
        state = quant.read()
        delta = sum(layer.lora_B[a].weight.float() @ layer.lora_A[a].weight.float() * layer.scaling[a]
                    for a in layer.active_adapters if a in layer.lora_A)  # [out, in]
        ratio = (delta.t() / state.scales.float()[state.g_idx]).abs()  # [in, out], in steps
        n += ratio.numel()
        half += int((ratio > 0.5).sum())
        whole += int((ratio > 1.0).sum())
        sq += float(ratio.square().sum())
    if not n:
        return {}
    return {"update_past_half_step_pct": round(100 * half / n, 3), "update_past_one_step_pct": round(100 * whole / n, 4),
            "update_rms_steps": round((sq / n) ** 0.5, 4)}


def merged_exactly(model, probe: torch.Tensor) -> tuple[object, dict]:
    """merge_and_unload, and the largest logit difference of the merged model against the adapter model."""
    with torch.no_grad():
        before = model(input_ids=probe).logits
    merged = model.merge_and_unload()
    with torch.no_grad():  # the point of exact merging: the merged quantized model IS the adapter model
        diff = float((merged(input_ids=probe).logits - before).abs().max())
    return merged, {"max_logit_diff_merged_vs_adapter": diff}


def setting_data(setting: str, cfg: dict, dirs: dict, tok, validation: bool = False):
    """(training batches, scoring function, loss function) of a setting: recovery scores held-out perplexity,
    task the exact match of greedy decodes. validation=True: the pilot's held-out training data."""
    if setting == "recovery":
        batches, blocks = recovery_data(dirs["fp"], cfg, cfg["recovery_steps"], cfg["recovery_batch"],
                                        validation=validation)
        return batches, (lambda m: dict(ppl=round(dm.perplexity(m, blocks), 3))), recovery_loss
    batches, items = task_data(dirs["fp"], cfg, validation=validation)
    return batches, (lambda m: exact_match(m, tok, items)), task_loss


@dataclass
class SettingRun:
    """What every run of one setting shares: its data, loss and scoring, learning rates, and where results go."""

    setting: str
    cfg: dict
    dirs: dict
    batches: list
    score: Callable
    loss_fn: Callable
    res: dict  # results[setting]: {method: {bits: result}}
    save: Callable
    work: Path  # scratch folder of the LoRA merge routes
    kept: Path | None = None  # where plain LoRA's trained adapters are kept, for --resume and merge candidates
    probe: torch.Tensor = field(init=False)  # two training sequences: merged and adapter logits are compared on them

    def __post_init__(self) -> None:
        self.probe = (self.batches[0] if self.setting == "recovery" else self.batches[0][0])[:2].to(device())

    @property
    def lrs(self) -> dict:
        return self.cfg["lrs"][self.setting]

    def lr_of(self, method: str) -> float | None:
        return rate_of(self.lrs, method)

    def record(self, method: str, bits, out: dict) -> None:
        self.res.setdefault(method, {})[str(bits)] = out
        self.save()

    def done(self, *methods: str, bits) -> bool:
        """Already in the results (--resume): not run again."""
        return all(str(bits) in self.res.get(m, {}) for m in methods)

    def evaluate(self, model) -> dict:
        t0 = time.time()
        out = self.score(model)
        out["eval_s"] = round(time.time() - t0, 1)
        return out


def run_fp_lora(run: SettingRun) -> None:
    """The ceiling: this fine-tuning without quantization (LoRA on the full-precision model)."""
    m = make_adapter_model("fp_lora", run.dirs, None, run.cfg)
    log = train(m, "fp_lora", run.batches, run.loss_fn, run.lrs["fp_lora"], f"{run.setting} fp+LoRA")
    run.record("fp_lora", "fp", dict(**run.evaluate(m), **log, lr=run.lrs["fp_lora"]))


LORA_ROUTES = ("lora_requant", *MERGE_VARIANTS, "lora_l4q")


def run_lora(run: SettingRun, method: str, bits: int) -> None:
    """A LoRA-family adapter on the GPTQ model, scored unmerged. Plain LoRA's trained adapter is kept (run.kept)
    for its merge routes (lora_routes), which run after the exact methods: a run stopped among them (an hour of the
    long run) resumes with the routes still missing, on the same adapter, instead of training it again."""
    m = make_adapter_model(method, run.dirs, bits, run.cfg)
    log = train(m, method, run.batches, run.loss_fn, run.lrs[method], f"{run.setting} {bits}-bit {method}")
    if method == "lora":  # kept before its row is recorded: a row never points at an older adapter
        keep_lora(run, m, bits)
    run.record(method, bits, dict(**run.evaluate(m), **log, lr=run.lrs[method], **lora_update_in_steps(m)))


RECIPE = "bench_recipe.json"  # beside a kept LoRA adapter: what it was trained by (lora_recipe)
# Configuration keys that only choose what a run runs (which methods, settings, bit widths, seeds; the pilot's grids)
# and not how plain LoRA trains: a kept adapter serves every run that differs from its own only in these.
NOT_RECIPE = ("methods", "method_variants", "settings", "bits", "setting_bits", "bits_methods", "setting_methods",
              "seeds", "lrs", "history", "tune_bits", "tune_lrs", "tune_methods", "tune_omegas")


def lora_recipe(run: SettingRun, bits: int) -> dict:
    """What plain LoRA's trained adapter depends on: the run's configuration less NOT_RECIPE (a key it does not name
    counts: an unforeseen difference trains again rather than reuses), its setting, rate, threads and base model."""
    cfg = {k: v for k, v in run.cfg.items() if k not in NOT_RECIPE}
    base = BASES.get(str(Path(run.dirs[bits]).resolve()), str(run.dirs[bits]))
    return json.loads(json.dumps(dict(cfg, setting=run.setting, bits=bits, lr=run.lrs["lora"], base=base,
                                      threads=THREADS[0]), default=str, sort_keys=True))


def kept_lora(run: SettingRun, bits: int) -> Path:
    """Where plain LoRA's trained adapter of this run's recipe is kept, for its merge routes (--resume, and merge
    candidates in another results file): one folder per recipe, so that runs of other recipes never replace it."""
    recipe = hashlib.sha256(json.dumps(lora_recipe(run, bits), sort_keys=True).encode()).hexdigest()[:12]
    return (run.kept if run.kept is not None else run.work) / f"lora-{bits}bit-{recipe}"


def keep_lora(run: SettingRun, m, bits: int) -> None:
    """Save plain LoRA's trained adapter where kept_lora finds it, its recipe beside it (to read). Written under a
    name of its own and renamed into place: a stopped save, or another run saving the same recipe, never leaves a
    half-written adapter there."""
    kept, recipe = kept_lora(run, bits), lora_recipe(run, bits)
    staging = kept.with_name(f"{kept.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    m.save_pretrained(staging)
    (staging / RECIPE).write_text(json.dumps(recipe, indent=1, sort_keys=True))
    old = kept.with_name(f"{kept.name}.old-{os.getpid()}")
    if kept.exists():  # (the same recipe trained again: a run started over without --resume)
        kept.rename(old)
    staging.rename(kept)
    shutil.rmtree(old, ignore_errors=True)


def lora_routes(run: SettingRun, bits: int, routes) -> None:
    """Plain LoRA's kept adapter merged the way users can today: by re-quantizing, by merge_lora onto the base's own
    grid, and through L4Q (last: it takes the model over); `routes`: which of them (LORA_ROUTES, MERGE_CANDIDATES),
    each skipped if its result is kept. Without a kept adapter of this very recipe (a part stopped before them in
    another session: build/ is not kept; a candidates file of other settings) LoRA is trained again, with the same
    seed, and its row is replaced by the adapter the remaining routes merge."""
    from peft import PeftModel

    kept = kept_lora(run, bits)
    if not (kept / RECIPE).exists():  # (written last, before the rename: its presence is a whole adapter)
        print(f"  {run.setting} {bits}-bit lora: no kept adapter of this recipe; trained for its merge routes", flush=True)
        run_lora(run, "lora", bits)
    if "lora_requant" in routes:
        lora_by_requantizing(run, PeftModel.from_pretrained(load_quant(run.dirs[bits]), str(kept)), bits)
    lora_by_merge_lora(run, kept, bits, [r for r in routes if r in MERGES])
    if "lora_l4q" in routes:
        lora_through_l4q(run, PeftModel.from_pretrained(load_quant(run.dirs[bits]), str(kept), is_trainable=True), bits)


def lora_by_requantizing(run: SettingRun, m, bits: int) -> None:
    """lora_requant: the trained LoRA merged by dequantizing, adding its delta and quantizing with GPTQ again."""
    if run.done("lora_requant", bits=bits):
        return
    q, info, tmp = lora_requantize(m, run.dirs, bits, run.cfg, run.work, run.probe)
    run.record("lora_requant", bits, dict(**run.evaluate(q), **info))
    for d in tmp:
        shutil.rmtree(d, ignore_errors=True)


def lora_by_merge_lora(run: SettingRun, lora_dir: Path, bits: int, variants) -> None:
    """`variants` (of MERGE_VARIANTS, MERGE_CANDIDATES): the saved LoRA merged by merge_lora onto the base's own grid
    (a fresh copy of the base each time), calibrated on the LoRA's own training data."""
    calib = calibration(run)
    for variant in variants:
        if run.done(variant, bits=bits):
            continue
        # (distilled at merge_lora's default rate, 3e-5: LoTA's 1e-4 did worse on the long run's first cell, 18.51
        # against 16.94)
        options = {k: (len(calib) if v is None else v) for k, v in MERGES[variant].items()}
        merged, info = lora_merged(run.dirs[bits], lora_dir, calib, options)
        run.record(variant, bits, dict(**run.evaluate(merged), **info))
        del merged


def calibration(run: SettingRun) -> list:
    """merge_lora's calibration: the LoRA's own training data (its input ids)."""
    return [b if run.setting == "recovery" else b[0] for b in run.batches]


def run_joint(run: SettingRun, method: str, bits: int) -> None:
    """JOINT_CANDIDATES: LoTA's scales (factors frozen) and a float LoRA of the benchmark's rank on the same layers,
    trained together (the scales at LoTA's rate, the LoRA at LoRA's); the scales merged exactly, the LoRA saved and
    merged onto that trained grid by merge_lora. Records the merged score, and the joint model's unmerged score
    (ppl_unmerged) and the scales' alone (ppl_without_lora: the same model less its LoRA)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    m = make_adapter_model("lota_scales_only", run.dirs, bits, run.cfg)
    rank, loras, hooks, layers = run.cfg["rank"], {}, [], set(lota_layers(m))
    for name, mod in m.named_modules():
        if mod in layers:
            A = torch.nn.Linear(mod.in_features, rank, bias=False, device=device())  # PEFT LoRA's init: A uniform,
            B = torch.nn.Linear(rank, mod.out_features, bias=False, device=device())  # B = 0, scaling alpha / r = 1
            torch.nn.init.zeros_(B.weight)
            mod.joint_lora = torch.nn.Sequential(A, B)
            hooks.append(mod.register_forward_hook(lambda mod, args, out: out + mod.joint_lora(args[0]).to(out.dtype)))
            loras[name] = mod.joint_lora
    scales = [p for n, p in m.named_parameters() if ".lota_scales." in n and p.requires_grad]
    options = dict(JOINT_CANDIDATES[method])
    rates = dict(lr=run.lr_of("lota"), lora_lr=options.pop("lora_lr", run.lrs["lora"]))
    groups = [dict(params=scales, lr=rates["lr"]),
              dict(params=[p for seq in loras.values() for p in seq.parameters()], lr=rates["lora_lr"])]
    log = train(m, method, run.batches, run.loss_fn, None, f"{run.setting} {bits}-bit {method}", groups=groups)
    log.update(rates)
    joint = run.evaluate(m)
    folder = run.work / f"{method}-{bits}bit"
    folder.mkdir(parents=True, exist_ok=True)
    LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS, task_type="CAUSAL_LM").save_pretrained(folder)
    save_file({f"{n}.lora_{x}.weight": seq[i].weight.detach().float().cpu().contiguous()
               for n, seq in loras.items() for i, x in enumerate("AB")}, folder / "adapter_model.safetensors")
    for h in hooks:
        h.remove()
    for mod in loras:
        del m.get_submodule(mod).joint_lora
    scales_merged, info = merged_exactly(m, run.probe)
    alone = run.evaluate(scales_merged)
    options = {k: (len(run.batches) if v is None else v) for k, v in options.items()}
    merged, merge_info = lora_merged(None, folder, calibration(run), options, base=scales_merged)
    run.record(method, bits, dict(**run.evaluate(merged), **log, **info, **merge_info,
                                  **{f"{k}_unmerged": v for k, v in joint.items() if k in ("ppl", "em")},
                                  **{f"{k}_without_lora": v for k, v in alone.items() if k in ("ppl", "em")}))
    shutil.rmtree(folder, ignore_errors=True)


def lora_through_l4q(run: SettingRun, m, bits: int) -> None:
    """lora_l4q: the same A, B inside L4Q's quantizer, a short quantization-aware run, merged exactly."""
    import peft_lota

    if run.done("lora_l4q", bits=bits):
        return

    short = run.batches[: max(1, round(run.cfg["l4q_from_lora_fraction"] * len(run.batches)))]
    l4q = peft_lota.l4q_from_lora(m)
    fresh = run.evaluate(l4q)
    log = train(l4q, "lora_l4q", short, run.loss_fn, run.lrs["lora_l4q"], f"{run.setting} {bits}-bit lora->l4q")
    merged, info = merged_exactly(l4q, run.probe)
    run.record("lora_l4q", bits, dict(**run.evaluate(merged), **log, **info, lr=run.lrs["lora_l4q"],
                                      steps=len(short), before_qat=fresh, codes_moved_pct=None))


def run_exact(run: SettingRun, method: str, bits: int) -> None:
    """A LoTA or L4Q variant trained, merged exactly and scored (lota_float: scored unmerged, then rounded)."""
    m = make_adapter_model(method, run.dirs, bits, run.cfg)
    lr = run.lr_of(method)
    log = train(m, method, run.batches, run.loss_fn, lr, f"{run.setting} {bits}-bit {method}")
    log.update(lr=lr, codes_moved_pct=codes_moved_pct(m))
    if method == "lota_float":  # not exactly mergeable: scored unmerged, then merged with rounding
        run.record(method, bits, dict(**run.evaluate(m), **log))
        run.record("lota_float_rounded", bits, merged_with_rounding(run, m))
    else:
        if log["codes_moved_pct"] and any(mod.lota_scales for mod in lota_layers(m)):
            log.update(parts_in_run(run, m))
        merged, info = merged_exactly(m, run.probe)
        run.record(method, bits, dict(**run.evaluate(merged), **log, **info))


def lota_layers(model) -> list:
    from peft_lota.lota.layer import LotaLayer

    return [mod for mod in model.modules() if isinstance(mod, LotaLayer)]


@torch.no_grad()
def parts_in_run(run: SettingRun, model) -> dict:
    """What the code moves and the trained scales of one trained LoTA model each carry (issue 29's ablation on one
    training trajectory; the scales-only and codes-only rows train apart, and differ from it by a run's own noise):
    its score with the moves taken back (every B at 0: no code moves, the trained scales kept), and with the scales
    taken back (the base's scales, the moves kept). Keys: the score's, suffixed _without_moves / _without_scales."""
    out = {}
    for part, tables in (("moves", ("lota_B",)), ("scales", ("lota_scales", "lota_offsets"))):
        params = [p for mod in lota_layers(model) for t in tables for p in getattr(mod, t).values()]
        kept = [p.detach().clone() for p in params]
        for p in params:
            p.zero_()  # (B = 0: A @ B = 0, no code moves; u = 0: multiplier 1, the base's scales)
        try:
            score = run.evaluate(model)
        finally:
            for p, v in zip(params, kept):
                p.copy_(v)
        out.update({f"{k}_without_{part}": v for k, v in score.items() if k in ("ppl", "em")})
    return out


def merged_with_rounding(run: SettingRun, m) -> dict:
    """lota_float_rounded: the float offset rounded into the codes; its score, how far the logits moved from the
    unmerged model and the largest weight change the rounding made."""
    with torch.no_grad():
        before = m(input_ids=run.probe).logits
    m.base_model.merge_adapter(round_float_offset=True)  # layers keep their rounding reports
    reports = [r for layer in m.base_model._tuner_layers() for r in layer.merge_reports.values()]
    merged = m.merge_and_unload(round_float_offset=True)  # already merged: unloads
    out = run.evaluate(merged)
    with torch.no_grad():
        out["max_logit_change_vs_unmerged"] = float((merged(input_ids=run.probe).logits - before).abs().max())
    out["max_abs_weight_change"] = max(r["max_abs_weight_change"] for r in reports)
    return out


def run_setting(setting: str, cfg: dict, dirs: dict, results: dict, save, known: dict | None = None,
                kept: Path | None = None) -> None:
    """Every method at every bit width for one setting; fills results[setting][method][bits].
    `known`: scores already measured for the un-fine-tuned models ({"fp": {...}, "4": {...}}); `kept`: where plain
    LoRA's trained adapters are kept for --resume (None: not kept)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(dirs["fp"])
    batches, score, loss_fn = setting_data(setting, cfg, dirs, tok)
    run = SettingRun(setting, cfg, dirs, batches, score, loss_fn, results.setdefault(setting, {}), save,
                     Path(tempfile.mkdtemp(prefix="bench_acc_")), kept)
    try:
        known = known or {}
        methods = cfg.get("setting_methods", {}).get(setting, cfg["methods"])
        if not run.done("fp", bits="fp"):
            run.record("fp", "fp", known.get("fp") or run.evaluate(load_fp(dirs["fp"])))
        if "fp_lora" in methods and not run.done("fp_lora", bits="fp"):
            run_fp_lora(run)
        for bits in cfg.get("setting_bits", {}).get(setting, cfg["bits"]):
            if not run.done("gptq", bits=bits):
                run.record("gptq", bits, known.get(str(bits)) or run.evaluate(load_quant(dirs[bits])))
            at_bits = cfg.get("bits_methods", {}).get(bits, methods)
            chosen = [m for m in methods if m in at_bits]  # what this setting runs at these bits
            # the references first, then the exact methods, then plain LoRA's merge routes (the slowest part of a
            # long run's cell: a part stopped there has every method's own row)
            for method in (m for m in ("lora", "lora_r16", "qalora") if m in chosen):
                if not run.done(method, bits=bits):
                    run_lora(run, method, bits)
            for method in [m for m in chosen if m.startswith(("lota", "l4q")) and not run.done(m, bits=bits)]:
                (run_joint if method in JOINT_CANDIDATES else run_exact)(run, method, bits)
            named = [m for m in chosen if m in LORA_ROUTES]  # routes named in --methods: those alone
            routes = [*(named or (LORA_ROUTES if "lora" in chosen else ())),
                      *(m for m in chosen if m in MERGE_CANDIDATES)]
            if routes and not run.done(*routes, bits=bits):
                lora_routes(run, bits, routes)
    finally:
        shutil.rmtree(run.work, ignore_errors=True)


def run_tune(cfg: dict, dirs: dict, results: dict, save) -> None:
    """The pilot, at `tune_bits`, scored on held-out training data (never the test split): each AdamW-trained
    method at each candidate learning rate, the paper's LoTA at each candidate omega. Scored unmerged (a
    merged exact method scores the same)."""
    from transformers import AutoTokenizer

    import peft_lota

    tok = AutoTokenizer.from_pretrained(dirs["fp"])
    bits = cfg["tune_bits"]
    for setting in cfg["settings"]:
        batches, score, loss_fn = setting_data(setting, cfg, dirs, tok, validation=True)
        short = batches[: max(1, round(cfg["l4q_from_lora_fraction"] * len(batches)))]
        res = results.setdefault(setting, {})
        for ref, load in (("fp", lambda: load_fp(dirs["fp"])), ("gptq", lambda: load_quant(dirs[bits]))):
            if "-" not in res.get(ref, {}):  # (--resume: kept from the earlier run)
                res.setdefault(ref, {})["-"] = score(load())
        runs = []
        for method in cfg["tune_methods"]:
            if LOTA_VARIANTS.get(method, (None, "adamw"))[1].startswith("tsign"):
                runs += [(method, dict(paper_omega=o), f"omega={o}") for o in cfg["tune_omegas"]]
            else:
                grid = cfg["tune_lrs"] if not isinstance(cfg["tune_lrs"], dict) else \
                    cfg["tune_lrs"].get(method) or cfg["tune_lrs"][family_of(method)]
                runs += [(method, dict(lr=lr), f"lr={lr:g}") for lr in grid]
        for method, knob, key in runs:
            if key in res.get(method, {}):  # --resume: this run is in the results already
                print(f"  {setting:8s} {method:14s} {key:12s} kept (--resume)", flush=True)
                continue
            if method == "lora_l4q":  # a LoRA at its chosen rate, then the short L4Q run at each rate
                lora = make_adapter_model("lora", dirs, bits, cfg)
                train(lora, "lora", batches, loss_fn, cfg["lrs"][setting]["lora"], f"tune {setting} lora for l4q")
                model = peft_lota.l4q_from_lora(lora)
                log = train(model, method, short, loss_fn, knob["lr"], f"tune {setting} {method} {key}")
            else:
                model = make_adapter_model(method, dirs, bits, dict(cfg, **knob))
                log = train(model, method, batches, loss_fn, knob.get("lr"), f"tune {setting} {method} {key}")
            log["codes_moved_pct"] = codes_moved_pct(model)
            if method in ("lora", "lora_r16", "qalora"):
                log.update(lora_update_in_steps(model))
            res.setdefault(method, {})[key] = dict(**score(model), **log)
            res[method][key].pop("samples", None)
            save()
            print(f"  {setting:8s} {method:14s} {key:12s} {score_str(res[method][key])}  {log}", flush=True)
            del model


# ----------------------------------------------------------------------------- report
def score_value(r: dict) -> float:
    return r["ppl"] if "ppl" in r else r["em"]


def gain_over(base: dict, r: dict) -> float:
    """How much better r scores than base: log(ppl_base / ppl) for perplexity, exact-match points for a task."""
    import math

    return math.log(base["ppl"] / r["ppl"]) if "ppl" in r else r["em"] - base["em"]


def suffixed_score(r: dict, suffix: str) -> float:
    """The score a row records under `suffix` (its parts: ppl_without_moves, em_unmerged, ...)."""
    return score_value({k.removesuffix(suffix): v for k, v in r.items() if k.endswith(suffix)})


def score_str(r: dict | None, seeds: int = 0) -> str:
    """A score; over several seeds, their mean +- half their range. `seeds`: how many the run has; a cell that has
    fewer so far (a run in parts) says how many it holds, so that it is not read as a mean of them all."""
    if r is None:
        return "-"
    text = f"{r['ppl']:.2f}" if "ppl" in r else f"{r['em']:.1f}"
    n = len(r.get("per_seed", ()))
    if n > 1:
        text += f" ± {(max(r['per_seed']) - min(r['per_seed'])) / 2:.{2 if 'ppl' in r else 1}f}"
    if n and n < seeds:
        text += f" ({n} of {seeds} seeds)"
    return text


def over_seeds(runs: dict) -> dict:
    """{seed: results} -> results of the same shape whose scores are the seeds' mean (per_seed: each seed's), and
    whose other numbers (codes moved, losses, times) are their mean too."""
    out: dict = {}
    for results in runs.values():
        for setting, by_method in results.items():
            for method, by_bits in by_method.items():
                for bits, r in by_bits.items():
                    out.setdefault(setting, {}).setdefault(method, {}).setdefault(bits, []).append(r)
    for by_method in out.values():
        for by_bits in by_method.values():
            for bits, rs in by_bits.items():
                merged = {k: sum(r[k] for r in rs) / len(rs) for k in rs[0]
                          if all(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool) for r in rs)}
                merged["per_seed"] = [score_value(r) for r in rs]
                by_bits[bits] = merged
    return out


def format_tables(results: dict, bits: tuple, cfg: dict) -> str:
    lines, seeds = [], len(cfg.get("seeds") or ())
    for setting, unit in (("recovery", "held-out perplexity (lower is better)"),
                          ("task", f"exact match % on {cfg['task']} (higher is better)")):
        if setting not in results:
            continue
        res = results[setting]
        head = ["method"] + [f"{b}-bit" for b in bits]
        lines += [f"**{setting}**: {unit}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for method, (label, *_) in METHODS.items():
            if method not in res:
                continue
            r = res[method]
            if "fp" in r:  # bit-independent rows
                cells = [score_str(r["fp"], seeds)] * len(bits)
            else:
                cells = [score_str(r.get(str(b)), seeds) for b in bits]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


UPDATE_HEAD = ("The trained LoRA's update on its base's grid (|B A * scaling| over each weight's quantization step, "
               "all adapted layers): past half a step, nearest rounding would move a code; below it, only trained "
               "scales or coordinated moves (merge_lora's error feedback) can carry it.")


def format_details(results: dict, bits: tuple) -> str:
    """What the merges did, per setting and bit width, and the training time of each method."""
    exact = [m for m in METHODS if m.startswith(("lota", "l4q", "lora_l4q")) and m not in ("lota_float",
                                                                                            "lota_float_rounded")]
    lines = ["| setting | bits | method | codes moved % | merged vs adapter, max logit diff |", "|---|---|---|---|---|"]
    for setting, res in results.items():
        for b in map(str, bits):
            for method in exact:
                r = res.get(method, {}).get(b)
                if r:
                    lines.append(f"| {setting} | {b} | {METHODS[method][0]} | {r.get('codes_moved_pct', '-')} | "
                                 f"{r.get('max_logit_diff_merged_vs_adapter', '-')} |")
    parts = [(setting, b, m, res[m][b]) for setting, res in results.items() for b in map(str, bits) for m in exact
             if any(k.endswith("_without_moves") for k in res.get(m, {}).get(b, {}))]
    if parts:
        lines += ["", "What one trained LoTA model's parts carry (the same run scored with its code moves taken back, "
                  "and with its trained scales taken back):", "",
                  "| setting | bits | method | merged | without its code moves | without its trained scales |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {setting} | {b} | {METHODS[m][0]} | {score_value(r)} | {suffixed_score(r, '_without_moves')} | "
                  f"{suffixed_score(r, '_without_scales')} |" for setting, b, m, r in parts]
    merges = [(setting, b, v, res[v][b]) for setting, res in results.items() for b in map(str, bits)
              for v in MERGES if b in res.get(v, {})]
    if merges:
        lines += ["", "merge_lora, as it reported (on the held-out eighth of the LoRA's training batches: loss gap to "
                  "the unmerged LoRA, top-1 agreement; the layers' output error on the calibration inputs, relative to "
                  "the update's, by nearest rounding and by the merge):", "",
                  "| setting | bits | method | codes moved % | loss gap % | top-1 agreement % | layer error, nearest "
                  "-> merge | merge s |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {setting} | {b} | {METHODS[v][0]} | {r['codes_moved_pct']} | {r['calib_gap_pct']:+.2f} | "
                  f"{r['top1_agreement_pct']} | {r['mean_layer_error_nearest']} -> {r['mean_layer_error']} | "
                  f"{r['merge_s']} |" for setting, b, v, r in merges]
    joint = [(setting, b, m, res[m][b]) for setting, res in results.items() for b in map(str, bits)
             for m in JOINT_CANDIDATES if b in res.get(m, {})]
    if joint:
        lines += ["", "The joint route's parts (one trained model: the scales and the LoRA unmerged; the scales alone, "
                  "merged exactly, the LoRA dropped; the LoRA then merged onto that grid by merge_lora):", "",
                  "| setting | bits | method | scales + LoRA, unmerged | scales alone | merged | codes moved % | "
                  "merge's loss gap % |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {setting} | {b} | {METHODS[m][0]} | {suffixed_score(r, '_unmerged')} | "
                  f"{suffixed_score(r, '_without_lora')} | {score_value(r)} | {r['codes_moved_pct']} | {r['calib_gap_pct']:+.2f} |" for setting, b, m, r in joint]
    ablation = [(setting, b, res) for setting, res in results.items() for b in map(str, bits)
                if all(b in res.get(m, {}) for m in ("gptq", "lota", "lota_scales_only", "lota_noscales"))]
    if ablation:
        lines += ["", "What LoTA's parts carry (the gain over the GPTQ model: perplexity as a log ratio, exact match in "
                  "points; the codes' share is the part of the defaults' gain that the scales alone do not reach):", "",
                  "| setting | bits | defaults | scales only | codes only | codes' share of the defaults' gain |",
                  "|---|---|---|---|---|---|"]
        for setting, b, res in ablation:
            gain = {m: gain_over(res["gptq"][b], res[m][b]) for m in ("lota", "lota_scales_only", "lota_noscales")}
            share = "-" if gain["lota"] <= 0 else f"{100 * (1 - gain['lota_scales_only'] / gain['lota']):+.0f}%"
            lines.append(f"| {setting} | {b} | {gain['lota']:+.4f} | {gain['lota_scales_only']:+.4f} | "
                         f"{gain['lota_noscales']:+.4f} | {share} |")
    updates = [(setting, b, m, res[m][b]) for setting, res in results.items() for b in map(str, bits)
               for m in ("lora", "lora_r16") if "update_rms_steps" in res.get(m, {}).get(b, {})]
    if updates:
        lines += ["", UPDATE_HEAD, "", "| setting | bits | method | past half a step % | past one step % | rms, steps |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {setting} | {b} | {METHODS[m][0]} | {r['update_past_half_step_pct']:.3f} | "
                  f"{r['update_past_one_step_pct']:.4f} | {r['update_rms_steps']:.4f} |" for setting, b, m, r in updates]
    times: dict = {}
    for setting, res in results.items():
        for method, by_bits in res.items():
            ts = [r["train_s"] for r in by_bits.values() if "train_s" in r]
            if ts:
                times.setdefault(method, {})[setting] = sum(ts) / len(ts)
    lines += ["", "Training time per run (s, mean over bit widths): " + "; ".join(
        f"{METHODS[m][0]}: " + ", ".join(f"{s} {t:.0f}" for s, t in by.items()) for m, by in times.items())]
    return "\n".join(lines)


def format_tune(results: dict, cfg: dict) -> str:
    recovery = ("recovery trains on the first 90% of the fine-tuning docstrings and scores perplexity on the other "
                "10%" if cfg.get("source") == "real" else "recovery trains on the finetune split's first 90% and "
                "scores perplexity on its last 10% (other files)")
    lines = [f"Pilot at {cfg['tune_bits']} bits, {cfg['recovery_steps']} / {cfg['task_steps']} steps (recovery / task), "
             f"scored on held-out data of the training set, never on the test split: {recovery}; the task trains "
             "on items of the train split's files and scores exact match % on items of the finetune split's files.",
             ""]
    for setting, res in results.items():
        lines += [f"**{setting}**", "", "| method | knob | score | final train loss | codes moved % |",
                  "|---|---|---|---|---|"]
        for method, by_knob in res.items():
            for knob, r in by_knob.items():
                lines.append(f"| {method} | {knob} | {score_str(r)} | {r.get('final_loss', '-')} | "
                             f"{r.get('codes_moved_pct', '-')} |")
        lines.append("")
        updates = [(m, k, r) for m, by_knob in res.items() for k, r in by_knob.items() if "update_rms_steps" in r]
        if updates:
            lines += [UPDATE_HEAD, "", "| method | knob | past half a step % | past one step % | rms, steps |",
                      "|---|---|---|---|---|"]
            lines += [f"| {m} | {k} | {r['update_past_half_step_pct']:.3f} | {r['update_past_one_step_pct']:.4f} | "
                      f"{r['update_rms_steps']:.4f} |" for m, k, r in updates]
            lines.append("")
    return "\n".join(lines)


def plot(results: dict, bits: tuple, cfg: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [s for s in ("recovery", "task") if s in results]
    fig, axes = plt.subplots(1, len(settings), figsize=(6.5 * len(settings), 4.6), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        res = results[setting]
        for method, (label, *_) in METHODS.items():
            if method not in res:
                continue
            r = res[method]
            if "fp" in r:
                ax.axhline(score_value(r["fp"]), ls="--", color="k" if method == "fp" else "grey", label=label)
                continue
            xs = [b for b in bits if str(b) in r]
            ls = "-" if method.startswith(("lota", "l4q", "lora_l4q")) else ":" if method == "gptq" else "-."
            ax.plot(xs, [score_value(r[str(b)]) for b in xs], marker="o", ls=ls, label=label)
        ax.set_xticks(list(bits))
        ax.set_xlabel("GPTQ bits")
        ax.set_ylabel("held-out perplexity (lower is better)" if setting == "recovery"
                      else f"exact match % ({cfg['task']})")
        ax.set_title(f"{setting}: {cfg['model_name']} model")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    """The command line (--help)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="cpu", choices=sorted(BENCH_PRESETS))
    ap.add_argument("--root", default=None, help="model cache (default: demo_out, shared with examples/demo.py; the "
                    "real presets: build/real-model, shared with examples/real_model.py and the demo)")
    ap.add_argument("--out", default=str(RESULTS), help="where accuracy-<preset>.{md,json,png} go")
    ap.add_argument("--settings", nargs="+", default=None, choices=["recovery", "task"],
                    help="default: the preset's (recovery and task for most)")
    ap.add_argument("--bits", type=int, nargs="+", default=None, help="default: the preset's")
    ap.add_argument("--paper-omega", type=int, default=None, help="the paper LoTA variants' omega (default: the preset's)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps of every run (default: the preset's)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default on CPU: half the cores; 2 threads on a 2-core machine that "
                         "others also use ran 5-10x slower than 1)")
    ap.add_argument("--methods", nargs="+", default=None, choices=(*TRAINED, *LORA_ROUTES, *MERGE_CANDIDATES),
                    help="fine-tuned methods to run (default: the preset's; plain LoRA's merge routes come with "
                         "lora, or only those named here; a route or merge candidate merges the kept LoRA of the "
                         "same recipe, trained if none is kept)")
    ap.add_argument("--seed", type=int, default=0, help="adapter initialisation seed (the data order stays fixed)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="run every method once per seed (adapter initialisation and data order) and report each "
                         "score as the seeds' mean +- half their range (default: the preset's seeds, else --seed)")
    ap.add_argument("--tag", default="", help="suffix of the result files: accuracy-<preset>-<tag>.*")
    ap.add_argument("--tune", action="store_true", help="run the pilot (lr and omega) instead")
    ap.add_argument("--tune-lrs", type=float, nargs="+", default=None, help="pilot: learning rates to try")
    ap.add_argument("--tune-omegas", type=int, nargs="+", default=None, help="pilot: LoTA omegas to try")
    ap.add_argument("--tune-methods", nargs="+", default=None, choices=(*TRAINED, "lora_l4q"),
                    help="pilot: only these methods")
    ap.add_argument("--lr", action="append", default=[], metavar="METHOD=LR",
                    help="override a method's learning rate in both settings (repeatable), e.g. lota=3e-4")
    ap.add_argument("--autocast", choices=("float32", "bf16"), default=None,
                    help="the training steps' precision (default: the preset's for a benchmark, float32 for a pilot); "
                         "scoring and merging always run in float32")
    ap.add_argument("--resume", action="store_true",
                    help="keep the results already in accuracy-<preset>[-<tag>].json and run only what is missing "
                         "(after an interrupted run; the configuration must be the same)")
    ap.add_argument("--note", default="", help="free text stored with the results (e.g. 'shared machine')")
    ap.add_argument("--report-only", action="store_true",
                    help="write the markdown and plot of accuracy-<preset>[-<tag>].json as it is (an interrupted run's "
                         "results), running nothing")
    return ap.parse_args(argv)


def preset_config(args: argparse.Namespace) -> dict:
    """The preset's configuration with the command line's overrides (bits, omega, learning rates, steps, ...)."""
    cfg = dict(BENCH_PRESETS[args.preset])
    if args.bits:
        cfg["bits"] = tuple(args.bits)
    if args.paper_omega is not None:
        cfg["paper_omega"] = args.paper_omega
    if args.lr:
        cfg["lrs"] = {k: dict(v) for k, v in cfg["lrs"].items()}  # a copy: the preset's table stays as it is
        for item in args.lr:
            method, _, value = item.partition("=")
            for setting in cfg["lrs"].values():
                setting[method] = float(value)
    if args.steps is not None:
        cfg["recovery_steps"] = cfg["task_steps"] = args.steps
    autocast = args.autocast or ("float32" if args.tune else cfg.get("autocast") or "float32")
    cfg["autocast"] = None if autocast == "float32" else autocast
    args.settings = list(args.settings or cfg.get("settings") or ("recovery", "task"))
    cfg["settings"], cfg["seed"] = args.settings, args.seed
    cfg["seeds"] = list(args.seeds or cfg.get("seeds") or ())  # empty: one run at --seed, the data in a fixed order
    if args.methods:
        cfg["methods"] = tuple(args.methods)
    # what each LoTA and L4Q variant is (--resume refuses rows of a variant whose definition has changed since)
    cfg["method_variants"] = {**{k: {"fields": v[0], "rule": v[1]} for k, v in LOTA_VARIANTS.items()},
                       **{k: {"fields": v, "rule": "adamw"} for k, v in L4Q_VARIANTS.items()},
                       **{k: {"fields": v, "rule": "merge_lora"} for k, v in MERGE_CANDIDATES.items()},
                       **{k: {"fields": v, "rule": "joint"} for k, v in JOINT_CANDIDATES.items()}}
    for key in ("tune_lrs", "tune_omegas", "tune_methods"):
        if getattr(args, key) is not None:
            cfg[key] = tuple(getattr(args, key))
    return cfg


def build_models(cfg: dict, root: Path, bits: tuple) -> dict:
    """{"fp": full-precision folder, bits: quantized folder}: built or taken from the cache under `root`."""
    if cfg.get("source") == "real":
        from transformers import AutoTokenizer

        dirs = {"fp": real_model.float_checkpoint(root, cfg["layers"])}
        ANSWER[0] = "{}" + AutoTokenizer.from_pretrained(dirs["fp"]).eos_token  # the answer ends the chat turn
        dirs.update({b: real_model.quantized(cfg["variants"][b], root, cfg["layers"]) for b in bits})
        return dirs
    return dm.build(cfg["model"], root, bits=bits)


def family_of(method: str) -> str:
    """Whose rate (and pilot grid) a method without its own takes: LoTA's variants LoTA's, L4Q's plain LoRA's."""
    return "lota" if method.startswith("lota") else "lora" if method in L4Q_VARIANTS else method


def rate_of(lrs: dict, method: str) -> float | None:
    """A method's learning rate in one setting's table, else its family's."""
    return lrs.get(method, lrs.get(family_of(method)))


def same_configuration(old: dict, config: dict, tune: bool) -> bool:
    """--resume: whether the kept results were run as this run would run them. The settings asked for, and the rates of
    a setting the earlier run has no result of, may differ: a long run's task joins after its own pilot. The methods
    may differ (results are keyed by method: a candidate added to a candidates file), and a pilot's grids too (its
    results are keyed by method and rate: a grid extended at its edge), and its rates (the benchmark's, which only
    lora_l4q's pilot uses). A method with kept rows must keep its rate (its own or its family's) and its variant's
    fields (an older record has none to compare)."""
    tables = [old["results"], *old.get("runs", {}).values()]
    kept = {(setting, method) for t in tables for setting, by_method in t.items() for method in by_method}
    done = {setting for setting, _ in kept} | set(old["results"])
    free = ("settings", "lrs", "methods", "method_variants") + (("tune_lrs", "tune_methods", "tune_omegas") if tune else ())
    keys = (set(old["config"]) | set(config)) - set(free)  # a key an older record lacks reads as None
    old_lrs, new_lrs = old["config"]["lrs"], config["lrs"]
    same_rates = tune or (all(new_lrs.get(s, {}).get(m) == lr for s in done  # (a new method's rate may join)
                              for m, lr in old_lrs.get(s, {}).items())
                          and all(rate_of(old_lrs.get(s, {}), m) == rate_of(new_lrs.get(s, {}), m) for s, m in kept))
    old_variants = old["config"].get("method_variants") or {}
    same_variants = all(old_variants[m] == config.get("method_variants", {}).get(m) for _, m in kept if m in old_variants)
    return same_rates and same_variants and all(old["config"].get(k) == config.get(k) for k in keys)


def run_part(record: dict, tune: bool) -> dict:
    """One part of a run in parts (--resume): when and at which commit it ran, its note, and what it was asked to run."""
    config = record["config"]
    asked = ("tune_methods", "tune_lrs") if tune else ("settings",)
    return dict(date=record["machine"]["date"], commit=record["machine"]["git_commit"], cpu=record["machine"]["cpu"],
                note=record.get("note", ""), **{k: config.get(k) for k in asked})


def resume(record: dict, previous: Path, tune: bool = False) -> None:
    """--resume: keep the results (and quantization gap) of an earlier run of the same configuration."""
    old = json.loads(previous.read_text())
    if not same_configuration(old, json.loads(json.dumps(record["config"], default=str)), tune):
        sys.exit(f"--resume: {previous} was written with another configuration; run without --resume "
                 "(or with the same preset, options and --lr) to start over")
    if old.get("bases") != record.get("bases") and not (tune and "bases" not in old):  # (older pilots have none)
        sys.exit(f"--resume: {previous} was measured on other base models than the ones built here (fingerprints "
                 f"{old.get('bases')} there, {record.get('bases')} here; a build from before the reproducible "
                 "build has none): results on different bases cannot be mixed; run without --resume to start over")
    results = record["results"]
    results.update(old["results"])
    if "runs" in old:
        record["runs"] = old["runs"]
    if old.get("gap") is not None:  # (a pilot's record has none)
        record["gap"] = old["gap"]
    record["machine"]["resumed_from"] = old["machine"]
    record["parts"] = old.get("parts") or [run_part(old, tune)]  # what each part ran, where and beside what
    record["parts"].append(run_part(record, tune))
    tables = list(record["runs"].values()) if "runs" in record else [results]  # (results: the seeds' mean)
    print(f"resuming {previous}: {sum(len(v) for t in tables for r in t.values() for v in r.values())} results kept",
          flush=True)


def quantization_gap(cfg: dict, dirs: dict, record: dict) -> dict:
    """Held-out perplexity of the full-precision and every quantized model, before any fine-tuning (kept in
    record["gap"], and returned as {key: score} for run_setting): if GPTQ costs nothing there is nothing to recover."""
    real = cfg.get("source") == "real"
    blocks = real_recovery_blocks(dirs["fp"], cfg)[1] if real else dm.eval_blocks(dirs["fp"], cfg["model"])
    known = {k: dict(ppl=v) for k, v in (record.get("gap") or {}).items()}
    for key, load in [("fp", lambda: load_fp(dirs["fp"]))] + [(str(b), lambda b=b: load_quant(dirs[b]))
                                                              for b in cfg["bits"]]:
        if key in known:
            continue
        t0 = time.time()
        known[key] = dict(ppl=round(dm.perplexity(load(), blocks), 3))
        known[key]["eval_s"] = round(time.time() - t0, 1)
    gap = record["gap"] = {k: v["ppl"] for k, v in known.items()}
    print("quantization gap (held-out perplexity): " + ", ".join(
        f"{k}{'' if k == 'fp' else '-bit'} {v:.2f}" for k, v in gap.items()), flush=True)
    return known


def main(argv=None) -> None:
    """Run a preset's benchmark (or its pilot, --tune) and write its results, report and plot."""
    args = parse_args(argv)
    if args.report_only:
        return report_only(args)

    quiet()
    torch.compiler.set_stance("force_eager")  # gptqmodel compiles its dequantization: slower than eager here
    cfg = preset_config(args)
    THREADS[0] = args.threads or cfg.get("threads") or (max(1, (os.cpu_count() or 2) // 2) if device().type == "cpu"
                                                        else os.cpu_count())
    real = cfg.get("source") == "real"
    root = Path(args.root or ("build/real-model" if real else "demo_out"))
    root = root / "smoke" if args.preset == "smoke" else root
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(THREADS[0])
    AUTOCAST[0] = {None: None, "bf16": torch.bfloat16}[cfg["autocast"]]

    wall, t_start = {}, time.time()
    t0 = time.time()
    dirs = build_models(cfg, root, cfg["bits"] if not args.tune else (cfg["tune_bits"],))
    wall["build_s"] = round(time.time() - t0, 1)
    print(f"models: {dirs['fp'].parent} (ready in {wall['build_s']:.0f} s)", flush=True)

    results: dict = {}
    stem = f"accuracy-{args.preset}" + ("-tune" if args.tune else "") + (f"-{args.tag}" if args.tag else "")
    record = dict(preset=args.preset, note=args.note, config={k: v for k, v in cfg.items() if k != "model"},
                  model_preset=None if real else dm.get_preset(cfg["model"]), methods={k: v[1] for k, v in METHODS.items()},
                  results=results)

    record["machine"] = machine_info()  # once: the commit measured, before the run
    if real:  # which base models were measured: results on different builds are never mixed (see resume)
        record["bases"] = {str(k): real_model.fingerprint(d) for k, d in dirs.items()}
        BASES.update({str(Path(d).resolve()): record["bases"][str(k)] for k, d in dirs.items()})
    previous = out_dir / f"{stem}.json"
    if args.resume and previous.exists():
        resume(record, previous, args.tune)

    def save():
        record["machine"]["wall_s"] = dict(wall, total_s=round(time.time() - t_start, 1))
        staging = out_dir / f"{stem}.json.partial"  # then renamed: a run stopped mid-save keeps the last results
        staging.write_text(json.dumps(record, indent=1, default=str))
        staging.replace(out_dir / f"{stem}.json")

    if args.tune:
        run_tune(cfg, dirs, results, save)
        save()
        text = format_tune(results, cfg)
    else:
        known = quantization_gap(cfg, dirs, record)
        # plain LoRA's trained adapters (build/, not committed), for --resume and for a candidates file (--tag) of the
        # same preset: each beside its recipe, reused only by a run of the same (lora_recipe)
        kept = root / "kept-loras" / f"accuracy-{args.preset}"
        runs = record.setdefault("runs", {}) if cfg["seeds"] else None  # {seed: results}, when seeds are asked for
        for setting in args.settings:
            t0 = time.time()
            gap = known if setting == "recovery" else None
            if runs is None:
                run_setting(setting, cfg, dirs, results, save, gap, kept / setting)
            for seed in cfg["seeds"]:
                print(f"{setting}, seed {seed}", flush=True)
                run_setting(setting, dict(cfg, seed=seed, data_seed=seed), dirs, runs.setdefault(str(seed), {}),
                            save, gap, kept / f"{setting}-seed{seed}")
            wall[f"{setting}_s"] = round(time.time() - t0, 1)
            print(f"{setting}: {wall[f'{setting}_s']:.0f} s", flush=True)
        if runs is not None:
            results.clear()
            results.update(over_seeds(runs))
        wall["benchmark_s"] = round(time.time() - t_start - wall["build_s"], 1)
        save()
        text = format_tables(results, cfg["bits"], cfg) + "\n" + format_details(results, cfg["bits"]) + "\n"
        plot(results, cfg["bits"], cfg, out_dir / f"{stem}.png")
    write_report(record, args.preset, cfg, text, out_dir / stem, args.note)
    if cfg.get("history") and not args.tune:
        append_history(record, cfg, out_dir / f"{args.preset}-history.md", args.note)
    print(text)
    print(f"wrote {out_dir / stem}.{{md,json{',png' if not args.tune else ''}}}; total {time.time() - t_start:.0f} s")


def append_history(record: dict, cfg: dict, path: Path, note: str) -> None:
    """One row per run of a guard preset (real-quick): the commit, each method's score and codes moved, so that a
    change in what a method learns shows next to the commit that made it."""
    methods = [m for m in ("gptq", *cfg["methods"]) if m in record["results"].get("recovery", {})]
    if not path.exists():
        path.write_text(f"# `{path.stem.removesuffix('-history')}` figures, one row per run\n\nHeld-out perplexity "
                        "(merged, for the exact methods; codes moved % in brackets). Appended by bench_accuracy.py.\n\n"
                        "| date | commit | " + " | ".join(methods) + " | note |\n|" + "---|" * (len(methods) + 3) + "\n")
    res, m = record["results"]["recovery"], record["machine"]
    bits = str(cfg["bits"][0])
    cells = []
    for method in methods:
        r = res[method].get(bits, {})
        moved = r.get("codes_moved_pct")
        cells.append(score_str(r) + (f" ({moved})" if moved is not None else ""))
    with open(path, "a") as f:
        f.write(f"| {m['date'][:16]} | {m['git_commit']} | " + " | ".join(cells) + f" | {note} |\n")


def report_only(args) -> None:
    """The markdown (and plot) of a results file as it stands, e.g. after an interrupted run (a pilot's too)."""
    stem = f"accuracy-{args.preset}" + ("-tune" if args.tune else "") + (f"-{args.tag}" if args.tag else "")
    out_dir = Path(args.out)
    record = json.loads((out_dir / f"{stem}.json").read_text())
    cfg, results = record["config"], record["results"]
    if args.tune:
        text = format_tune(results, cfg)
        write_report(record, args.preset, cfg, text, out_dir / stem, record.get("note", ""))
        print(text)
        return
    if "runs" in record:
        results = over_seeds(record["runs"])
    bits = tuple(cfg["bits"])
    text = format_tables(results, bits, cfg) + "\n" + format_details(results, bits) + "\n"
    plot(results, bits, cfg, out_dir / f"{stem}.png")
    write_report(record, args.preset, cfg, text, out_dir / stem, record.get("note", ""))
    print(text)


def write_report(record: dict, preset: str, cfg: dict, text: str, stem: Path, note: str) -> None:
    m = record["machine"]
    header = (f"# Accuracy benchmark, preset `{preset}`\n\n"
              f"{m['date']} on {m['cpu']} ({m['cores']} cores{', ' + m['gpu'] if m['gpu'] else ''}); "
              f"torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}, gptqmodel {m['gptqmodel']}; "
              f"commit {m['git_commit']}. {note}\n\n"
              f"Wall time: benchmark {m['wall_s'].get('benchmark_s', m['wall_s']['total_s']):.0f} s "
              f"(model build/cache {m['wall_s']['build_s']:.0f} s).\n\n")
    if record.get("parts"):
        header += "Run in parts (`--resume`):\n\n" + "\n".join(
            f"- {p['date'][:16]}, commit {p['commit']}: " + ", ".join(
                f"{k} {v if isinstance(v, (str, int, float)) else json.dumps(v)}" for k, v in p.items()
                if k not in ("date", "commit", "note")) + (f". {p['note']}" if p["note"] else "")
            for p in record["parts"]) + "\n\n"
    if "gap" in record:
        fp_ppl = record["gap"]["fp"]
        header += ("Quantization gap first (held-out perplexity, no fine-tuning): full precision "
                   f"{fp_ppl:.2f}; " + "; ".join(f"{b}-bit {v:.2f} ({100 * (v / fp_ppl - 1):+.1f}%)"
                                                 for b, v in record["gap"].items() if b != "fp") + ".\n\n")
    stem.with_suffix(".md").write_text(header + text)


if __name__ == "__main__":
    main()
