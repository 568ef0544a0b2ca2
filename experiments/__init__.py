"""The pruning study of issue 13: does Sp2PS see what accuracy misses?

Run it with ``python -m experiments.study --out docs`` (full run, ~1 hour on 2 cores) or
``python -m experiments.study --smoke --out DIR`` (a tiny subset, for CI). Trained models
and artifacts go to a cache folder (``--cache``, default ``.study-cache/``), so parts of the
study can be rerun alone (``--only deploy,score,report``). See :mod:`experiments.study`.

PyTorch, TensorFlow, tf2onnx and Torch-Pruning are needed here (the ``study`` extra), never
by :mod:`sp2ps_onnx` itself: the models are scored through its public Python API.

The Fashion-MNIST reader (:mod:`experiments.fmnist`), the training loop
(:mod:`experiments.train`), the exporters and quantizers (:mod:`experiments.artifacts`) and
the pruning methods (:mod:`experiments.prune`) are the repository's only ones:
``models/build.py``, the benchmarks and the tests use them too.
"""
