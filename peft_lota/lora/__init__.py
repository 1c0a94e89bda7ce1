"""A PEFT LoRA trained on a quantized model, merged into that model's own grid and format (`merge_lora`)."""

from .merge import MergeReport, merge_lora

__all__ = ["MergeReport", "merge_lora"]
