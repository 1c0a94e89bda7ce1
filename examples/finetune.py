"""Fine-tune a quantized model with LoTA or L4Q through a stock `transformers.Trainer`, merge, save, verify.

The same program as `peft-lota finetune` (peft_lota/scripts/finetune.py); `python examples/finetune.py --help`.
"""

from peft_lota.scripts.finetune import main

if __name__ == "__main__":
    main()
