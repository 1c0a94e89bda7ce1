"""peft_lota: LoTA-QAF for Hugging Face PEFT.

`import peft_lota` registers the PEFT method "LOTA"; then
`peft.get_peft_model(gptq_model, peft_lota.LotaConfig(...))` injects ternary adapters into a
GPTQ-quantized model, and `merge_and_unload()` merges them into the integer codes with no loss.
"""

__version__ = "0.1.0"

from .registry import LOTA_PEFT_TYPE, register  # noqa: E402  (extends PeftType before the config is defined)
from .config import LotaConfig  # noqa: E402
from .layer import FloatOffsetMergeError, LotaLayer  # noqa: E402
from .gptq import GPTQLotaLinear, prepare_gptq_model  # noqa: E402
from .model import LotaModel  # noqa: E402
from .optim import LotaCallback, LotaOptimizer, TSignSGD, create_lota_optimizer  # noqa: E402
from .export import push_gptq_checkpoint_to_hub, save_gptq_checkpoint  # noqa: E402

register()

__all__ = [
    "LOTA_PEFT_TYPE",
    "FloatOffsetMergeError",
    "GPTQLotaLinear",
    "LotaConfig",
    "LotaCallback",
    "LotaLayer",
    "LotaModel",
    "LotaOptimizer",
    "TSignSGD",
    "create_lota_optimizer",
    "prepare_gptq_model",
    "push_gptq_checkpoint_to_hub",
    "save_gptq_checkpoint",
]
