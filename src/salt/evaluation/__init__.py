"""Evaluation and export of trained runs.

- `run`: a run directory -> its config, checkpoint (lowest validation loss by default), tagger
  and dicts;
- `predictions`: the predictions HDF5 file in the test file's row order;
- `performance`: the b-tagging discriminant, rejections at working points (atlas-ftag-tools),
  the ROC and discriminant plots;

Entry point: ``python -m salt.evaluate`` (ONNX export: `salt.onnx`).
"""
