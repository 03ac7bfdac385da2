"""Deployable taggers: ONNX models in the interface of ATLAS's inference code.

- `interface`: the names Athena's loader expects (inputs, outputs, ``gnn_config``);
- `model`: the tagger wrapped for one jet at a time (normalisation in the graph) and its export;
- `parity`: onnxruntime per jet against batched torch on real jets;
- `settings`: the `salt.export` config.

Entry points: ``python -m salt.export``, ``python -m salt.onnx_info``,
``python -m salt.onnx_compare``.
"""
