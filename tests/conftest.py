"""Shared pytest fixtures: tiny GPTQ checkpoints built on demand (see tests/tiny_models.py).

Set PEFT_LOTA_TEST_CACHE=/some/dir to keep built checkpoints across runs; entries are keyed by
the torch/transformers/gptqmodel/Python versions and a hash of tiny_models.py.
"""

from __future__ import annotations

import os

# Before any third-party import: gptqmodel sizes a thread pool from the core count and fails on
# 2 cores without this; the rest quiets progress bars and INFO chatter (no hub is reachable anyway).
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")  # optimum's per-layer quantization bars
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# TorchLinear ("gptq_torch") torch.compiles its dequantization at load. On 2 cores the inductor
# compiles cost 10-35 s per new model shape/bit width with a cold inductor cache (test_fixtures.py:
# 144 s cold, 70 s warm, 44 s without dynamo); both paths pass the same logits oracle there.
# Run with TORCHDYNAMO_DISABLE=0 to exercise the compiled path.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import hashlib
import logging
import shutil
import sys
import uuid
from pathlib import Path

import pytest

logging.getLogger("optimum").setLevel(logging.WARNING)
try:  # gptqmodel logs (banner, kernel selection, quantization tables) through LogBar's shared logger,
    from logbar import LogBar  # which sets itself to INFO only when first created: create it first.

    LogBar.shared().setLevel(logging.WARNING)
except ImportError:
    pass

sys.path.insert(0, os.path.dirname(__file__))  # `import tiny_models` from any rootdir
from tiny_models import (SPECS_MATRIX, Spec, build_awq_checkpoint, build_ct_checkpoint,  # noqa: E402
                         build_float_checkpoint, build_gptq_checkpoint, build_tokenizer)

# torch (imported just above) sets its compile-trace logger to DEBUG; pytest would show it on failures.
logging.getLogger("torch.__trace").setLevel(logging.INFO)

__all__ = ["SPECS_MATRIX", "Spec"]


def pytest_collection_finish(session):
    # gptqmodel runs a full gc.collect() in every GPTQ/AWQ load (0.25 s of each tiny model's 0.28 s, with torch,
    # transformers and every test module in the heap). What is alive once the tests are collected (imports,
    # parametrizations) is frozen out of every later collection; the tests' own objects are collected as usual.
    import gc

    gc.collect()
    gc.freeze()


def pytest_configure(config):
    # Deprecation chatter from inside transformers' own GPTQ code path, not from ours.
    config.addinivalue_line("filterwarnings", "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def _cache_key() -> str:
    import gptqmodel
    import torch
    import transformers

    builders = (Path(__file__).with_name("tiny_models.py"), Path(__file__).parents[1] / "examples" / "real_model.py")
    src = hashlib.sha256(b"".join(p.read_bytes() for p in builders)).hexdigest()[:12]
    py = "{}.{}".format(*sys.version_info[:2])  # the tokenizer is trained on this Python's stdlib
    return f"torch{torch.__version__}-tf{transformers.__version__}-gptqmodel{gptqmodel.__version__}-py{py}-{src}"


def _checkpoint_factory(tmp_path_factory, kind: str, build):
    """get(spec) -> Path of a checkpoint built by build(spec, root), cached under PEFT_LOTA_TEST_CACHE if set."""
    root = tmp_path_factory.mktemp(kind)
    persistent = os.environ.get("PEFT_LOTA_TEST_CACHE")
    cache = Path(persistent).expanduser() / _cache_key() if persistent else None
    built: dict = {}

    def get(spec) -> Path:
        if spec in built:
            return built[spec]
        if cache is not None and (cache / spec.slug() / "BUILD_COMPLETE").exists():
            built[spec] = cache / spec.slug()
            return built[spec]
        path = build(spec, root)
        if cache is not None:
            # Copy under a unique name, then rename: concurrent runs never see a half-written entry.
            cache.mkdir(parents=True, exist_ok=True)
            tmp = cache / f".tmp-{uuid.uuid4().hex}"
            shutil.copytree(path, tmp)
            try:
                tmp.rename(cache / spec.slug())
            except OSError:  # another run got there first; its copy is identical
                shutil.rmtree(tmp, ignore_errors=True)
        built[spec] = path
        return path

    return get


@pytest.fixture(scope="session")
def gptq_dir(tmp_path_factory):
    """Factory: gptq_dir(Spec(...)) -> Path of a saved tiny GPTQ checkpoint (with tokenizer)."""
    return _checkpoint_factory(tmp_path_factory, "gptq", build_gptq_checkpoint)


@pytest.fixture(scope="session")
def awq_dir(tmp_path_factory):
    """Factory: awq_dir(AwqSpec(...)) -> Path of a saved tiny AWQ (GEMM) checkpoint (with tokenizer)."""
    return _checkpoint_factory(tmp_path_factory, "awq", build_awq_checkpoint)


@pytest.fixture(scope="session")
def ct_dir(tmp_path_factory):
    """Factory: ct_dir(CtSpec(...)) -> Path of a saved tiny compressed-tensors pack-quantized checkpoint."""
    return _checkpoint_factory(tmp_path_factory, "ct", build_ct_checkpoint)


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """The same deterministic 512-token BPE the checkpoints ship with."""
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def real_root(tmp_path_factory):
    """Where the real model's truncated builds (examples/real_model.py) go: one per session, or the persistent cache."""
    root = os.environ.get("PEFT_LOTA_TEST_CACHE")
    return Path(root) / "real-model" if root else tmp_path_factory.mktemp("real-model")


@pytest.fixture(scope="session")
def fp_dir(tmp_path_factory):
    """Factory: fp_dir("llama" | "qwen2") -> Path of the tiny full-precision model (with tokenizer)."""
    root = tmp_path_factory.mktemp("float")
    return lambda arch: build_float_checkpoint(arch, root)


@pytest.fixture(scope="session")
def gguf_root(tmp_path_factory):
    """Where build_gguf writes the tiny GGUF files (one per architecture and type mix, built once per session)."""
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="module")
def made(gptq_dir, tmp_path_factory):
    """(base, adapter): the command-line tests' GPTQ fixture and a LoTA adapter that moves codes, saved once."""
    from tiny_models import CLI_SPEC, saved_adapter

    base = gptq_dir(CLI_SPEC)
    return base, saved_adapter(base, tmp_path_factory.mktemp("made") / "adapter", "lota")


@pytest.fixture
def inputs(made, tmp_path):
    """Fresh copies of base and adapter under tmp_path/work, for tests that nest folders or damage files."""
    base, adapter = tmp_path / "work" / "base", tmp_path / "work" / "adapter"
    shutil.copytree(made[0], base)
    shutil.copytree(made[1], adapter)
    return base, adapter
