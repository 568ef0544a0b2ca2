"""Independent references, and the inputs they are compared on, shared by the tests and the
benchmarks.

Not part of the installed package: it is imported from the repository root, where
``python -m pytest`` (``pythonpath = ["."]`` in pyproject.toml) and
``python -m benchmarks.<name>`` put it on ``sys.path``.

* :mod:`references.gradcam`: pytorch-grad-cam's class for each of our CAM method names;
* :mod:`references.photos`: real photos as model inputs, and the per-image CAM correlation.

The exporters that build the models compared here (torch, Keras and TFLite to ONNX) are in
:mod:`experiments.artifacts`, shared with the pruning study and ``models/build.py``.
"""
