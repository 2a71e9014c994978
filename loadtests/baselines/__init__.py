"""Servers that onnxserve is measured against (see loadtests/bench/)."""
