"""Uploading a merged checkpoint to the Hugging Face Hub."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

from torch import nn

from .checkpoint import save_checkpoint

# Weight files of an earlier upload that a push removes from the repo (so that no stale shard shadows the new one).
WEIGHT_PATTERNS = ("model*.safetensors", "model*.safetensors.index.json", "pytorch_model*.bin",
                   "pytorch_model*.bin.index.json")


def push_checkpoint_to_hub(model: nn.Module, repo_id: str, *, card_info: Optional[dict] = None,
                           private: Optional[bool] = None, token=None, commit_message: Optional[str] = None,
                           commit_description: Optional[str] = None, revision: Optional[str] = None,
                           create_pr: bool = False, max_shard_size: int | str = "50GB", **save_kwargs):
    """Save through save_checkpoint into a temporary folder and upload it to the Hub repo `repo_id`.

    The model card (when `card_info` is given) replaces the repo's README.md. Weight files of an earlier
    upload that this one does not contain are deleted from the repo, so that no stale shard or index
    shadows the new checkpoint. Returns the commit info of `HfApi.upload_folder`.
    """
    from huggingface_hub import HfApi

    with tempfile.TemporaryDirectory() as tmp:
        folder = save_checkpoint(model, Path(tmp) / "checkpoint", card_info=card_info,
                                 max_shard_size=max_shard_size, **save_kwargs)
        return _upload(HfApi(token=token), folder, repo_id, private=private,
                       commit_message=commit_message or _default_commit_message(card_info),
                       commit_description=commit_description, revision=revision, create_pr=create_pr)


def _default_commit_message(card_info: Optional[dict]) -> str:
    method = (card_info or {}).get("method")
    return f"Upload quantized model fine-tuned with {method} (peft_lota)" if method else "Upload quantized model (peft_lota)"


def _upload(api, folder: Path, repo_id: str, *, private, commit_message, commit_description, revision, create_pr,
            allow_patterns=None):
    repo_id = api.create_repo(repo_id, exist_ok=True, private=private).repo_id
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                             commit_description=commit_description, revision=revision, create_pr=create_pr,
                             allow_patterns=allow_patterns, delete_patterns=list(WEIGHT_PATTERNS))
