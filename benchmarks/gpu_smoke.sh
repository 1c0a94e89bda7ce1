#!/usr/bin/env bash
# The GPU smoke check, on a lent GPU machine, from the repository root, with build/gpu-wheels carried along (made here
# by `python benchmarks/gpu_smoke.py --fetch-wheels build/gpu-wheels`): installs those wheels without touching the
# image's torch, then runs benchmarks/gpu_smoke.py from the working tree (PYTHONPATH: nothing of peft_lota installed).
# Under 10 minutes on one H100: e.g. run(command="bash benchmarks/gpu_smoke.sh", carry=["build/gpu-wheels"],
# timeout_s=600); the table comes back in $OUT/gpu_smoke.json.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --no-deps --no-index build/gpu-wheels/*.whl
python -c "import torch, transformers, peft, compressed_tensors, gguf; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'peft', peft.__version__)"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TORCHDYNAMO_DISABLE=1 python benchmarks/gpu_smoke.py "$@"
