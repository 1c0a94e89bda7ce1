"""Asks an installed vLLM which quantization method it picks for each checkpoint config, and whether its config
classes accept it (and, for GPTQ and AWQ, whether Marlin takes it on an Ampere GPU, as their layers check; AWQ with zero points off Marlin runs on
its GEMM fallback). Used by test_server_rules.py, in the Python that has vLLM (it may be another environment).

Input (argv[1]): a JSON list of `quantization_config` dicts as they stand in config.json.
Output (stdout, last line): a JSON list of {"method": name or null, "accepted": bool, "reason": str or null}.
"""

from __future__ import annotations

import json
import sys


def probe(qc: dict) -> dict:
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config

    method = qc["quant_method"]
    for name in QUANTIZATION_METHODS:  # as vLLM's ModelConfig does: a method may claim another's checkpoints
        try:
            override = get_quantization_config(name).override_quantization_method(qc, None)
        except Exception:  # a method whose optional kernels are missing here
            continue
        if override is not None:
            method = override
            break
    try:
        config = get_quantization_config(method).from_config(qc)
        if method in ("auto_gptq", "auto_awq"):  # their linear method checks Marlin's support as it is built
            from vllm.model_executor.layers.quantization.utils.marlin_utils import _check_marlin_supported

            has_zp = method == "auto_awq" and bool(config.zero_point)
            ok, why = _check_marlin_supported(config.quant_type, config.group_size, has_zp, device_capability=80)
            if not ok and method == "auto_awq" and config.zero_point:
                ok = True  # AWQ off Marlin falls back to its AWQ GEMM kernel (AutoAWQLinearMethod)
            elif not ok and method == "auto_awq":
                why = f"{why} (the AWQ GEMM fallback with symmetric weights is not claimed by the table)"
            if not ok:
                raise ValueError(why)
        if method == "compressed-tensors":  # the scheme (and its checks) is chosen per layer from the groups
            for scheme in config.target_scheme_map.values():
                config._get_scheme_from_parts(scheme["weights"], scheme["input_activations"],
                                              format=scheme["format"], layer_name="model.layers.0.mlp.up_proj")
    except Exception as e:  # noqa: BLE001 - the refusal is the answer
        return {"method": method, "accepted": False, "reason": f"{type(e).__name__}: {e}"}
    return {"method": method, "accepted": True, "reason": None}


def main() -> None:
    import vllm

    configs = json.loads(sys.argv[1])
    print(json.dumps({"version": vllm.__version__, "results": [probe(qc) for qc in configs]}))


if __name__ == "__main__":
    main()
