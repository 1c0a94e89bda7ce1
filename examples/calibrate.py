"""Calibrate a full-precision causal LM into a low-bit GPTQ checkpoint, block by block (ApiQ, optional saliency).

The same program as `peft-lota calibrate` (peft_lota/scripts/calibrate.py); `python examples/calibrate.py --help`.
"""

from peft_lota.scripts.calibrate import main

if __name__ == "__main__":
    main()
