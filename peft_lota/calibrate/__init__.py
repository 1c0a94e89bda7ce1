"""Block-wise activation-preserving calibration of a full-precision model into a GPTQ model (ApiQ + saliency)."""

from .apiq import STAGES, BlockReport, calibrate, decoder_layers, saliency

__all__ = ["STAGES", "BlockReport", "calibrate", "decoder_layers", "saliency"]
