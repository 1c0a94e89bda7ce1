"""The machine and code a benchmark ran on, stored with its results (shared by bench_accuracy and bench_speed)."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True).stdout.strip()


def machine_info() -> dict:
    """Date, CPU, cores, RAM, GPU, library versions, git commit (marked if peft_lota/ has uncommitted
    changes) and load average. Taken at the start of a run: other commits may land while it runs."""
    import gptqmodel
    import peft
    import torch
    import transformers

    import peft_lota

    cpu, ram = platform.processor(), None
    if Path("/proc/cpuinfo").exists():
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    if Path("/proc/meminfo").exists():
        ram = round(int(Path("/proc/meminfo").read_text().split()[1]) / 2**20, 1)
    try:
        commit = _git("rev-parse", "--short", "HEAD") or None
        if commit and _git("status", "--porcelain", "--", str(HERE.parent / "peft_lota")):
            commit += " (+ uncommitted changes in peft_lota/)"
    except OSError:
        commit = None
    return dict(date=datetime.datetime.now().isoformat(timespec="seconds"), cpu=cpu, cores=os.cpu_count(),
                ram_gib=ram, torch_threads=torch.get_num_threads(),
                gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
                peft=peft.__version__, gptqmodel=getattr(gptqmodel, "__version__", "?"), git_commit=commit,
                peft_lota=str(Path(peft_lota.__file__).parent),
                load_average=os.getloadavg() if hasattr(os, "getloadavg") else None)
