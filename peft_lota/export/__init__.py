"""Writing a merged model as a standard quantized checkpoint, locally or to the Hugging Face Hub.

Format-agnostic: the model's format (formats/, chosen from its config) says what a standard
checkpoint of it holds (`Format.checkpoint`: state dict, quantization config, extra files); this
package writes that through transformers' own save_pretrained (sharding, safetensors, config and
generation config), atomically, with a model card, and uploads it.

Plain `save_pretrained` cannot be trusted with a merged GPTQ model (transformers 5.23): it writes the
in-memory zero points, which gptqmodel keeps as true zero points ("gptq_v2"), under whatever label the
checkpoint was loaded with, and it records the load-time kernel (e.g. backend "gptq_torch") for
everyone who loads it. `attach_export` replaces the merged model's `save_pretrained` / `push_to_hub`.

Saving never touches what it did not write: the checkpoint is staged inside the target folder and
moved in file by file (see the comment above `MANIFEST`).

Layout: `checkpoint.py` (what a format writes, through transformers' save_pretrained), `transaction.py` (the staged,
atomic commit into a folder: journal, manifest, lock, recover; no torch), `card.py` (the model card), `hub.py` (the upload), `attach.py` (the merged model's
save_pretrained / push_to_hub).
"""

from .card import CARD_MARKER, CARD_NAME, model_card
from .attach import attach_export
from .checkpoint import save_checkpoint
from .hub import WEIGHT_PATTERNS, push_checkpoint_to_hub
from .transaction import (INDEX, JOURNAL, MANIFEST, SINGLE, STAGING, UnsafeFolderError, check_target,
                          commit_checkpoint, recover)

__all__ = ["CARD_MARKER", "CARD_NAME", "INDEX", "JOURNAL", "MANIFEST", "SINGLE", "STAGING", "UnsafeFolderError",
           "WEIGHT_PATTERNS", "attach_export", "check_target", "commit_checkpoint", "model_card",
           "push_checkpoint_to_hub", "recover", "save_checkpoint"]
