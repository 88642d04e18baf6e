"""Derived precisions: int8 for CPU (always possible), fp16 / fp8 / TensorRT only where a GPU is present.

Every GPU-only step is decided up front by :func:`gpu_capabilities`; a missing GPU or library turns the
step into a recorded skip with its reason, never an exception.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embedtune.console import log
from embedtune.cpu import has_int8_dot_product

# Producers of the FFN down-projection's input: GELU (BERT: exported as ...Erf->Mul) and SwiGLU's gate*up.
_ACTIVATION_OUTPUTS = {"Mul", "Gelu", "FastGelu", "BiasGelu", "QuickGelu"}
# A decoder's first layers stay fp32 (see decoder_sensitive_matmuls).
DECODER_FP32_LAYER_FRACTION = 0.4
_LAYER = re.compile(r"layers\.(\d+)[./]")


def sensitive_matmuls(model_path: Path) -> list[str]:
    """MatMuls an ``exclude_sensitive=True`` int8 keeps fp32: the FFN down-projections, and for a SwiGLU decoder
    its first layers too.

    Their inputs carry large outliers, so one dynamic per-tensor activation scale wipes out small values: on
    all-MiniLM-L6-v2 with per-tensor weight scales, quantising only these 6 MatMuls drops the min probe cosine
    to 0.89. Per-channel weight scales (the default) recover it: see :func:`kept_fp32` for what ``auto`` keeps.
    """
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    decoder = decoder_sensitive_matmuls(graph)
    if decoder is not None:
        return decoder
    producer = {out: node.op_type for node in graph.node for out in node.output}
    weights = {init.name for init in graph.initializer}
    return [n.name for n in graph.node
            if n.op_type == "MatMul" and n.input[1] in weights and producer.get(n.input[0]) in _ACTIVATION_OUTPUTS]


def kept_fp32(model_path: Path, exclude_sensitive: bool | None) -> list[str]:
    """The MatMuls int8 leaves in fp32. ``True``: :func:`sensitive_matmuls`; ``False``: none; ``None`` (auto):
    a SwiGLU decoder's rule (it fails retrieval parity without it), nothing for an encoder, whose per-channel
    int8 FFN down-projections cost no quality: all-MiniLM-L6-v2 on SciFact (300 claims, 5,183 abstracts),
    nDCG@10 vs fp32 +0.0032 with everything quantised (+0.0044 with 7-bit weights), and 256-token passages
    3.2x torch fp32 instead of 2.3x (``bench/export_throughput.py --variants conservative,all``)."""
    if exclude_sensitive is False:
        return []
    if exclude_sensitive:
        return sensitive_matmuls(model_path)
    import onnx

    return decoder_sensitive_matmuls(onnx.load(str(model_path), load_external_data=False).graph) or []


def decoder_sensitive_matmuls(graph) -> list[str] | None:
    """For a SwiGLU decoder graph (Llama, Mistral, Qwen...: a down-projection fed by SiLU(gate) * up), the MatMuls
    to keep fp32: every down-projection, and every projection of the first ``DECODER_FP32_LAYER_FRACTION`` of
    the layers. None for any other graph.

    Measured on SmolLM2-135M made bidirectional (probe passages, batches of 1 and 4, min cosine int8 vs fp32):
    the encoder rule above keeps every RMSNorm-fed projection too (RMSNorm ends in a Mul) and quantises only
    o_proj: 0.935. The down-projections' inputs reach 2,300 against a mean of 0.7 (ratio 3,400); quantising them
    alone: 0.72. Every other projection type alone costs about as much (q/k/v 0.938, gate/up 0.950, o 0.935), but
    by depth, not by type: all but the down-projections in layers 15-29 0.9975, in 12-29 0.998, in 8-29 0.951,
    in 0-14 0.979. Errors made early are amplified by the layers above; the last 60 % of the layers quantise
    safely (108 of 210 MatMuls).
    """
    producer = {out: node for node in graph.node for out in node.output}
    weights = {init.name for init in graph.initializer}
    matmuls = [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    down = {n.name for n in matmuls if _is_swiglu_product(producer.get(n.input[0]), producer)}
    layers = {n.name: int(m.group(1)) for n in matmuls if (m := _LAYER.search(n.name))}
    if not down or not layers:
        return None
    first_quantised = math.ceil(DECODER_FP32_LAYER_FRACTION * (max(layers.values()) + 1))
    return [n.name for n in matmuls if n.name in down or layers.get(n.name, first_quantised) < first_quantised]


def _is_swiglu_product(node, producer) -> bool:
    """``Mul(SiLU(gate), up)``, SiLU exported as ``Mul(x, Sigmoid(x))``."""
    if node is None or node.op_type != "Mul":
        return False
    for name in node.input:
        silu = producer.get(name)
        if silu is not None and silu.op_type == "Mul" and any(
                getattr(producer.get(i), "op_type", None) == "Sigmoid" for i in silu.input):
            return True
    return False


# Encoders whose exported graph onnxruntime's BERT fusions understand (attention, layer norm, GELU).
FUSABLE_TYPES = {"bert", "roberta", "xlm-roberta", "camembert", "electra", "mpnet"}


def fuse_for_cpu(fp32_path: Path, out_path: Path, num_heads: int, hidden_size: int) -> dict[str, int] | None:
    """onnxruntime's transformer fusions (Attention, SkipLayerNorm, BiasGelu...) on a BERT-style graph.

    Fused Attention quantises as a whole (QAttention) and the fused ops skip many small kernels, which is
    where most of int8's CPU speed-up comes from. Returns the fused op counts, or None when nothing
    useful was fused (the unfused graph is then quantised as it is).
    """
    from onnxruntime.transformers.optimizer import optimize_model

    try:
        with _quiet_quantizer():
            optimized = optimize_model(str(fp32_path), model_type="bert", num_heads=num_heads, hidden_size=hidden_size,
                                       opt_level=1)
    except Exception as exc:  # noqa: BLE001 - fusion is an optimisation; the plain graph still quantises
        log.warning("transformer fusion failed (%s: %s); quantising the plain graph", type(exc).__name__, exc)
        return None
    stats = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
    if not stats.get("Attention"):
        return None
    optimized.save_model_to_file(str(out_path))
    return stats


def quantize_int8(fp32_path: Path, out_path: Path, per_channel: bool = True, reduce_range: bool | None = None,
                  exclude_sensitive: bool | None = None, fuse: tuple[int, int] | None = None,
                  quantize_attention: bool = True) -> dict[str, Any]:
    """Dynamic int8 quantisation (QInt8 weights, activations quantised at run time) of the MatMuls.

    Only MatMul/Gemm with constant weights are quantised: they carry the compute;
    quantising the embedding Gather saves file size but costs quality for no speed. ``exclude_sensitive``
    chooses what stays fp32 (:func:`kept_fp32`; None: a decoder's outlier layers, nothing of an encoder).
    ``reduce_range`` (7-bit weights) avoids the int16 saturation of AVX2 kernels on CPUs without VNNI; None
    decides from this CPU.
    ``fuse=(num_heads, hidden_size)`` first applies :func:`fuse_for_cpu` (BERT-style encoders); with
    ``quantize_attention`` the fused Attention's QKV projection is int8 too (QAttention): fp32 it was 37 % of
    the int8 graph's time on 256-token passages.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if reduce_range is None:
        reduce_range = not has_int8_dot_product()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    fused_path = out_path.with_name(f".{out_path.name}.fused.tmp")
    fused = fuse_for_cpu(fp32_path, fused_path, *fuse) if fuse else None
    source = fused_path if fused else fp32_path
    excluded = kept_fp32(source, exclude_sensitive)
    ops = ["MatMul", "Gemm", *(["Attention"] if quantize_attention else [])]
    try:
        with _quiet_quantizer():
            # DefaultTensorType: shape inference cannot type the outputs of fused contrib ops.
            quantize_dynamic(source, tmp, op_types_to_quantize=ops, per_channel=per_channel,
                             reduce_range=reduce_range, weight_type=QuantType.QInt8, nodes_to_exclude=excluded,
                             use_external_data_format=fp32_path.with_name(fp32_path.name + ".data").exists(),
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        tmp.replace(out_path)
    finally:
        fused_path.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    return {"weight_type": "QInt8", "ops": ops, "per_channel": per_channel, "reduce_range": reduce_range,
            "kept_fp32": len(excluded), "fused": fused}


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    # onnxruntime logs "consider pre-processing" on the root logger: shape inference changes nothing for
    # dynamic MatMul quantisation, so the hint is noise here. Its C++ logger warns that the `dimensions`
    # input has an initializer: that is the input's default value (Matryoshka), on purpose.
    import onnxruntime as ort

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    ort.set_default_logger_severity(3)
    try:
        yield
    finally:
        root.setLevel(level)
        ort.set_default_logger_severity(2)


@dataclass
class GpuCapabilities:
    cuda: bool
    ort_providers: list[str]
    tensorrt: bool
    reasons: list[str] = field(default_factory=list)


def gpu_capabilities() -> GpuCapabilities:
    import onnxruntime as ort
    import torch

    cuda = torch.cuda.is_available()
    providers = ort.get_available_providers()
    trt = importlib.util.find_spec("tensorrt") is not None
    reasons = []
    if not cuda:
        reasons.append("no CUDA GPU (torch.cuda.is_available() is False)")
    if "CUDAExecutionProvider" not in providers:
        reasons.append("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
    if not trt:
        reasons.append("the tensorrt package is not importable")
    return GpuCapabilities(cuda, providers, trt, reasons)


def build_gpu_precisions(fp32_path: Path, out_dir: Path, precisions: list[str]) -> dict[str, dict[str, Any]]:
    """fp16 ONNX (needs a GPU and onnxruntime's CUDA provider), fp8 TensorRT engine (needs TensorRT).

    Returns one record per precision asked for: ``{"status": "built"|"skipped"|"failed", ...}``.
    """
    caps = gpu_capabilities()
    results: dict[str, dict[str, Any]] = {}
    for precision in precisions:
        results[precision] = _build_one(precision, fp32_path, out_dir, caps)
        rec = results[precision]
        (log.info if rec["status"] == "built" else log.warning)("%s: %s%s", precision, rec["status"],
                                                                 f" ({rec['reason']})" if "reason" in rec else "")
    return results


def _build_one(precision: str, fp32_path: Path, out_dir: Path, caps: GpuCapabilities) -> dict[str, Any]:
    if not caps.cuda:
        return {"status": "skipped", "reason": "; ".join(caps.reasons)}
    try:
        if precision == "fp16":
            if "CUDAExecutionProvider" not in caps.ort_providers and not caps.tensorrt:
                return {"status": "skipped", "reason": "neither onnxruntime-gpu nor TensorRT is installed"}
            return _fp16_onnx(fp32_path, out_dir / "model.fp16.onnx")
        if precision == "fp8":
            if not caps.tensorrt:
                return {"status": "skipped", "reason": "fp8 needs a TensorRT engine; tensorrt is not importable"}
            return _tensorrt_engine(fp32_path, out_dir / "model.fp8.plan", fp8=True)
        return {"status": "skipped", "reason": f"unknown precision {precision!r}"}
    except Exception as exc:  # noqa: BLE001 - an optional GPU artefact must never fail the export
        return {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}


def _fp16_onnx(fp32_path: Path, out_path: Path) -> dict[str, Any]:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # keep_io_types: the graph still takes int64 ids and returns float32 embeddings, as the contract says.
    model = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
    onnx.save(model, str(out_path))
    return {"status": "built", "path": out_path.name}


def _tensorrt_engine(fp32_path: Path, out_path: Path, fp8: bool) -> dict[str, Any]:
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(fp32_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        return {"status": "failed", "reason": f"TensorRT could not parse the ONNX graph: {errors}"}
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP16)
    if fp8:
        config.set_flag(trt.BuilderFlag.FP8)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if tensor.name == "dimensions":
            continue
        profile.set_shape(tensor.name, (1, 1), (32, 256), (128, 512))
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        return {"status": "failed", "reason": "TensorRT failed to build the engine"}
    out_path.write_bytes(bytes(engine))
    return {"status": "built", "path": out_path.name, "note": "engine is specific to this GPU and TensorRT version"}
