"""Batch scoring: stream a file (.npy, .parquet, .csv, .npz) through a model in chunks, resumably.

One implementation serves the three ways to run it: `onnxserve score` in-process or against a
server (`--url`), jobs inside the server (`/v1/jobs`), and Ray Data (`--engine ray`).

- `readers` turns a file into chunks of rows (bad rows set aside with a reason); `arrow` turns
  Arrow columns into rows, for the Parquet reader and the Ray engine,
- `plan` checks everything that can fail before work starts and fixes the job's fingerprint,
- `writer` commits part files chunk by chunk under an atomically replaced manifest,
- `engine` runs the chunks through any async `infer` (local ORT, HTTP, the server's batcher).
"""

from service.errors import BadRequest


class ScoringError(BadRequest):
    """A scoring job that cannot start or go on (bad arguments, input, model or output).

    The CLI prints the message and exits with 2; the jobs API answers it as a 400.
    """
