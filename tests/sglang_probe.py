"""Asks an installed SGLang which quantization method it picks for each checkpoint config and whether it serves it on
a CUDA GPU (compute capability 9.0, an H100), as its model config, quantization config classes and Marlin checks
decide. Used by test_sglang_rules.py, in the Python that has SGLang (it may be another environment; no GPU needed:
the device queries are answered as an H100 would).

Input (argv[1]): a JSON list of `quantization_config` dicts as they stand in config.json.
Output (stdout, last line): {"version": ..., "results": [{"method": name or null, "accepted": bool, "reason": str}]}.
"""

from __future__ import annotations

import json
import sys

CAPABILITY = (9, 0)


def as_cuda() -> None:
    """Make SGLang's Marlin checks answer as on an H100: its device queries, where they are looked up, return
    compute capability 9.0. (torch itself is left alone: faking a CUDA device makes SGLang load its CUDA kernels.)"""
    import sglang.srt.layers.quantization.marlin_utils as marlin_utils
    import sglang.srt.utils as utils

    for module in (marlin_utils, utils):
        if hasattr(module, "get_device_capability"):
            module.get_device_capability = lambda *a, **k: CAPABILITY


def probe(qc: dict) -> dict:
    from sglang.srt.layers.quantization import QUANTIZATION_METHODS, get_quantization_config
    from sglang.srt.layers.quantization import marlin_utils

    method = qc["quant_method"]
    for cls in QUANTIZATION_METHODS.values():  # as SGLang's ModelConfig does: the first override wins
        try:
            override = cls.override_quantization_method(qc, None)
        except Exception:  # noqa: BLE001 - a method whose optional kernels are missing here
            continue
        if override:
            method = override
            break
    if method not in QUANTIZATION_METHODS:
        return {"method": method, "accepted": False, "reason": f"Unknown quantization method: {method}"}
    try:
        config = get_quantization_config(method).from_config(qc)
        if method in ("gptq_marlin", "awq_marlin"):  # their linear schemes verify Marlin as they are built
            has_zp = method == "awq_marlin" and bool(config.zero_point)
            ok, why = marlin_utils._check_marlin_supported(config.quant_type, config.group_size, has_zp,
                                                          device_capability=CAPABILITY[0] * 10 + CAPABILITY[1])
            if not ok:
                raise ValueError(why)
        if method == "awq" and not config.zero_point:
            # the dequantize fallback reads stored zero points; symmetric AWQ on it is not claimed by the table
            raise ValueError("symmetric AWQ on the awq fallback: not checked")
        if method == "compressed-tensors":  # the scheme is chosen per layer from the config groups
            for scheme in config.target_scheme_map.values():
                built = config._get_scheme_from_parts(scheme["weights"], scheme["input_activations"],
                                                      format=scheme.get("format"))
                # WNA16 runs on Marlin, which its scheme does not check: the kernel's own types and groups decide
                ok, why = marlin_utils._check_marlin_supported(
                    built.quant_type, built.group_size if built.group_size else -1, not built.symmetric,
                    device_capability=CAPABILITY[0] * 10 + CAPABILITY[1])
                if not ok:
                    raise ValueError(why)
    except Exception as e:  # noqa: BLE001 - the refusal is the answer
        return {"method": method, "accepted": False, "reason": f"{type(e).__name__}: {e}"}
    return {"method": method, "accepted": True, "reason": None}


def main() -> None:
    as_cuda()
    import sglang

    configs = json.loads(sys.argv[1])
    print(json.dumps({"version": sglang.__version__, "results": [probe(qc) for qc in configs]}))


if __name__ == "__main__":
    main()
