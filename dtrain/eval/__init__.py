"""Evaluation: FID (torchmetrics, pluggable feature extractors, reference statistics), FID-vs-NFE sweeps
over every registered sampler on any number of ranks, sample grids and reports (table, plot, W&B).

Submodules: ``features`` (extractors: digits, inception, raw), ``fid`` (metric, reference stats),
``sweep`` (``fid_sweep``), ``grids``, ``report``. Importing ``dtrain.eval`` loads none of them.
"""
