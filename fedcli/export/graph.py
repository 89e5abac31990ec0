"""The global model as an ONNX graph that applies the spec's preprocessing itself.

The input contract (also written into the model card and the graph's own metadata):

- `numeric`: double [rows, numeric features], the raw values in the spec's order; NaN for a
  missing value (it becomes the declared mean, as in fedcli). Standardised inside the graph as
  (x - mean) / std in float64, then cast to float32: the very arithmetic fedcli's preprocessing does.
- `categorical`: float [rows, one-hot columns], one column per declared level in the spec's order
  ("Home=owner", ...), 1 for the row's level and 0 elsewhere; an undeclared or missing category is
  a row of zeros, as in fedcli. Matching a table's text to a level is the caller's job (ONNX has no
  string matching that follows fedcli's rules for numbers and booleans, docs/tables.md).
- output `score`: float [rows], P(positive class), and `logit`: float [rows], its log-odds.

Each input exists only if the spec declares features of its kind. The layers are Gemm (+ Relu) in
float32 like torch's Linear, so the scores equal `fedcli predict`'s to float32 rounding.
"""

from __future__ import annotations

import numpy as np

OPSET = 17  # widely supported by ONNX runtimes; IsNaN, Where, Gemm and Sigmoid are all older
IR_VERSION = 8  # loadable by runtimes older than the onnx package that writes it (opset 17: onnxruntime >= 1.13)


def build(spec, tensors: dict[str, np.ndarray], metadata: dict[str, str], shift: float = 0.0):
    """An onnx.ModelProto for this spec's model and the verified tensors; `shift` (a prior correction)
    is added to the last layer's bias, so `logit` and `score` come out corrected."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, inputs, parts = [], [], [], []
    data = spec.data
    if data.numeric:
        n = len(data.numeric)
        inputs.append(helper.make_tensor_value_info("numeric", TensorProto.DOUBLE, ["rows", n]))
        means = np.array([f.mean for f in data.numeric], dtype=np.float64)
        stds = np.array([f.std for f in data.numeric], dtype=np.float64)
        inits += [
            numpy_helper.from_array(means, "mean"),
            numpy_helper.from_array(stds, "std"),
            numpy_helper.from_array(np.zeros(1, np.float64), "zero"),
        ]
        nodes += [
            helper.make_node("Sub", ["numeric", "mean"], ["centred"]),
            helper.make_node("Div", ["centred", "std"], ["standardised"]),
            helper.make_node("IsNaN", ["numeric"], ["missing"]),
            helper.make_node("Where", ["missing", "zero", "standardised"], ["filled"]),
            helper.make_node("Cast", ["filled"], ["numeric_f32"], to=TensorProto.FLOAT),
        ]
        parts.append("numeric_f32")
    if data.categorical:
        width = sum(len(c.levels) for c in data.categorical)
        inputs.append(helper.make_tensor_value_info("categorical", TensorProto.FLOAT, ["rows", width]))
        parts.append("categorical")
    if len(parts) > 1:
        nodes.append(helper.make_node("Concat", parts, ["features"], axis=1))
        current = "features"
    else:
        current = parts[0]
    layers = len([k for k in tensors if k.endswith(".weight")])
    for i in range(layers):
        w, b = f"{2 * i}.weight", f"{2 * i}.bias"
        bias = np.asarray(tensors[b], np.float64) + (shift if i == layers - 1 else 0.0)
        inits += [
            numpy_helper.from_array(np.asarray(tensors[w], np.float32), f"layer{i}.weight"),
            numpy_helper.from_array(bias.astype(np.float32), f"layer{i}.bias"),
        ]
        nodes.append(helper.make_node("Gemm", [current, f"layer{i}.weight", f"layer{i}.bias"], [f"h{i}"], transB=1))
        current = f"h{i}"
        if i < layers - 1:
            nodes.append(helper.make_node("Relu", [current], [f"a{i}"]))
            current = f"a{i}"
    inits.append(numpy_helper.from_array(np.array([-1], np.int64), "flat"))
    nodes += [
        helper.make_node("Reshape", [current, "flat"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["score"]),
    ]
    outputs = [
        helper.make_tensor_value_info("score", TensorProto.FLOAT, ["rows"]),
        helper.make_tensor_value_info("logit", TensorProto.FLOAT, ["rows"]),
    ]
    graph = helper.make_graph(nodes, "fedcli_global", inputs, outputs, inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="fedcli", ir_version=IR_VERSION
    )
    model.doc_string = __doc__ or ""
    helper.set_model_props(model, metadata)
    onnx.checker.check_model(model, full_check=True)
    return model


def input_contract(spec) -> list[dict]:
    """The graph's inputs, column by column, for the model card."""
    from fedcli.bank.tables import feature_names

    names = feature_names(spec.data)
    n = len(spec.data.numeric)
    out = []
    if n:
        out.append({"name": "numeric", "dtype": "float64", "columns": names[:n], "missing": "NaN -> the declared mean"})
    if len(names) > n:
        out.append(
            {
                "name": "categorical",
                "dtype": "float32",
                "columns": names[n:],
                "missing": "all zeros for an undeclared or missing level",
            }
        )
    return out


def sizes(spec) -> list[int]:
    """Layer widths, input first (for the model card)."""
    return [spec.data.n_features, *(spec.model.hidden if spec.model.kind == "mlp" else ()), 1]
