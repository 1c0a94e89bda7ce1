"""Calibration benchmark: block-wise ApiQ calibration (with and without saliency) against GPTQ, before and after
the same fine-tuning as the accuracy benchmark.

    python benchmarks/bench_calibrate.py --preset cpu --root demo_out

On the demo model (examples/demo_model.py) at 2 and 3 bits (asymmetric, group 128, the accuracy benchmark's grid):
held-out perplexity of full precision; GPTQ; ApiQ-style calibration from full precision (peft_lota.calibrate);
the same with the saliency regulariser; and each quantized model after the accuracy benchmark's recovery
fine-tuning with LoTA (its defaults) and with L4Q (from the quantized model), merged. Calibration uses the
same 128 x 256-token windows of the train split that GPTQ calibrated on. Also the calibration's time and peak
memory (RSS). Writes benchmarks/results/calibrate-<preset>.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "examples"), str(HERE)]
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

import torch  # noqa: E402

import bench_accuracy as ba  # noqa: E402
import demo_model as dm  # noqa: E402
from _machine import machine_info  # noqa: E402

RESULTS = HERE / "results"
PRESETS = {
    "smoke": dict(model=ba.BENCH_PRESETS["smoke"]["model"], model_name="smoke", bits=(2,), samples=8, seq_len=64,
                  batch=4, epochs=1, r=8, finetune_steps=3, finetune_batch=4),
    "cpu": dict(model="demo", model_name="demo", bits=(2, 3), samples=128, seq_len=256, batch=8, epochs=20, r=64,
                finetune_steps=100, finetune_batch=16),
}
VARIANTS = {  # key: (label, calibrate() arguments)
    "apiq": ("ApiQ-style calibration", dict(saliency_reg=False)),
    "apiq_saliency": ("ApiQ + saliency regulariser", dict(saliency_reg=True)),
}


def calibration_windows(fp_dir, n: int, seq_len: int) -> torch.Tensor:
    """The windows demo_model.quantize gives GPTQ: n random seq_len-token blocks of the train split (seed 0)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(fp_dir)
    blocks = dm.token_blocks(tok, "train", seq_len, cache_dir=fp_dir)
    pick = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(dm.SEED))[:n]
    return blocks[pick]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def calibrated_checkpoint(dirs, bits: int, variant: str, cfg: dict, work: Path, calib: dict) -> Path:
    """Calibrate the full-precision model into a GPTQ checkpoint under work/ (cached across the fine-tuning rows)."""
    import peft_lota

    out = work / f"{variant}-{bits}bit"
    if (out / "config.json").exists():
        return out
    q = json.loads((Path(dirs[bits]) / "quant_log.json").read_text())
    windows = calibration_windows(dirs["fp"], cfg["samples"], cfg["seq_len"])
    model = ba.load_fp(dirs["fp"])
    reports = []
    t0, rss0 = time.time(), peak_rss_mib()
    merged = peft_lota.calibrate(model, list(windows.split(cfg["batch"])), bits=bits, group_size=q["group_size"],
                                 sym=q["sym"], r=cfg["r"], epochs=cfg["epochs"], on_block=reports.append,
                                 **VARIANTS[variant][1])
    calib[f"{variant}-{bits}"] = dict(seconds=round(time.time() - t0, 1), peak_rss_mib=round(peak_rss_mib(), 1),
                                      rss_before_mib=round(rss0, 1),
                                      blocks=[dict(index=r.index, mse_before=r.mse_before, mse_after=r.mse_after,
                                                   seconds=r.seconds) for r in reports])
    merged.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(dirs["fp"]) / name, out / name)
    return out


