"""int8 for SwiGLU decoders: which MatMuls stay fp32, read from the graph (tests/test_llama_e2e.py proves the
parity gate on SmolLM2's real export)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from embedtune.convert.quantize import DECODER_FP32_LAYER_FRACTION, sensitive_matmuls


def decoder_graph(layers: int, hidden: int = 8, inner: int = 16) -> onnx.ModelProto:
    """A Llama-shaped chain as torch.onnx names it: per layer an RMSNorm-ending Mul feeding q_proj and o_proj,
    another feeding gate/up, SiLU as x * Sigmoid(x), and down_proj fed by SiLU(gate) * up."""
    nodes, inits = [], []
    x = "x"

    def weight(name, rows, cols):
        inits.append(numpy_helper.from_array(np.ones((rows, cols), np.float32), name))
        return name

    for i in range(layers):
        p = f"/encoder/layers.{i}"
        nodes += [helper.make_node("Mul", [x, "gamma"], [f"{p}/in_norm"], name=f"{p}/input_layernorm/Mul_1"),
                  helper.make_node("MatMul", [f"{p}/in_norm", weight(f"wq{i}", hidden, hidden)], [f"{p}/q"],
                                   name=f"{p}/self_attn/q_proj/MatMul"),
                  helper.make_node("MatMul", [f"{p}/q", weight(f"wo{i}", hidden, hidden)], [f"{p}/o"],
                                   name=f"{p}/self_attn/o_proj/MatMul"),
                  helper.make_node("Mul", [f"{p}/o", "gamma"], [f"{p}/post_norm"],
                                   name=f"{p}/post_attention_layernorm/Mul_1"),
                  helper.make_node("MatMul", [f"{p}/post_norm", weight(f"wg{i}", hidden, inner)], [f"{p}/gate"],
                                   name=f"{p}/mlp/gate_proj/MatMul"),
                  helper.make_node("MatMul", [f"{p}/post_norm", weight(f"wu{i}", hidden, inner)], [f"{p}/up"],
                                   name=f"{p}/mlp/up_proj/MatMul"),
                  helper.make_node("Sigmoid", [f"{p}/gate"], [f"{p}/sig"], name=f"{p}/mlp/act_fn/Sigmoid"),
                  helper.make_node("Mul", [f"{p}/gate", f"{p}/sig"], [f"{p}/silu"], name=f"{p}/mlp/act_fn/Mul"),
                  helper.make_node("Mul", [f"{p}/silu", f"{p}/up"], [f"{p}/prod"], name=f"{p}/mlp/Mul"),
                  helper.make_node("MatMul", [f"{p}/prod", weight(f"wd{i}", inner, hidden)], [f"{p}/out"],
                                   name=f"{p}/mlp/down_proj/MatMul")]
        x = f"{p}/out"
    inits.append(numpy_helper.from_array(np.ones(hidden, np.float32), "gamma"))
    graph = helper.make_graph(nodes, "decoder", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, hidden])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, hidden])], inits)
    return helper.make_model(graph)


def test_decoder_keeps_down_projections_and_its_first_layers_fp32(tmp_path):
    path = tmp_path / "decoder.onnx"
    onnx.save(decoder_graph(10), str(path))
    kept = set(sensitive_matmuls(path))
    first = int(np.ceil(DECODER_FP32_LAYER_FRACTION * 10))
    assert {f"/encoder/layers.{i}/mlp/down_proj/MatMul" for i in range(10)} <= kept
    for i in range(10):
        others = {f"/encoder/layers.{i}/{m}/MatMul" for m in
                  ("self_attn/q_proj", "self_attn/o_proj", "mlp/gate_proj", "mlp/up_proj")}
        # RMSNorm ends in a Mul too: that alone must not keep a projection fp32 (the encoder rule's mistake here).
        assert (others <= kept) if i < first else not (others & kept)
