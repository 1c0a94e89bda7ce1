"""Which GPU servers serve a weight-only integer checkpoint, and which `peft-lota convert` makes one they serve.

Each server's rules, read from its release's own code (CUDA; tests/test_server_rules.py
ask an installed copy's config classes and kernel checks, where one is installed):

vLLM 0.34.0
- GPTQ (`auto_gptq`, which every GPTQ name maps to): symmetric 4- and 8-bit weights only (its TYPE_MAP); act-order
  (`desc_act`) with groups is refused; groups of 32, 64, 128 or one per row (Marlin's, checked for every kernel).
  Symmetric weights need no zero points, so v1 and v2 read alike.
- AWQ (`auto_awq`): 4-bit with zero points; Marlin (Machete on Hopper) for Marlin's groups, its AWQ GEMM kernel for
  other groups. A symmetric AWQ checkpoint (`zero_point: false`) misses Marlin and falls to the GEMM kernel, which
  reads the stored zero points; that path is not checked here, so it is not claimed.
- compressed-tensors `pack-quantized` (WNA16): 2- to 8-bit integer weights, symmetric or with zero points, in groups
  or per channel, static; act-order only as static (`weight`) order (`group`/`dynamic` are refused). Odd widths run
  on the Humming kernels its CUDA build installs.

SGLang 0.5.23
- GPTQ: only through `gptq_marlin` (plain `gptq` is not a CUDA method there): symmetric 4- and 8-bit, Marlin's
  groups, act-order allowed (it keeps g_idx). Asymmetric, 2- and 3-bit GPTQ are refused.
- AWQ: 4-bit with zero points (Marlin for its groups, else the AWQ dequantize path); 8-bit refused; symmetric AWQ
  not claimed (as above).
- compressed-tensors WNA16: 4 or 8 bits; with zero points only at 4 bits (its Marlin build has no 8-bit zero-point
  kernel); Marlin's groups (the scheme does not check them, the kernel fails on others); act-order `group` allowed.

A conversion keeps the grid (bits, groups, zero points, group order), so a server that refuses a checkpoint may take
the same grid in another format that `convert` writes: GPTQ (any grid), AWQ (no act-order), compressed-tensors
(symmetric, no act-order).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

MARLIN_GROUP_SIZES = (-1, 32, 64, 128)  # groups of 32, 64, 128 rows, or one group per output column

VLLM = "vLLM 0.34"
SGLANG = "SGLang 0.5.23"
SERVERS = (VLLM, SGLANG)


class Grid(NamedTuple):
    """What a server's rules read of a checkpoint: a conversion keeps all of it."""

    bits: int
    group_size: int  # -1: one group per output column
    sym: bool  # every zero point at the grid's centre (no zero points stored or read)
    act_order: bool  # groups in a permuted row order (GPTQ desc_act with groups; compressed-tensors actorder)
    ok: bool = True  # False: a grid these rules do not describe (a dynamic or float scheme)


def _marlin_groups(g: Grid) -> Optional[str]:
    if g.group_size not in MARLIN_GROUP_SIZES:
        return f"its Marlin kernels take groups of 32, 64 or 128 rows (or one per column), not {g.group_size}"
    return None


def _gptq(server: str, g: Grid) -> tuple[str, Optional[str]]:
    if server == VLLM:
        kernel = "auto_gptq (Marlin)"
        if not g.sym or g.bits not in (4, 8):
            return kernel, (f"its GPTQ path takes symmetric 4- and 8-bit weights only, not {g.bits}-bit "
                            f"{'symmetric' if g.sym else 'asymmetric'} ones")
        if g.act_order:
            return kernel, "it refuses act-order (desc_act) with groups"
        return kernel, _marlin_groups(g)
    kernel = "gptq_marlin"
    if not g.sym or g.bits not in (4, 8):
        return kernel, (f"it serves GPTQ through Marlin only, symmetric 4- and 8-bit, not {g.bits}-bit "
                        f"{'symmetric' if g.sym else 'asymmetric'}")
    return kernel, _marlin_groups(g)


