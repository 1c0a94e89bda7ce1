"""What may be read and written where: names read from files, outputs apart from inputs, bounded text reading.

Pure path logic (no torch). Two rules every command follows:

- A name read from a file (a shard in `model.safetensors.index.json`, a tokenizer file) is a name, never a path: it
  must be a plain file name that stays in its folder (`plain_name`, `checked_shard_names`).
- An output folder is never an input folder, inside one, or around one, however either is spelled: folders are
  compared by device and inode (a symlink, `..`, or a bind mount of the input is still the input), `separate_output`.
"""

from __future__ import annotations

import codecs
import os
import stat
from pathlib import Path
from typing import Iterator, Optional


def plain_name(name) -> bool:
    """A file name that stays in its folder: a non-empty string with no separator, not '.' or '..', not absolute."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\x00" not in name and not os.path.isabs(name))


def checked_shard_names(weight_map, index: Path) -> dict:
    """The {tensor: shard} map of an index file, each shard a plain `*.safetensors` name (not hidden: a name like
    `.peft_lota-commit.json` is a save's own file). Raises ValueError naming the index and the bad entry."""
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: weight_map must map tensor names to shard files, got {type(weight_map).__name__}; "
                         "the file is damaged: copy the checkpoint again.")
    for tensor, shard in weight_map.items():
        if not (plain_name(shard) and shard.endswith(".safetensors") and not shard.startswith(".")):
            raise ValueError(f"{index} maps {tensor} to {shard!r}, which is not a shard file name inside the folder "
                             "(a plain name like model-00001-of-00002.safetensors): the index is damaged or was made "
                             "to point elsewhere; nothing was read or written. Copy the checkpoint again from its "
                             "source.")
    return dict(weight_map)


def check_index(folder) -> Optional[dict]:
    """The {tensor: shard} map of a local checkpoint folder's `model.safetensors.index.json` (None without one), each
    shard a plain file of the folder (checked_shard_names): transformers joins those names onto the folder as they
    are, so an index that names `../other/model.safetensors` would load another checkpoint's tensors into this one.
    Raises ValueError."""
    import json

    index = Path(folder) / "model.safetensors.index.json"
    if not Path(folder).is_dir() or not index.is_file():
        return None
    try:
        data = json.loads(index.read_text())
    except (ValueError, RecursionError) as err:
        raise ValueError(f"{index} is not valid JSON ({str(err)[:80] or 'nested too deeply'}): copy the checkpoint "
                         "again.") from None
    return checked_shard_names(data.get("weight_map") if isinstance(data, dict) else None, index)


def _identity(path: Path) -> Optional[tuple]:
    try:
        st = os.stat(path)  # follows links: a link to a folder is that folder
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _chain(path: Path) -> list:
    """(device, inode) of the path (or, while it does not exist yet, of the folder it would be created in) and of
    every folder above it, the first entry the path's own (None when it does not exist)."""
    real = Path(os.path.realpath(path))  # links resolved: its true ancestors
    own = _identity(real)
    ids = [own]
    for parent in real.parents:
        ident = _identity(parent)
        if ident is not None:
            ids.append(ident)
    return ids


def separate_output(out, inputs: dict, what: str = "output", may_contain: tuple = ()) -> None:
    """Refuse an output that is an existing file, or a folder that is an input, sits inside one, or holds one,
    compared by device and inode (so a
    symlink or a bind mount of the input is caught), before anything is loaded or written. `inputs`: {label: path};
    paths that do not exist locally (a Hub id) have nothing to protect and are skipped. The inputs labelled in
    `may_contain` may hold the output (an adapter folder with `merged/` inside: the layout `peft-lota finetune`
    writes; a save writes only into its own folder). Raises ValueError."""
    if Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"{what} {out} is an existing file: give a folder.")
    out_chain = _chain(Path(out))
    for label, path in inputs.items():
        if path is None or not os.path.exists(path):
            continue
        in_chain = _chain(Path(path))
        in_id = in_chain[0]
        if out_chain[0] is not None and out_chain[0] == in_id:
            how = "is"
        elif in_id in out_chain[1:] and label not in may_contain:
            how = "is inside"
        elif out_chain[0] is not None and out_chain[0] in in_chain[1:]:
            how = "holds"
        else:
            continue
        raise ValueError(f"{what} {out} {how} the {label} {path}: writing there could change the files it reads. "
                         f"Give the {what} a folder of its own, apart from every input.")


