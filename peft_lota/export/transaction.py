"""Committing a staged checkpoint into its folder, file by file: atomic, never touching what it did not write.

No torch here: a writer fills a staging folder (`commit_checkpoint(folder, write)`), and this module moves it in.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Optional

from ..paths import plain_name as _plain_name
from .card import CARD_MARKER, CARD_NAME

logger = logging.getLogger("peft_lota.export")


# ---- committing a staged checkpoint into the target folder, file by file ----------------------------
#
# A save stages the complete checkpoint in a hidden folder inside the target (same filesystem, so renames
# are atomic; nothing outside the target is touched: mount points, read-only parents and '.' all work),
# fsyncs it, records the plan in a journal, then moves the files in one by one: new shards under names of
# their own first (invisible until an index points at them), the other files, then the switch (the single
# weight file, or the index), config.json and quantize_config.json last. Until the switch, the folder loads
# as the old checkpoint; after the configs, as the new one. A config that changes is moved aside just before
# the switch, so that no step can load old weights under a new config (or the reverse): a crash between
# those few renames leaves a folder that refuses to load (no config) plus the journal, and the next save
# into the folder (or `recover(folder)`) completes it. Only files this save writes, and files the previous
# peft_lota save wrote (its manifest: a weight file or config, the very file it recorded), are replaced or
# removed; a replaced file keeps its permissions, and the folder's mode is left alone. Every name a journal or a
# manifest gives is checked to be a plain file name in the folder before it is used (a folder can arrive from the
# Hub with any such file in it). A save holds a lock on the folder throughout: a concurrent save waits.

MANIFEST = ".peft_lota-checkpoint.json"  # the files our last save wrote here, with what identifies them
JOURNAL = ".peft_lota-commit.json"  # a commit in progress: replayed by recover()
STAGING = ".peft_lota-staging-"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
CONFIGS = ("config.json", "quantize_config.json")  # what loaders read first: they switch with the weights
# The names of the weights, index and configs a save writes: the only ones it may ever remove as stale, whatever a
# manifest or journal in the folder says.
_REMOVABLE = re.compile(r"model(-\d+-of-\d+)?(\.[0-9a-z_]+)?\.safetensors|model\.safetensors\.index\.json"
                        r"|config\.json|quantize_config\.json|generation_config\.json")
_TAGGED_SHARD = re.compile(r"model-\d+-of-\d+\.[0-9a-z_]{8}\.safetensors")  # only _unique_shards makes these names


class UnsafeFolderError(ValueError):
    """The target folder holds a peft_lota journal that peft_lota did not write: nothing is changed."""


def _commit_step(label: str) -> None:
    """Called before every change a commit makes to the target folder (tests inject crashes here)."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for f in folder.iterdir():
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)  # (read-only: a staged copy of a read-only file keeps its mode)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(folder)


def _regular(path: Path) -> bool:
    """A regular file, not a link (nor a FIFO or device, which reading could hang on or exhaust memory with)."""
    return not path.is_symlink() and path.is_file()


