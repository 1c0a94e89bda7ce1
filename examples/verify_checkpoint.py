"""Check the whole LoTA path on any GPTQ checkpoint: inject, train a few AdamW steps, merge, save, reload.

    python examples/verify_checkpoint.py path/to/gptq-model [--steps 5] [--r 8] [--offset integer]

(For a checkpoint you merged already: `peft-lota verify CHECKPOINT --against ADAPTER`.)

Prints whether (1) a fresh adapter is bit-identical to the base model, (2) merged logits equal the
adapter model's, (3) the saved checkpoint reloads with stock transformers with identical codes and
logits under the same kernel.
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

import torch  # noqa: E402
from peft import get_peft_model  # noqa: E402

import peft_lota  # noqa: E402


def load(path):
    return peft_lota.load_model(path, dtype=torch.float32)  # the trainable, layout-keeping kernel


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--offset", default="integer", choices=["none", "integer"])
    args = ap.parse_args()

    torch.manual_seed(0)
    model = load(args.path)
    x = torch.randint(0, model.config.vocab_size, (2, 32))
    with torch.no_grad():
        base = model(input_ids=x).logits
    model = get_peft_model(model, peft_lota.LotaConfig(r=args.r, omega=max(1, args.r // 4), offset=args.offset,
                                                       init_seed=0))
    with torch.no_grad():
        fresh = torch.equal(model(input_ids=x).logits, base)
    # LoTA's default latent A, B train under any optimizer; a high rate so that a few steps move codes
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for _ in range(args.steps):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    moved = sum(int((layer.get_delta_codes("default") != 0).sum())
                for layer in model.modules() if isinstance(layer, peft_lota.LotaLayer))
    with torch.no_grad():
        adapted = model(input_ids=x).logits
        merged = model.merge_and_unload()
        merged_logits = merged(input_ids=x).logits
    with tempfile.TemporaryDirectory() as out:
        merged.save_pretrained(out)
        reloaded = load(out)
        same_buffers = all(
            torch.equal(a.qweight, b.qweight) and torch.equal(a.scales, b.scales)
            for a, b in zip((m for m in merged.modules() if hasattr(m, "qweight")),
                            (m for m in reloaded.modules() if hasattr(m, "qweight"))))
        with torch.no_grad():
            reloaded_logits = reloaded(input_ids=x).logits
    print(f"codes moved by the adapter:            {moved}")
    print(f"fresh adapter == base (bit-identical): {fresh}")
    print(f"merged == adapter model:               {torch.equal(merged_logits, adapted)}")
    print(f"reloaded codes/scales == merged:       {same_buffers}")
    print(f"reloaded logits == merged:             {torch.equal(reloaded_logits, merged_logits)}")


if __name__ == "__main__":
    main()
