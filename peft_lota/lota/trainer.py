"""`LotaTrainer`: a Trainer that builds t-SignSGD itself. Its own module, so that `import peft_lota` does not import
transformers' Trainer (about 90 MB and a second of start-up that the command line and the streaming merge never use).
"""

from __future__ import annotations

from transformers import Trainer

from .optim import LotaCallback, create_lota_optimizer

__all__ = ["LotaTrainer"]


class LotaTrainer(Trainer):
    """A stock `transformers.Trainer` that trains LoTA's ternary tensors with t-SignSGD: it builds the optimizer with
    `create_lota_optimizer(model, **lota_kwargs)` where the Trainer builds its own, and adds `LotaCallback`.

    `Trainer(optimizers=(create_lota_optimizer(model), None), callbacks=[LotaCallback()])` does the same, except under
    FSDP, where transformers refuses an optimizer passed in: it must be built on the parameters it shards.
    """

    def __init__(self, *args, lota_kwargs: dict | None = None, **kwargs):
        self.lota_kwargs = dict(lota_kwargs or {})
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if not any(isinstance(c, LotaCallback) for c in callbacks):
            callbacks.append(LotaCallback())
        super().__init__(*args, callbacks=callbacks, **kwargs)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self.optimizer = create_lota_optimizer(model if model is not None else self.model, **self.lota_kwargs)
        return self.optimizer
