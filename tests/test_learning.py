"""Learning guards: every exact route still learns what it learned when its band was recorded.

The other tests check that merges are exact; none of them would notice a method that merges exactly and learns
worse (LoTA's learning once changed by a factor of several on the real model while every test passed). Here each
route trains the same seeded recipe on the real model's first 2 layers (SmolLM2-135M-Instruct, GPTQ 4-bit symmetric
g64, its real tokenizer and embeddings; examples/real_model.py): 12 AdamW steps of 4 x 64 tokens of standard-library
docstrings, then the held-out loss on other docstrings, of the merged model for the exact routes. Each must land in
the band recorded beside it. The 2-layer model is a crude stand-in (the head reads layer-2 states, so a lot of what
is learned repairs the truncation), which is why a band is per route and not a comparison between routes; the
real-model figures come from `benchmarks/bench_accuracy.py --preset real-quick`.

Bands: the value recorded on this recipe (`python tests/test_learning.py` prints them), widened to hold across CPUs and
thread counts (ternary flips follow float rounding, so a trajectory is not bit-reproducible across machines). A change
that moves a route out of its band is a change in what the method learns: measure it on real-quick, and record the new
value here with the reason in the commit.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer

import peft_lota
from peft_lota import L4QConfig, LotaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import real_model  # noqa: E402

pytestmark = pytest.mark.slow  # minutes: `pytest -m "not slow"` leaves it out

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STEPS, BATCH, SEQ, HELD = 12, 4, 64, 16
# route: (learning rate, held-out loss band (low, high)), and in front of each the figures recorded on two GPTQ builds
# of the same recipe (gptqmodel's output is not bit-reproducible from run to run; 2026-12-06, the same at 1 and 2
# threads). Untrained: 18.76 / 18.78. LoTA's code moves are chaotic (a flip changes the gradients that decide the
# next flips), so the codes-only band is the widest: it still fails a route that stops learning (scales only: 15.2).
# On the pinned build (real_model.REPRODUCIBLE_ENV, the same file on every machine; 2026-12-07): untrained 18.79,
# lora_r16 14.27, lota 15.20 (no code moved), codes only 13.27 (26,854 codes), scales only 15.20, l4q 16.90,
# merge_lora 14.47, lota_gguf_q4_1 16.32: every one inside its band.
BANDS = {
    "lora_r16": (3e-3, (13.6, 14.8)),  # 14.19 / 14.18; the reference: a change here is the recipe's or a library's
    # LotaConfig() defaults: latent ternary factors and trained scales. 15.15, no code moved: since latent_threshold
    # became 1e-3 (issue 29) the factors need ~10 steps of one sign at 1e-4 to flip, and the scales do the learning
    # (14.36 / 14.20 with the old 1e-4, which flipped them in a step or two)
    "lota": (1e-4, (14.5, 15.8)),
    # train_scales=False: only moved codes learn. 13.12 (28,698 codes) with latent_threshold 1e-3; 11.59 / 12.30
    # (~0.85M codes) with the old 1e-4
    "lota_codes_only": (1e-3, (11.0, 14.0)),
    "lota_scales_only": (1e-4, (14.5, 15.8)),  # 15.15 / 15.16; the ternary factors frozen: only the scales learn
    "l4q": (3e-3, (16.2, 17.5)),  # 16.92 / 16.87; L4QConfig(r=16) on the GPTQ grid
    "merge_lora": (None, (13.8, 15.0)),  # 14.41 / 14.40; lora_r16's adapter onto the base's grid (codes + scales)
    # LotaConfig() on the model's own GGUF Q4_1 file cut to the same 2 layers (real_model.gguf_layers): codes, fp16
    # scales d and offsets m, the offsets scaled with d. Untrained 18.80; 16.32 at 2 threads and at 1, no code moved
    "lota_gguf_q4_1": (3e-5, (15.7, 16.9)),
}


def data(folder) -> tuple[torch.Tensor, torch.Tensor]:
    """(training batches [STEPS, BATCH, SEQ], held-out blocks [HELD, SEQ]) of packed docstrings."""
    tok = AutoTokenizer.from_pretrained(folder)
    docs = real_model.prose(400, seed=1)[64:]  # the first 64 calibrated the quantizer

    def pack(texts):
        ids = [i for t in texts for i in tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
        return torch.tensor(ids[: len(ids) // SEQ * SEQ]).view(-1, SEQ)

    return pack(docs[24:])[: STEPS * BATCH].view(STEPS, BATCH, SEQ), pack(docs[:24])[:HELD]


@torch.no_grad()
def held_out_loss(model, held) -> float:
    model.eval()
    return float(model(input_ids=held, labels=held).loss)


def fit(model, batches, lr: float):
    """AdamW with 2 warm-up steps and a cosine decay, clipped at 1.0: what a stock Trainer runs."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 2) * 0.5 * (1 + math.cos(math.pi * s / len(batches))))
    model.train()
    for b in batches:
        model(input_ids=b, labels=b).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
    return model


