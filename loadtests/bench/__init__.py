"""Benchmark: onnxserve against in-process ONNX Runtime and a plain FastAPI baseline.

Run it with `python -m loadtests.bench` (see cli.py). Modules: cells (the matrix), payloads
(request bodies), wrk (the load generator), cpu (/proc accounting), models (the repository),
inprocess (ceiling and floor), measure (one cell), targets (comparisons and goals), machine
(environment), render (markdown), cli (arguments and the run).
"""
