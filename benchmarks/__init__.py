"""Benchmarks behind docs/benchmarks.md and docs/coverage.md (not run in CI).

Run each one as a module from the repository root, so that it imports ``sp2ps_onnx``,
``experiments`` (data, exporters, pruning) and ``references`` from this checkout::

    .venv/bin/python -m benchmarks.bench_score --part fmnist
    .venv/bin/python -m benchmarks.bench_engine --size 224 --batch 16

``--help`` lists each benchmark's options.
"""
