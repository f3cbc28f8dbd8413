"""Saving the synthetic ONNX graphs of the test models (insightface, MDX-Net) in one readable format."""
from __future__ import annotations

from pathlib import Path

import onnx
from onnx import helper

OPSET = 13
IR_VERSION = 8  # readable by every onnxruntime we support


def save_graph(graph: onnx.GraphProto, path: str | Path) -> Path:
    """Wrap a graph in a checked model and write it (parent folders created)."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="emocast-synthetic")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
