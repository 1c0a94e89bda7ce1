"""The accuracy targets of issues 9 (L4Q), 10 (LoTA's defaults) and 19 (merge_lora), judged on committed results.

    python benchmarks/accuracy_targets.py            # reads results/accuracy-cpu*.json, writes results/accuracy-targets.md

Every row of bench_accuracy.py's results files that holds the methods a target compares is judged (each base
model and adapter seed on its own), and the LoTA candidates are put through LoTA's targets too, so that the
choice of defaults can be read off one table. Nothing is re-run: this only reads the JSON files.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
BITS = ("4", "3", "2")


def load(path: Path) -> dict:
    d = json.loads(path.read_text())
    label = {"cpu": "demo model", "cpu-alt": "second model", "real": "SmolLM2-135M-Instruct"}.get(d["preset"], d["preset"])
    seed = d["config"].get("seed", 0)
    return dict(name=path.stem, label=f"{label}, seed {seed}", gap=d["gap"], results=d["results"],
                methods=d.get("methods", {}))


def value(run: dict, setting: str, method: str, bits: str):
    cell = run["results"].get(setting, {}).get(method, {}).get(bits)
    if cell is None:
        return None
    return cell.get("ppl") if setting == "recovery" else cell.get("em")


def baseline(runs: list[dict], run: dict, setting: str, method: str, bits: str):
    """A baseline's value from this run, else from the run of the same base model and seed 0 (the main run)."""
    v = value(run, setting, method, bits)
    if v is None:
        for other in runs:
            if other["label"].split(",")[0] == run["label"].split(",")[0] and other["label"].endswith("seed 0"):
                v = value(other, setting, method, bits)
                if v is not None:
                    break
    return v


def compare(pairs, show, passes) -> tuple[list[str], bool, bool]:
    """(cells, all passed, any measured) for (value, reference) pairs, one per bit width."""
    cells, ok = [], True
    for v, ref in pairs:
        if v is None or ref is None:
            cells.append("-")
            continue
        cells.append(show(v, ref))
        ok &= passes(v, ref)
    return cells, ok, any(c != "-" for c in cells)


def judge(runs: list[dict], method: str) -> list[tuple]:
    """(target, run, per-bit figures, status) rows for one method."""
    rows = []
    lota = method.startswith("lota")
    task_margin = 5.0 if lota else 2.0
    for run in runs:
        if method not in run["results"].get("task", {}) and method not in run["results"].get("recovery", {}):
            continue
        # task: within N points of GPTQ + LoRA (unmerged) at every bit width
        cells, ok, seen = compare([(value(run, "task", method, b), baseline(runs, run, "task", "lora", b)) for b in BITS],
                                  lambda v, ref: f"{v:.1f} vs {ref:.1f} ({v - ref:+.1f})",
                                  lambda v, ref: v >= ref - task_margin)
        if seen:
            rows.append((f"task within {task_margin:.0f} points of GPTQ + LoRA", run["label"], cells, ok))
        # recovery: better than LoRA re-quantized at every bit width
        cells, ok, seen = compare([(value(run, "recovery", method, b), baseline(runs, run, "recovery", "lora_requant", b))
                                   for b in BITS], lambda v, ref: f"{v:.2f} vs {ref:.2f}", lambda v, ref: v < ref)
        if seen:
            rows.append(("recovery better than LoRA re-quantized", run["label"], cells, ok))
        if lota:  # 2-bit recovery closes >= 35% of GPTQ's gap
            v = value(run, "recovery", method, "2")
            if v is not None:
                gptq, fp = run["gap"]["2"], run["gap"]["fp"]
                closed = (gptq - v) / (gptq - fp)
                rows.append(("2-bit recovery closes >= 35% of the gap", run["label"], ["", "", f"{closed:.0%}"],
                             closed >= 0.35))
    return rows


def lora_l4q_rows(runs: list[dict]) -> list[tuple]:
    rows = []
    for run in runs:
        for setting, better, digits in (("recovery", lambda a, b: a < b, 2), ("task", lambda a, b: a > b, 1)):
            cells, ok, seen = compare([(value(run, setting, "lora_l4q", b), value(run, setting, "lora_requant", b))
                                       for b in BITS], lambda v, ref, d=digits: f"{v:.{d}f} vs {ref:.{d}f}", better)
            if seen:
                rows.append((f"{setting}: l4q_from_lora better than re-quantizing the same LoRA", run["label"], cells,
                             ok))
    return rows