def _awq(server: str, g: Grid) -> tuple[str, Optional[str]]:
    kernel = "auto_awq (Marlin, else AWQ GEMM)" if server == VLLM else "awq_marlin (else awq)"
    if g.bits != 4:
        return kernel, f"it serves AWQ at 4 bits only, not {g.bits}"
    if g.sym:
        return kernel, ("its AWQ Marlin kernel needs zero points, and this checkpoint is symmetric (zero_point: false); "
                        "its fallback kernel is not checked for that")
    return kernel, None


def _compressed_tensors(server: str, g: Grid) -> tuple[str, Optional[str]]:
    kernel = "compressed-tensors WNA16"
    if not g.ok:
        return kernel, ("it serves static integer weights in groups or per channel (act-order only within groups), "
                        "not these")
    if server == VLLM:
        if not 2 <= g.bits <= 8:
            return kernel, f"its WNA16 scheme takes 2- to 8-bit weights, not {g.bits}"
        if g.act_order:
            return kernel, "it refuses actorder 'group' and 'dynamic'"
        return kernel, None
    if g.bits not in (4, 8):
        return kernel, f"its WNA16 scheme takes 4- and 8-bit weights only, not {g.bits}"
    if g.bits == 8 and not g.sym:
        return kernel, "its Marlin build has no 8-bit kernel with zero points"
    return kernel, _marlin_groups(g)


RULES = {"gptq": _gptq, "awq": _awq, "compressed-tensors": _compressed_tensors}
TITLES = {"gptq": "GPTQ", "awq": "AWQ", "compressed-tensors": "compressed-tensors"}


def _convert_problem(target: str, g: Grid) -> Optional[str]:
    """Why `convert --to target` cannot hold this grid (whatever the layer widths), or None."""
    if target == "awq" and g.act_order:
        return "AWQ has no act-order"
    if target == "compressed-tensors" and (not g.sym or g.act_order):
        return ("peft-lota writes compressed-tensors symmetric and without act-order only: transformers cannot "
                "reload its zero points to check the result")
    if not g.ok:
        return "not an integer grid"
    return None


def verdicts(fmt_name: str, g: Grid) -> list[tuple[str, str, Optional[str]]]:
    """(server, its kernel for this format, why it refuses or None) for each server."""
    rule = RULES.get(fmt_name)
    if rule is None:
        return []
    return [(server, *rule(server, g)) for server in SERVERS]


def rows(fmt_name: str, g: Grid) -> list[tuple[str, str, bool]]:
    """The servers' rows of a format's kernel table: (kernel, devices, can serve)."""
    return [(f"{server} {kernel}", "cuda", why is None) for server, kernel, why in verdicts(fmt_name, g)]


def note(fmt_name: str, g: Grid) -> Optional[str]:
    """For each server that refuses this checkpoint: why, and the conversion it would serve (or that none does)."""
    parts = []
    for server, _, why in verdicts(fmt_name, g):
        if why is None:
            continue
        served_as = [t for t in RULES if t != fmt_name and _convert_problem(t, g) is None
                     and RULES[t](server, g)[1] is None]
        if served_as:
            how = (f"`peft-lota convert CHECKPOINT OUT --to {served_as[0]}` writes the same grid as "
                   f"{TITLES[served_as[0]]}, which it serves")
        else:
            how = "no format peft-lota writes holds this grid in a form it serves"
            unwritable = [t for t in RULES if t != fmt_name and RULES[t](server, g)[1] is None]
            if unwritable:
                how += f"; it would take it as {TITLES[unwritable[0]]}, but {_convert_problem(unwritable[0], g)}"
        parts.append(f"{server} refuses it: {why}; {how}.")
    return " ".join(parts) or None
