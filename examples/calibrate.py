"""Calibrate a full-precision causal LM into a low-bit GPTQ checkpoint, block by block (ApiQ, optional saliency).

The same program as `peft-lota calibrate` (peft_lota/scripts/calibrate.py); `python examples/calibrate.py --help`.
"""

import sys

from peft_lota import cli
from peft_lota.scripts.calibrate import main  # noqa: F401  (importable, as before)

if __name__ == "__main__":  # exit 1 when a check fails, 2 on a usage mistake
    sys.exit(cli.main(["calibrate", *sys.argv[1:]]))
