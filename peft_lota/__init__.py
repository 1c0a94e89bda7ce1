"""peft_lota: fine-tune quantized LLMs with PEFT and ship the result as a standard quantized checkpoint.

`import peft_lota` registers its PEFT methods; then `peft.get_peft_model(quantized_model, config)`
injects adapters and `merge_and_unload()` merges them into the integer codes with no loss.

- LoTA-QAF (`LotaConfig`): ternary adapters that move each integer code by -1, 0 or +1;
- L4Q (`L4QConfig`): a LoRA trained through a learnable quantizer, from a quantized or a full-precision model;
- `calibrate`: block-wise activation-preserving calibration (ApiQ, optional saliency regulariser) of a
  full-precision model into a GPTQ model;
- `merge_lora`: a PEFT LoRA trained on a quantized model, merged into the base's own grid with GPTQ's error
  feedback (and optionally refit scales): a standard checkpoint in the base's format.

Layout (docs/architecture.md): pure numerics (`numerics.py`, `feedback.py`), `formats/` (how each quantized format
stores codes), the method-agnostic tuner and layer (`tuner.py`, `tuner_layer.py`), one folder per method (`lota/`,
`l4q/`, `lora/`, `calibrate/`), `registry.py`, and `export/`, `verify.py` and `cli.py` on top.
"""

from .version import __version__  # noqa: E402,F401  (peft_lota.__version__)

from .formats.gguf import load_gguf, write_gguf  # noqa: E402
from .loading import load_model, quiet_third_party  # noqa: E402

quiet_third_party()  # before torch, peft and gptqmodel are imported: their start-up notices are dropped

from .peft_types import L4Q_PEFT_TYPE, LOTA_PEFT_TYPE  # noqa: E402  (extends PeftType before any config is made)
from .formats.gptq import prepare_gptq_model  # noqa: E402
from .lota.config import LotaConfig  # noqa: E402
from .lota.layer import FloatOffsetMergeError, LotaLayer  # noqa: E402
from .lota.model import LotaModel  # noqa: E402
from .lota.optim import LotaCallback, LotaOptimizer, TSignSGD, create_lota_optimizer  # noqa: E402
from .l4q.config import L4QConfig  # noqa: E402
from .l4q.from_lora import l4q_from_lora  # noqa: E402
from .l4q.layer import L4QLayer  # noqa: E402
from .l4q.model import L4QModel  # noqa: E402
from .calibrate import calibrate  # noqa: E402
from .lora import MergeReport, merge_lora  # noqa: E402
from .tuner import NonFiniteCallback, NonFiniteError  # noqa: E402
from .export import attach_export, push_checkpoint_to_hub, save_checkpoint  # noqa: E402
from .registry import register  # noqa: E402

register()


def __getattr__(name: str):
    if name == "LotaTrainer":  # imported on first use: it brings in transformers' Trainer
        from .lota.trainer import LotaTrainer

        return LotaTrainer
    raise AttributeError(f"module 'peft_lota' has no attribute {name!r}")

__all__ = [
    "L4QConfig",
    "L4QLayer",
    "L4QModel",
    "L4Q_PEFT_TYPE",
    "LOTA_PEFT_TYPE",
    "FloatOffsetMergeError",
    "LotaCallback",
    "LotaTrainer",
    "LotaConfig",
    "LotaLayer",
    "LotaModel",
    "MergeReport",
    "LotaOptimizer",
    "NonFiniteCallback",
    "NonFiniteError",
    "TSignSGD",
    "attach_export",
    "calibrate",
    "create_lota_optimizer",
    "l4q_from_lora",
    "load_gguf",
    "load_model",
    "merge_lora",
    "prepare_gptq_model",
    "push_checkpoint_to_hub",
    "save_checkpoint",
    "write_gguf",
]