def own_file(folder: Path, name: str) -> Optional[Path]:
    """`folder / name` if it is a regular file of that folder's own: a link is followed only to a file inside the
    folder, or to the blob of a Hugging Face cache snapshot (snapshots/<rev>/x -> ../../blobs/<hash>). A link to
    anything else (say ~/.ssh/id_rsa, from a cloned repo) is not the checkpoint's file; None then, or when absent."""
    path = Path(folder) / name
    if not path.is_file():  # (follows links; a FIFO or device is no file)
        return None
    if not path.is_symlink():
        return path
    real, home = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
    allowed = [home] + ([home.parent.parent / "blobs"] if home.parent.name == "snapshots" else [])
    return path if any(real.is_relative_to(a) for a in allowed) else None


def copy_into(src: Path, folder: Path, name: str) -> None:
    """Copy a file into `folder` under `name` through a new file renamed over the name (a link there is replaced,
    never written through), with the source's permission bits (never readable by more people than the source)."""
    import uuid

    tmp = Path(folder) / f".{name}.{uuid.uuid4().hex}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, os.stat(src).st_mode & 0o666)  # O_EXCL: no link followed
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(Path(src).read_bytes())
        os.replace(tmp, Path(folder) / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---- text read in bounded pieces --------------------------------------------------------------------------------

PIECE = 1 << 20  # bytes read, decoded and tokenized at a time


def regular_text_file(path, flag: str) -> Path:
    """The path of a regular file (not a FIFO, a device or a folder: reading those can hang or never end)."""
    p = Path(path)
    try:
        mode = os.stat(p).st_mode
    except OSError as err:
        raise ValueError(f"{flag} {p}: {err.strerror or err}.") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a pipe, a device or a socket)"
        raise ValueError(f"{flag} {p} is {kind}: give a text file.")
    return p


def text_pieces(path, flag: str, max_bytes: int) -> Iterator[str]:
    """The UTF-8 text of a regular file in pieces of about PIECE bytes, each cut before a line end or a space (a
    word is never split between pieces unless a piece holds no separator at all; a file of one piece or less is one
    string, as read whole), line ends as "\\n" (universal newlines, as `read_text` gives), at most `max_bytes` read
    (a character the limit cuts is dropped). Refuses text that is not UTF-8 (NUL bytes: UTF-16 or binary data),
    naming the file."""
    p = regular_text_file(path, flag)
    decoder = codecs.getincrementaldecoder("utf-8")()
    carry, read = "", 0

    def chunk(f) -> bytes:
        nonlocal read
        raw = f.read(min(PIECE, max_bytes - read)) if read < max_bytes else b""
        if b"\x00" in raw:
            raise ValueError(f"{flag} {p} holds NUL bytes, so it is not UTF-8 text (UTF-16 text or binary data?): "
                             "convert it to UTF-8 (iconv -f UTF-16 -t UTF-8).")
        read += len(raw)
        return raw

    def lines(text: str) -> str:
        return text.replace("\r\n", "\n").replace("\r", "\n")

    with open(p, "rb") as f:
        raw = chunk(f)
        while raw:
            following = chunk(f)  # read ahead: the last piece is not cut
            at_end = not following and f.read(1) == b""  # the whole file read (not stopped by max_bytes)
            try:
                text = carry + decoder.decode(raw, final=at_end)
            except UnicodeDecodeError as err:
                raise ValueError(f"{flag} {p} is not UTF-8 text ({err.reason}, within the first {read:,} bytes); "
                                 "convert it to UTF-8.") from None
            if not following:
                carry = text
                break
            cut = max(text.rfind("\n"), text.rfind(" "))
            if cut > 0 and text[cut - 1] == "\r":  # keep "\r\n" together
                cut -= 1
            if cut <= 0:
                cut = len(text) if len(text) >= PIECE else 0  # no separator in a whole piece: cut anyway (bounded)
            carry = text[cut:]
            if cut:
                yield lines(text[:cut])
            raw = following
    if carry:
        yield lines(carry)


def read_token_ids(tokenizer, path, flag: str, want: int, max_bytes: int = 1 << 30) -> tuple[list, int, bool]:
    """Token ids of a UTF-8 text file, tokenized piece by piece and read only until `want` tokens are kept (memory
    bounded whatever the file's size). Returns (ids, bytes of text used, whether the whole file was read)."""
    ids: list = []
    read, stopped = 0, False
    for piece in text_pieces(path, flag, max_bytes):
        ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
        read += len(piece.encode("utf-8"))
        if len(ids) >= want:
            stopped = True
            break
    return ids, read, not stopped and os.stat(path).st_size <= max_bytes