def adapted(route: str, folder):
    torch.manual_seed(0)
    if route == "lota_gguf_q4_1":  # (the GGUF file beside the GPTQ folder, in the same cache)
        base = peft_lota.load_gguf(real_model.gguf_layers(Path(folder).parent, 2), dtype=torch.float32)
        return get_peft_model(base, LotaConfig(target_modules=TARGETS, init_seed=0))
    base = peft_lota.load_model(str(folder), dtype=torch.float32)
    if route in ("lora_r16", "merge_lora"):
        return get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    if route == "l4q":
        return get_peft_model(base, L4QConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_seed=0))
    model = get_peft_model(base, LotaConfig(target_modules=TARGETS, init_seed=0,
                                            train_scales=route != "lota_codes_only"))
    if route == "lota_scales_only":
        for name, p in model.named_parameters():
            if ".lota_A." in name or ".lota_B." in name:
                p.requires_grad_(False)
    return model


def train_lora(folder, batches, held, save_dir) -> float:
    """The LoRA reference, trained once and saved (merge_lora's input); its held-out loss."""
    model = fit(adapted("lora_r16", folder), batches, BANDS["lora_r16"][0])
    model.save_pretrained(save_dir)
    return held_out_loss(model, held)


def run(route: str, folder, batches, held, lora_dir=None) -> dict:
    """Train one route (merge_lora: merge the saved LoRA); its held-out loss (merged, for the exact routes) and what
    the merge moved."""
    if route == "merge_lora":
        from peft import PeftModel

        lora = PeftModel.from_pretrained(peft_lota.load_model(str(folder), dtype=torch.float32), str(lora_dir))
        merged = peft_lota.merge_lora(lora, list(batches), progress=False)
        return dict(loss=held_out_loss(merged, held))
    model = fit(adapted(route, folder), batches, BANDS[route][0])
    out = dict(loss=held_out_loss(model, held))
    if route != "lora_r16":
        from peft_lota.tuner_layer import codes_moved

        out["codes_moved"] = codes_moved(model)[0]
        merged = model.merge_and_unload()
        out["merged_loss"] = held_out_loss(merged, held)
    return out


@pytest.fixture(scope="module")
def setup(real_root, tmp_path_factory):
    folder = real_model.quantized("gptq-4b-sym", real_root, layers=2, calib=16)
    batches, held = data(folder)
    lora_dir = tmp_path_factory.mktemp("lora")
    return folder, batches, held, lora_dir, train_lora(folder, batches, held, lora_dir)


@pytest.mark.parametrize("route", list(BANDS))
def test_each_route_learns_what_it_learned(setup, route):
    folder, batches, held, lora_dir, lora_loss = setup
    out = dict(loss=lora_loss) if route == "lora_r16" else run(route, folder, batches, held, lora_dir)
    loss = out.get("merged_loss", out["loss"])
    if "merged_loss" in out:  # the merge is exact: the merged model is the trained one
        assert out["merged_loss"] == out["loss"]
    if route == "lota_codes_only":
        assert out["codes_moved"] > 0
    if route == "lota_scales_only":
        assert out["codes_moved"] == 0
    low, high = BANDS[route][1]
    assert low <= loss <= high, (f"{route}: held-out loss {loss:.3f} after {STEPS} steps, outside its recorded band "
                                 f"[{low}, {high}] (untrained: BANDS): a change in what this route learns")


if __name__ == "__main__":  # prints the figures the bands were recorded from: python tests/test_learning.py [ROOT]
    import tempfile

    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp())
    folder = real_model.quantized("gptq-4b-sym", root, layers=2, calib=16)
    batches, held = data(folder)
    print(f"threads {torch.get_num_threads()}; untrained {held_out_loss(peft_lota.load_model(str(folder), dtype=torch.float32), held):.3f}")
    print("lora_r16", dict(loss=train_lora(folder, batches, held, root / "lora-r16")), flush=True)
    for name in BANDS:
        if name != "lora_r16":
            print(name, run(name, folder, batches, held, root / "lora-r16"), flush=True)
