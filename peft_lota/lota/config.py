"""LotaConfig: the PEFT configuration of a LoTA-QAF adapter."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig

from ..peft_types import LOTA_PEFT_TYPE
from ..tuner import BASE_LAYERS_HELP, check_common_config
from .ternary import OFFSET_MODES

TRAIN_MODES = ("latent", "ternary")


@dataclass
class LotaConfig(PeftConfig):
    """Configuration of a LoTA-QAF adapter (arXiv 2505.18724: ternary adaptation of a quantized model's integer codes).

    Each targeted quantized layer (any format of formats/) gets ternary `A` [in, r] and `B` [r, out]; where the integer product
    `A @ B` passes the threshold `omega`, the layer's integer code moves by one step on its
    quantization grid. There is no `lora_alpha`: a step is always exactly one quantization step.
    """

    r: int = field(default=64, metadata={"help": "Rank of the ternary factors A [in, r] and B [r, out]."})
    omega: Optional[int] = field(
        default=None,
        metadata={
            "help": "Integer threshold on the product A @ B, strictly between 0 and r. A code moves by +1 (-1) "
            "where the product is above omega (below -omega). Defaults to round(0.75 * r); larger is more "
            "conservative (the paper used 0.875 * r on one task and found larger omega helped at 2 bits)."
        },
    )
    offset: str = field(
        default="none",
        metadata={
            "help": "Offset factor mode. 'none': integer grid only, merges exactly. 'float': the paper's "
            "fractional offset mu (one float per group and output column); cannot be merged exactly into "
            "a quantized checkpoint. 'integer': mu rounded to an integer zero-point shift in the forward pass "
            "(straight-through gradient), so the trained model is exactly what a quantized checkpoint holds (formats without zero points, "
            "compressed-tensors and LLM.int8, take 'none' only)."
        },
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Names of the quantized layers to adapt: a list of name suffixes (e.g. ['q_proj', 'v_proj']), a "
            "regex matched against the full module name, or 'all-linear' for every quantized linear layer "
            "except the output head. Defaults to all-linear."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Names (list of suffixes) or a regex of modules to leave alone."},
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None,
        metadata={"help": "Indices of the decoder layers to adapt; others are left alone."},
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Name of the decoder-layer list (e.g. 'layers'), used with layers_to_transform."},
    )
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": "Modules other than LoTA layers to train in full precision and save with the adapter "
            "(e.g. an unquantized classification head). They are not part of the integer merge."
        },
    )
    train_mode: str = field(
        default="latent",
        metadata={
            "help": "How A and B are trained. 'latent': real-valued A and B that any optimizer trains (the AdamW a "
            "Trainer builds, TRL, ...); the forward uses their ternary values (+1 above latent_threshold, -1 below "
            "-latent_threshold, else 0) with a straight-through gradient, so what is merged is exactly what was "
            "trained. 'ternary': the paper's algorithm: A and B hold {-1, 0, 1} and only t-SignSGD may update them "
            "(optimizers=(peft_lota.create_lota_optimizer(model), None), callbacks=[peft_lota.LotaCallback()])."
        },
    )
    latent_threshold: float = field(
        default=1e-3,
        metadata={
            "help": "train_mode='latent': the latent value at which an entry of A or B becomes +-1. A fresh B is 0 "
            "and A's entries sit at +-2 latent_threshold. AdamW moves every entry by about the learning rate per step "
            "(its first step by exactly that, whatever the gradient), so an entry flips after about "
            "latent_threshold / learning_rate steps of a consistently signed gradient: at the default and the "
            "recommended rate 1e-4, ten. A threshold near the rate flips nearly every entry of B within the first steps: "
            "the codes then move in rank-one blocks larger than the weights themselves, and the model breaks "
            "(1e-4 was the default until this was measured)."
        },
    )
    save_latents: bool = field(
        default=True,
        metadata={
            "help": "train_mode='latent': also save the latent values of A and B (fp32, the size of an fp32 LoRA of "
            "rank r) beside their 2-bit ternary values, so that training resumes exactly from a saved adapter or "
            "Trainer checkpoint (and the trained scale multipliers, fp32). False: the file holds what the forward "
            "and the merge use: the ternary values (2 bits per entry, 1/8 of an fp16 LoRA of the same rank) and the "
            "trained scales as each stored scale's change in units in the last place (one byte per group and output "
            "column where the changes fit), which load as the same model; a run resumed from it restarts every entry "
            "at its level's middle. Set it for the adapter you ship, not for checkpoints you resume."
        },
    )
    max_step: int = field(
        default=1,
        metadata={
            "help": "Largest code change, in quantization steps. 1 is the paper's ternary step. k > 1 lets a code "
            "move by up to k steps: by i where |A @ B| passes i * omega (stopping at the grid's edge)."
        },
    )
    train_scales: Optional[bool] = field(
        default=None,
        metadata={
            "help": "Also train the adapted layers' quantization scales (one multiplier per group and output "
            "column), and where the grid stores a float offset per group (GGUF's Q4_1 / Q5_1 `m`) that offset too. The "
            "forward uses them rounded to the checkpoint's dtype (fp16), so the merge writes exactly the values "
            "that were trained. Default: True with train_mode='latent', False with 'ternary' "
            "(the paper trains A and B only; if set, create_lota_optimizer's AdamW trains them)."
        },
    )
    base_layers: Optional[dict] = field(default=None, metadata={"help": BASE_LAYERS_HELP})
    init_seed: Optional[int] = field(
        default=None,
        metadata={"help": "Seed for the ternary initialisation of A (None: use torch's global generator)."},
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = LOTA_PEFT_TYPE
        check_common_config(self, "LotaConfig")
        if self.omega is None:
            self.omega = int(round(0.75 * self.r))
        if self.r < 2:
            raise ValueError(
                "LotaConfig: r must be at least 2 so that an integer omega with 0 < omega < r exists; "
                f"got r={self.r}. The paper uses r=64."
            )
        if isinstance(self.omega, bool) or not isinstance(self.omega, int) or not 0 < self.omega < self.r:
            raise ValueError(
                f"LotaConfig: omega must be an integer strictly between 0 and r={self.r}, got omega={self.omega!r}. "
                f"The default is round(0.75 * r) = {int(round(0.75 * self.r))}."
            )
        if self.offset not in OFFSET_MODES:
            raise ValueError(
                f"LotaConfig: unknown offset mode {self.offset!r}; choose one of {', '.join(map(repr, OFFSET_MODES))}."
            )
        if self.train_mode not in TRAIN_MODES:
            raise ValueError(f"LotaConfig: unknown train_mode {self.train_mode!r}; choose one of "
                             f"{', '.join(map(repr, TRAIN_MODES))}.")
        if not isinstance(self.save_latents, bool):
            raise ValueError(f"LotaConfig: save_latents must be True or False, got {self.save_latents!r}.")
        if isinstance(self.latent_threshold, bool) or not isinstance(self.latent_threshold, (int, float)) \
                or not self.latent_threshold > 0:
            raise ValueError(f"LotaConfig: latent_threshold must be a positive number, got {self.latent_threshold!r}.")
        if isinstance(self.max_step, bool) or not isinstance(self.max_step, int) or self.max_step < 1:
            raise ValueError(f"LotaConfig: max_step must be a positive integer (1 is the paper's ternary step), got "
                             f"{self.max_step!r}.")
        if self.max_step * self.omega >= self.r and self.max_step > 1:
            raise ValueError(f"LotaConfig: with max_step={self.max_step} and omega={self.omega}, |A @ B| <= r={self.r} "
                             f"can never pass {self.max_step} * omega; lower max_step or omega.")
        if self.train_scales is None:
            self.train_scales = self.train_mode == "latent"
        if not isinstance(self.train_scales, bool):
            raise ValueError(f"LotaConfig: train_scales must be True or False, got {self.train_scales!r}.")

    @staticmethod
    def describe_settings(config: dict) -> list[tuple[str, object]]:
        """(key, value) rows of a saved LotaConfig (adapter_config.json), for the command line's inspect."""
        return [("omega", config.get("omega")), ("offset", config.get("offset")),
                ("train mode", config.get("train_mode")), ("max step", config.get("max_step")),
                ("trained scales", config.get("train_scales"))]

    def layer_settings(self):
        """What each LoTA layer needs of this config."""
        from .layer import AdapterSettings

        return AdapterSettings(r=self.r, omega=self.omega, offset=self.offset, max_step=self.max_step,
                               train_mode=self.train_mode, latent_threshold=float(self.latent_threshold),
                               train_scales=self.train_scales)