MERGE_ROUTES = ("lora_merge", "lora_merge_scales", "lora_merge_distill")
# issue 19: merge_lora within this much of the unmerged LoRA (recovery: perplexity ratio; task: points)
MERGE_WITHIN = {"recovery": {"4": 0.01, "3": 0.03}, "task": {"4": 1.0, "3": 3.0}}


def merge_lora_rows(runs: list[dict]) -> list[tuple]:
    """Issue 19's targets for each merge_lora route: better than re-quantizing the same LoRA in every cell, and
    within 1% perplexity / 1 point of the unmerged LoRA at 4 bits, 3% / 3 points at 3 bits."""
    rows = []
    for run in runs:
        for route in MERGE_ROUTES:
            for setting, digits in (("recovery", 2), ("task", 1)):
                better = (lambda a, b: a < b) if setting == "recovery" else (lambda a, b: a > b)
                cells, ok, seen = compare([(value(run, setting, route, b), value(run, setting, "lora_requant", b))
                                           for b in BITS], lambda v, ref, d=digits: f"{v:.{d}f} vs {ref:.{d}f}", better)
                if not seen:
                    continue
                rows.append((f"`{route}` {setting}: better than re-quantizing", run["label"], cells, ok))
                cells, ok = [], True
                for b in BITS:
                    v, ref, tol = value(run, setting, route, b), value(run, setting, "lora", b), MERGE_WITHIN[setting].get(b)
                    if v is None or ref is None:
                        cells.append("-")
                        continue
                    if setting == "recovery":
                        cells.append(f"{v:.2f} vs {ref:.2f} ({100 * (v / ref - 1):+.1f}%)")
                        ok &= tol is None or v <= ref * (1 + tol)
                    else:
                        cells.append(f"{v:.1f} vs {ref:.1f} ({v - ref:+.1f})")
                        ok &= tol is None or v >= ref - tol
                rows.append((f"`{route}` {setting}: within 1% / 1 pt (4-bit), 3% / 3 pt (3-bit) of unmerged LoRA",
                             run["label"], cells, ok))
    return rows


def label(method: str) -> str:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_accuracy import METHODS  # the rows' labels (imports torch: a few seconds)

    return METHODS.get(method, (method,))[0]


def table(title: str, rows: list[tuple]) -> list[str]:
    out = [f"### {title}", "", "| target | base model | 4-bit | 3-bit | 2-bit | status |", "|---|---|---|---|---|---|"]
    out += [f"| {t} | {r} | {' | '.join(c)} | {'PASS' if ok else 'MISS'} |" for t, r, c, ok in rows]
    return out + [""]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--files", nargs="+", default=["accuracy-cpu", "accuracy-cpu-seed1", "accuracy-cpu-alt",
                                                    "accuracy-cpu-candidates", "accuracy-cpu-alt-candidates",
                                                    "accuracy-cpu-merge", "accuracy-real-merge"])
    args = ap.parse_args(argv)
    runs = [load(Path(args.results) / f"{f}.json") for f in args.files if (Path(args.results) / f"{f}.json").exists()]
    methods = dict.fromkeys(m for run in runs for s in run["results"].values() for m in s)
    lines = ["# Accuracy targets (issues 9, 10 and 19)", "",
             "Read from " + ", ".join(f"`results/{r['name']}.json` ({r['label']})" for r in runs) + ". Task: exact "
             "match %, method vs GPTQ + LoRA (unmerged); recovery: held-out perplexity, method vs LoRA merged by "
             "re-quantizing. A baseline missing from a seed-1 file is taken from the seed-0 run of the same model.",
             ""]
    lines += table("LoTA, defaults (`LotaConfig()`, AdamW)", judge(runs, "lota"))
    for m in methods:
        if m.startswith("lota") and m != "lota":
            lines += table(f"{label(m)} (`{m}`)", judge(runs, m))
    lines += table("L4Q from the GPTQ model (`l4q`)", judge(runs, "l4q"))
    lines += table("L4Q from full precision (`l4q_fp`, for reference: same targets)", judge(runs, "l4q_fp"))
    lines += table("LoRA -> l4q_from_lora", lora_l4q_rows(runs))
    lines += table("LoRA -> merge_lora (issue 19; 2-bit cells shown, no target there)", merge_lora_rows(runs))
    text = "\n".join(lines) + "\n"
    (Path(args.results) / "accuracy-targets.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
