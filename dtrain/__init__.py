"""dtrain: train diffusion teachers and distill them into few-step students.

Importing ``dtrain`` stays light: no Lightning, DeepSpeed or W&B (inference bundles need none of them).
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``dtrain.load_bundle`` (an inference bundle -> ``Pipeline``), imported on first use."""
    if name == "load_bundle":
        from dtrain.export.bundle import load_bundle

        return load_bundle
    raise AttributeError(f"module 'dtrain' has no attribute {name!r}")