def _read_own_json(path: Path):
    """A JSON file of ours, or None. A symlink is never followed (it may point anywhere)."""
    if not _regular(path):
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data) -> None:
    """Write through a temporary file and a rename: a symlink at `path` is replaced, never written through."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def _identity(path: Path) -> list:
    """[size, mtime_ns, inode]: what tells the file a save wrote from any other file given the same name later (a
    manifest that arrived with a downloaded folder cannot know them)."""
    st = path.stat(follow_symlinks=False)
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _manifest(target: Path) -> dict:
    """{name: identity} of the files the previous peft_lota save wrote here ({} when none, or when the manifest is
    not one peft_lota wrote: such a manifest is ignored, so it can never make a save remove anything)."""
    data = _read_own_json(target / MANIFEST)
    if data is None:
        if (target / MANIFEST).is_symlink():
            logger.warning("peft_lota: %s is a symbolic link; ignored (and replaced by this save).", target / MANIFEST)
        return {}
    files, ids = (data.get("files"), data.get("identity")) if isinstance(data, dict) else (None, None)
    if not isinstance(files, list) or not all(_plain_name(n) for n in files):
        logger.warning("peft_lota: %s was not written by peft_lota (it names paths outside the folder); it is "
                       "ignored: no file it lists is removed.", target / MANIFEST)
        return {}
    ids = ids if isinstance(ids, dict) else {}  # an earlier version's manifest: no identities, so nothing is "ours"
    return {n: ids.get(n) for n in files}


def _ours(target: Path, name: str, previous: dict) -> bool:
    """Whether `name` in the target is the file the previous peft_lota save wrote (so this save may replace or
    remove it): named in its manifest, one of the names a save writes, not a link, and the very file (same size,
    modification time and inode) that save recorded."""
    path = target / name
    return (name in previous and _REMOVABLE.fullmatch(name) is not None and _regular(path)
            and _identity(path) == previous[name])


def _old_shards(target: Path) -> set:
    """The shards the folder's current index points at that only a peft_lota save names so (model-...-of-....TAG.
    safetensors): the checkpoint a new save replaces, also when the folder was copied or saved by an earlier
    version (its manifest then cannot identify them)."""
    index = _read_own_json(target / INDEX)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        return set()
    return {n for n in weight_map.values() if isinstance(n, str) and _plain_name(n) and _TAGGED_SHARD.fullmatch(n)
            and _regular(target / n)}


def _unique_shards(staged: Path, tag: str) -> None:
    """Give a sharded checkpoint's shards names no earlier save used, and point the index at them."""
    index = _read_own_json(staged / INDEX)
    if index is None:
        return
    names = sorted(set(index["weight_map"].values()))
    renamed = {n: n.replace(".safetensors", f".{tag}.safetensors") for n in names}
    for old, new in renamed.items():
        os.rename(staged / old, staged / new)
    index["weight_map"] = {k: renamed[v] for k, v in index["weight_map"].items()}
    (staged / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _plan(staged: Path, target: Path) -> dict:
    """What the commit will do, in order; refuses, before anything changes, a user's file that would shadow it."""
    new = sorted(f.name for f in staged.iterdir())
    previous = _manifest(target)
    sharded = INDEX in new
    if sharded and (target / SINGLE).exists() and not _ours(target, SINGLE, previous):
        raise FileExistsError(
            f"{target / SINGLE} was not written by peft_lota and would be loaded instead of the new sharded "
            f"checkpoint (transformers prefers a single {SINGLE}). Remove or rename it, save elsewhere, or raise "
            "max_shard_size so that the checkpoint fits in one file.")
    replaced = [n for n in new if n != CARD_NAME and (target / n).exists() and not _ours(target, n, previous)]
    if replaced:
        logger.warning("peft_lota: replacing %s in %s, which peft_lota did not write (as save_pretrained does).",
                       ", ".join(replaced), target)
    switch = INDEX if sharded else SINGLE
    configs = [n for n in CONFIGS if n in new]
    aside = [n for n in configs if os.path.lexists(target / n)
             and not (_regular(target / n) and (target / n).read_bytes() == (staged / n).read_bytes())]
    first = [n for n in new if n not in (switch, *configs)]
    stale = {n for n in previous if n not in (SINGLE, CARD_NAME) and _REMOVABLE.fullmatch(n) and _ours(target, n, previous)}
    stale = sorted((stale | _old_shards(target)) - set(new))
    drop_single = sharded and _ours(target, SINGLE, previous)
    # What a replay after a crash may remove is pinned to the very files seen now, and the staging folder to itself:
    # a journal that arrives with a folder (with a staging folder of its own) matches neither, and is refused.
    return {"staged": staged.name, "staged_id": _folder_id(staged), "moves": first, "switch": switch,
            "configs": configs, "aside": aside, "drop_single": drop_single, "stale": stale, "files": new,
            "remove_ids": {n: _identity(target / n) for n in stale + ([SINGLE] if drop_single else [])}}


def _folder_id(path: Path) -> list:
    st = path.stat(follow_symlinks=False)
    return [st.st_dev, st.st_ino]


def _valid_plan(plan, target: Path) -> bool:
    """A journal is replayed only if it is the one a save of ours wrote here: plain names, its staging folder the
    very folder that save made (device and inode), holding nothing but regular files, and every file it removes
    one a save writes and the very file that save saw (checked as each is removed)."""
    if not isinstance(plan, dict):
        return False
    lists = [plan.get(k) for k in ("moves", "configs", "aside", "stale", "files")]
    if not (isinstance(plan.get("staged"), str) and _plain_name(plan["staged"]) and plan["staged"].startswith(STAGING)
            and plan.get("switch") in (SINGLE, INDEX) and isinstance(plan.get("drop_single"), bool)
            and all(isinstance(v, list) and all(_plain_name(n) for n in v) for v in lists)
            and set(plan["configs"]) <= set(CONFIGS) and set(plan["aside"]) <= set(plan["configs"])
            and all(_REMOVABLE.fullmatch(n) for n in plan["stale"]) and isinstance(plan.get("remove_ids"), dict)):
        return False
    staged = target / plan["staged"]
    if os.path.lexists(staged) and (staged.is_symlink() or not staged.is_dir() or _folder_id(staged) != plan.get("staged_id")
                                    or not all(_regular(f) for f in staged.iterdir())):
        return False
    return True


def _apply(plan: dict, target: Path) -> None:
    """Carry out (or, after a crash, finish) a commit plan. Every step checks what is already done."""
    staged = target / plan["staged"]

    def move(name: str) -> None:
        if (staged / name).exists():
            _commit_step(f"move {name}")
            _keep_mode(target / name, staged / name)
            os.replace(staged / name, target / name)

    def aside(name: str) -> Path:
        return target / f".peft_lota-{name}.old"

    def pinned(name: str) -> bool:  # still the very file the plan saw: removable
        return _regular(target / name) and _identity(target / name) == plan["remove_ids"].get(name)

    for name in plan["moves"]:
        move(name)
    _fsync_dir(target)
    for name in plan["aside"]:  # a changed config leaves before the weights switch: never old weights, new config
        if (staged / name).exists() and (target / name).exists():
            _commit_step(f"aside {name}")
            os.replace(target / name, aside(name))
    move(plan["switch"])
    if plan["drop_single"] and pinned(SINGLE) and not (staged / plan["switch"]).exists():
        _commit_step(f"remove {SINGLE}")
        os.unlink(target / SINGLE)
    for name in plan["configs"]:
        move(name)
    _fsync_dir(target)
    for name in plan["stale"]:
        if pinned(name):
            _commit_step(f"remove {name}")
            os.unlink(target / name)
    _commit_step("manifest")
    ids = {n: _identity(target / n) for n in plan["files"] if (target / n).is_file()}
    _write_json(target / MANIFEST, {"files": plan["files"], "identity": ids, "writer": "peft_lota"})
    for name in plan["aside"]:
        if aside(name).exists():
            os.unlink(aside(name))
    _commit_step("cleanup")
    if staged.is_dir() and not staged.is_symlink():
        shutil.rmtree(staged, ignore_errors=True)
    if (target / JOURNAL).exists():
        os.unlink(target / JOURNAL)
    _fsync_dir(target)


def _keep_mode(old: Path, new: Path) -> None:
    """A file that replaces one of the same name keeps that file's permissions (a new one gets the umask's; an extra
    file, a tokenizer copied in, never more than its source's, which it was staged with)."""
    try:
        mode = old.stat(follow_symlinks=False).st_mode
    except OSError:
        if _regular(new):
            umask = os.umask(0)
            os.umask(umask)
            extra = not _REMOVABLE.fullmatch(new.name) and new.name != CARD_NAME
            os.chmod(new, 0o666 & ~umask & (stat.S_IMODE(new.stat().st_mode) if extra else 0o666))
        return
    if stat.S_ISREG(mode) and _regular(new):
        os.chmod(new, stat.S_IMODE(mode))


def _commit(staged: Path, target: Path) -> None:
    _unique_shards(staged, staged.name.removeprefix(STAGING)[:8])
    _fsync_tree(staged)
    plan = _plan(staged, target)
    _commit_step("journal")
    _write_json(target / JOURNAL, plan)
    _fsync_dir(target)
    _apply(plan, target)


@contextlib.contextmanager
def _locked(target: Path):
    """Hold an exclusive lock on the folder for a whole save: a second save into it waits (saying so), so that
    neither removes the other's staging folder or leaves shards that no manifest lists."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks on folders; saves into one folder must not overlap there
        yield
        return
    fd = os.open(target, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.warning("peft_lota: another process is saving into %s; waiting for it to finish.", target)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _journal_plan(target: Path) -> Optional[dict]:
    """The folder's commit journal (None if there is none), refused with UnsafeFolderError unless a save of ours
    wrote it."""
    journal = target / JOURNAL
    if not os.path.lexists(journal):
        return None
    plan = _read_own_json(journal)
    if not _valid_plan(plan, target):
        raise UnsafeFolderError(
            f"{journal} is not a commit journal peft_lota wrote (it is unreadable, a link, or names paths outside the "
            "folder); nothing was changed. Delete it (and any .peft_lota-staging-* folder) and save again.")
    return plan


def check_target(save_directory) -> None:
    """Refuse, before any work (a merge, say), a folder a save could not write into: a file, a folder holding a
    journal peft_lota did not write, or a place this process cannot create files in. Creates nothing that stays."""
    target = Path(save_directory).absolute()
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} exists and is not a directory: give a folder for the checkpoint.")
    _journal_plan(target)
    where = target
    while not where.exists():  # the folder will be created in its nearest existing parent
        where = where.parent
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".peft_lota-probe-", dir=where))
    except OSError as err:
        raise PermissionError(f"cannot write into {where} ({err.strerror or err}): choose another folder.") from None


def recover(save_directory) -> bool:
    """Finish a save into `save_directory` that was interrupted while moving files in (its journal says how),
    and remove the staging folders that interrupted saves left inside it. Every save into a folder does this
    first (holding the folder's lock). Returns whether a commit was finished.

    Nothing outside the folder is touched. A journal that names anything but the files a peft_lota commit
    writes (a path outside the folder, a link) is refused with UnsafeFolderError, and nothing is changed.
    """
    target = Path(save_directory).absolute()
    if not target.is_dir():
        return False
    with _locked(target):
        return _recover(target)


def _recover(target: Path) -> bool:
    journal = target / JOURNAL
    finished = False
    plan = _journal_plan(target)
    if plan is not None:
        staged = target / plan["staged"]
        if staged.is_dir() and not staged.is_symlink():
            _apply(plan, target)
            finished = True
        else:
            os.unlink(journal)
    for leftover in target.glob(STAGING + "*"):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        elif leftover.is_symlink():
            os.unlink(leftover)
    for name in (MANIFEST, JOURNAL):  # a temporary file of _write_json that a killed save left
        for leftover in target.glob(f"{name}.*.tmp"):
            if not leftover.is_dir():
                os.unlink(leftover)
    return finished


def commit_checkpoint(save_directory, write, *, card: bool = False, overwrite_readme: bool = False) -> Path:
    """Stage a checkpoint inside `save_directory` with `write(staged_folder, write_card)`, then commit it file by file
    (the comment above `MANIFEST`): what every peft_lota save goes through. `card`: whether the writer makes a model
    card; `write_card` tells it whether it may (an existing README.md it did not write is kept)."""
    target = Path(save_directory).absolute()
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} exists and is not a directory.")
    try:
        target.mkdir(parents=True)  # a new folder gets the process's usual mode (umask)
        created = True
    except FileExistsError:
        created = False
    with _locked(target):
        _recover(target)
        existing_card = target / CARD_NAME
        write_card = (overwrite_readme or not os.path.lexists(existing_card)
                      or (_regular(existing_card)
                          and CARD_MARKER in existing_card.read_text(encoding="utf-8", errors="replace")))
        if card and not write_card:
            logger.warning("peft_lota: %s already has a README.md that peft_lota did not write; keeping it "
                           "(pass overwrite_readme=True to replace it with the model card).", target)
        staged = Path(tempfile.mkdtemp(prefix=STAGING, dir=target))
        try:
            write(staged, write_card)
            _commit(staged, target)
        except BaseException:
            if not (target / JOURNAL).exists():  # a journal means: moving in; recover() finishes it
                shutil.rmtree(staged, ignore_errors=True)
                if created:  # the folder this save made, if it still holds nothing
                    with contextlib.suppress(OSError):
                        target.rmdir()
            raise
    if (target / "adapter_config.json").exists():
        logger.warning("peft_lota: %s also holds adapter_config.json; transformers will load the folder as a PEFT "
                       "adapter, not as this merged checkpoint. Remove it or save elsewhere.", target)
    return target