def finetune(method: str, quant_dir: Path, batches, blocks, cfg: dict) -> dict:
    """The accuracy benchmark's recovery run of `method` on this quantized model, merged, scored."""
    from peft import get_peft_model

    torch.manual_seed(0)
    base = ba.load_quant(quant_dir)
    config = ba.lota_config("lota", dict(rank=64, seed=0)) if method == "lota" else ba.l4q_config(dict(rank=64, seed=0))
    model = get_peft_model(base, config)
    lr = ba._LRS["recovery"]["lota" if method == "lota" else "l4q"]
    log = ba.train(model, method, batches, ba.recovery_loss, lr, f"{quant_dir.name} {method}")
    merged, info = ba.merged_exactly(model, batches[0][:2].to(ba.device()))
    return dict(ppl=round(dm.perplexity(merged, blocks), 3), lr=lr, **log, **info)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    ap.add_argument("--root", default="demo_out")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--bits", type=int, nargs="+", default=None)
    ap.add_argument("--no-finetune", action="store_true", help="only the calibration rows")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--note", default="")
    args = ap.parse_args(argv)
    ba.quiet()
    torch.compiler.set_stance("force_eager")
    cfg = dict(PRESETS[args.preset])
    if args.bits:
        cfg["bits"] = tuple(args.bits)
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 2) // 2))
    root = Path(args.root) / "smoke" if args.preset == "smoke" else Path(args.root)
    dirs = dm.build(cfg["model"], root, bits=cfg["bits"])
    work = root / cfg["model_name"] / "calibrated"
    work.mkdir(parents=True, exist_ok=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    batches, blocks = ba.recovery_data(dirs["fp"], cfg, cfg["finetune_steps"], cfg["finetune_batch"])
    record = dict(preset=args.preset, note=args.note, config={k: v for k, v in cfg.items() if k != "model"},
                  machine=machine_info(), results={}, calibration={})
    res, calib = record["results"], record["calibration"]
    stem = f"calibrate-{args.preset}"

    def save():
        (out_dir / f"{stem}.json").write_text(json.dumps(record, indent=1, default=str))

    res["fp"] = {"-": dict(ppl=round(dm.perplexity(ba.load_fp(dirs["fp"]), blocks), 3))}
    for bits in cfg["bits"]:
        rows = {"gptq": Path(dirs[bits])}
        for variant in VARIANTS:
            rows[variant] = calibrated_checkpoint(dirs, bits, variant, cfg, work, calib)
            save()
        for key, path in rows.items():
            entry = res.setdefault(key, {}).setdefault(str(bits), {})
            entry["ppl"] = round(dm.perplexity(ba.load_quant(path), blocks), 3)
            if not args.no_finetune:
                for method in ("lota", "l4q"):
                    entry[method] = finetune(method, path, batches, blocks, cfg)
                    save()
            print(f"{bits}-bit {key}: {entry}", flush=True)
            save()
    record["machine"]["wall_s"] = round(time.time() - t_start, 1)
    save()
    text = format_report(record, cfg)
    (out_dir / f"{stem}.md").write_text(text)
    print(text)


def format_report(record: dict, cfg: dict) -> str:
    res, calib, m = record["results"], record["calibration"], record["machine"]
    fp = res["fp"]["-"]["ppl"]
    lines = [f"# Calibration benchmark, preset `{record['preset']}`", "",
             f"{m['date']} on {m['cpu']} ({m['cores']} cores); torch {m['torch']}; commit {m['git_commit']}. "
             f"{record['note']}", "",
             f"Held-out perplexity (lower is better); full precision {fp:.2f}. Gap closed = share of GPTQ's gap to full "
             "precision that the row removes.", "",
             "| model | " + " | ".join(f"{b}-bit | gap closed | + LoTA | + L4Q" for b in cfg["bits"]) + " |",
             "|---|" + "---|---|---|---|" * len(cfg["bits"])]
    labels = {"gptq": "GPTQ (gptqmodel)", **{k: v[0] for k, v in VARIANTS.items()}}
    for key, label in labels.items():
        cells = []
        for b in cfg["bits"]:
            e = res.get(key, {}).get(str(b), {})
            g = res.get("gptq", {}).get(str(b), {}).get("ppl")
            closed = "-" if key == "gptq" or not e or g is None else f"{100 * (g - e['ppl']) / (g - fp):.0f}%"
            cells += [f"{e.get('ppl', '-')}", closed, f"{e.get('lota', {}).get('ppl', '-')}",
                      f"{e.get('l4q', {}).get('ppl', '-')}"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "| calibration | seconds | peak RSS (MiB) | output MSE per block, before -> after |", "|---|---|---|---|"]
    for key, c in calib.items():
        mse = "; ".join(f"{b['mse_before']:.3g} -> {b['mse_after']:.3g}" for b in c["blocks"])
        lines.append(f"| {key} | {c['seconds']} | {c['peak_rss_mib']} | {mse} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
