"""PyTorch reference models, their datasets and the shared training loop.

Each model module (`cnn`, `lstm`, `autoencoder`) offers the same surface: `INPUT` and `OUTPUTS`
(the serving graph's tensor names), `HPARAMS` and `QUICK` (defaults, and the overrides of a quick
smoke run), and `train(out_dir, *, quick=False, **overrides) -> Trained`.
Nothing here imports `service/` or `export/`; `export/` imports this package.
"""
