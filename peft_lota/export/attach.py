"""The merged model's own `save_pretrained` / `push_to_hub`, replaced on that one instance so that what users
already call writes a correct standard checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from torch import nn

from .card import CARD_MARKER, CARD_NAME
from .checkpoint import save_checkpoint
from .hub import _default_commit_message, _upload, push_checkpoint_to_hub
from .transaction import MANIFEST, _read_own_json


def attach_export(model: nn.Module, card_info: Optional[dict] = None) -> nn.Module:
    """Make `model.save_pretrained(dir)` and `model.push_to_hub(repo)` write correct standard checkpoints.

    Installs instance methods (the class is untouched) that go through save_checkpoint and
    push_checkpoint_to_hub with `card_info` for the model card. Returns `model`.

    Why a patch: the merged model is a stock transformers class that users save the way they always do (their
    scripts, Trainer callbacks, `push_to_hub`), and transformers has no hook through which a quantization format
    could write its own state dict and config; replacing this one instance's methods fixes what it writes without
    touching any other model.
    """

    def save_pretrained(save_directory, is_main_process: bool = True, state_dict=None, push_to_hub: bool = False,
                        max_shard_size: int | str = "50GB", variant: Optional[str] = None, token=None, *,
                        safe_serialization: bool = True, overwrite_readme: bool = False, **kwargs):
        if state_dict is not None:
            raise ValueError("This merged model writes its own quantized state dict; do not pass `state_dict`.")
        hub_kwargs = {k: kwargs.pop(k) for k in ("repo_id", "commit_message", "commit_description", "private",
                                                 "create_pr", "revision") if k in kwargs}
        folder = save_checkpoint(model, save_directory, card_info=card_info, max_shard_size=max_shard_size,
                                 overwrite_readme=overwrite_readme, is_main_process=is_main_process,
                                 variant=variant, safe_serialization=safe_serialization, **kwargs)
        if push_to_hub and is_main_process:  # as transformers does: upload what this save wrote
            from huggingface_hub import HfApi


            written = [n for n in (_read_own_json(folder / MANIFEST) or {}).get("files", [])
                       if n != CARD_NAME or CARD_MARKER in (folder / n).read_text(encoding="utf-8", errors="replace")]
            _upload(HfApi(token=token), folder, hub_kwargs.pop("repo_id", Path(save_directory).name),
                    private=hub_kwargs.get("private"),
                    commit_message=hub_kwargs.get("commit_message") or _default_commit_message(card_info),
                    commit_description=hub_kwargs.get("commit_description"), revision=hub_kwargs.get("revision"),
                    create_pr=hub_kwargs.get("create_pr", False), allow_patterns=written)

    def push_to_hub(repo_id: str, *, commit_message: Optional[str] = None, commit_description: Optional[str] = None,
                    private: Optional[bool] = None, token=None, revision: Optional[str] = None,
                    create_pr: bool = False, max_shard_size: int | str = "50GB", tags: Optional[list[str]] = None,
                    safe_serialization: bool = True, **kwargs):
        info = card_info if not tags or card_info is None else {**card_info, "tags": list(tags)}
        return push_checkpoint_to_hub(
            model, repo_id, card_info=info, private=private, token=token, commit_message=commit_message,
            commit_description=commit_description, revision=revision, create_pr=create_pr,
            max_shard_size=max_shard_size, safe_serialization=safe_serialization, **kwargs)

    model.save_pretrained = save_pretrained
    model.push_to_hub = push_to_hub
    return model
