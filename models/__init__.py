"""PyTorch reference models, their datasets and the shared training loop.

Nothing here imports `service/` or `export/`; `export/` imports this package.
"""
