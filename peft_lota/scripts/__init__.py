"""The programs behind `peft-lota finetune` and `peft-lota calibrate` (also runnable as examples/*.py)."""
