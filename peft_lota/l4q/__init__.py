"""L4Q (arXiv 2402.04902): a LoRA trained through a learnable quantizer, merged into an exact quantized checkpoint.

config.py (L4QConfig), quantizer.py (the maths, pure functions), layer.py (the tuner layer),
model.py (the PEFT tuner), from_lora.py (an L4Q model that starts from a trained LoRA).
"""
