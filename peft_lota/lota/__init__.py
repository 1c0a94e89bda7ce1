"""LoTA-QAF (arXiv 2505.18724): ternary adapters whose thresholded product moves integer codes by -1/0/+1.

config.py (LotaConfig), ternary.py (the maths, pure functions), layer.py (the tuner layer),
model.py (the PEFT tuner), optim.py (t-SignSGD and its Trainer callback).
"""
