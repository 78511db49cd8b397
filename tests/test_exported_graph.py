"""The exported SavedModel runs on the real TF Serving 2.16.1 image, which has no custom ops:
every op type in its graphs must be one that core TensorFlow registers."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO

# Lists the op types of a SavedModel (graph and function library) and which of them core
# TensorFlow does not register, in a process that imports TensorFlow alone (TFT, TFMA or
# tensorflow-text would register their own ops and hide a dependency on them).
PROBE = """
import json, sys
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow.python.framework import op_def_registry

model = saved_model_pb2.SavedModel()
model.ParseFromString(open(sys.argv[1], "rb").read())
ops = set()
for graph in (meta.graph_def for meta in model.meta_graphs):
    ops.update(node.op for node in graph.node)
    for function in graph.library.function:
        ops.update(node.op for node in function.node_def)
functions = {f.signature.name for meta in model.meta_graphs for f in meta.graph_def.library.function}
ops -= functions  # calls of the model's own functions, not op types
print(json.dumps({"ops": sorted(ops), "unregistered": sorted(op for op in ops if op_def_registry.get(op) is None)}))
"""


def test_every_op_of_the_exported_model_is_core_tensorflow(pushed_model):
    [version] = [path for path in pushed_model.iterdir() if path.name.isdigit()]
    found = _probe(version / "saved_model.pb")
    assert len(found["ops"]) > 30, found["ops"]  # the probe saw the graph (decode, resize, convolutions...)
    assert {"DecodePng", "Conv2D", "Softmax"} <= set(found["ops"]) or {"DecodeImage", "Conv2D"} <= set(found["ops"])
    assert found["unregistered"] == [], f"ops TF Serving would not have: {found['unregistered']}"
    assert "EagerPyFunc" not in found["ops"] and "PyFunc" not in found["ops"]


def _probe(path) -> dict:
    result = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True, timeout=300,
                            cwd=REPO, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_probe_reports_an_op_core_tensorflow_lacks(tmp_path):
    """The check can fail: a graph naming an op no core library registers (as a tensorflow-io or
    -addons op would be in the TF Serving image) is reported, function calls are not."""
    from tensorflow.core.protobuf import saved_model_pb2

    model = saved_model_pb2.SavedModel()
    graph = model.meta_graphs.add().graph_def
    graph.node.add(name="x", op="Placeholder")
    graph.node.add(name="y", op="Addons>ImageProjectiveTransformV3")
    function = graph.library.function.add()
    function.signature.name = "__inference_serve_42"
    function.node_def.add(name="z", op="DecodePng")
    graph.node.add(name="call", op="__inference_serve_42")
    path = tmp_path / "saved_model.pb"
    path.write_bytes(model.SerializeToString())
    assert _probe(path) == {"ops": ["Addons>ImageProjectiveTransformV3", "DecodePng", "Placeholder"],
                            "unregistered": ["Addons>ImageProjectiveTransformV3"]}
