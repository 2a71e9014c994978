"""The GPU check's parts (`python -m loadtests.gpu_check`, `make gpu-check`): the machine and its
GPU (`env`), CUDA-vs-CPU parity and placement (`parity`), in-process throughput, latency and
memory (`inprocess`), the served load (`served`, `loadgen`), and the report (`report`)."""
