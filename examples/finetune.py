"""Fine-tune a quantized model with LoTA or L4Q through a stock `transformers.Trainer`, merge, save, verify.

The same program as `peft-lota finetune` (peft_lota/scripts/finetune.py); `python examples/finetune.py --help`.
"""

import sys

from peft_lota import cli
from peft_lota.scripts.finetune import main  # noqa: F401  (what examples/demo.py calls)

if __name__ == "__main__":  # exit 1 when a check fails, 2 on a usage mistake
    sys.exit(cli.main(["finetune", *sys.argv[1:]]))
