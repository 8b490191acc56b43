"""dtrain: train diffusion teachers and distill them into few-step students.

Importing ``dtrain`` stays light: no Lightning, DeepSpeed or W&B (inference bundles need none of them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dtrain.export.bundle import load_bundle as load_bundle

__version__ = "0.1.0"
__all__ = ["__version__", "load_bundle"]


def __getattr__(name: str) -> Any:
    """``dtrain.load_bundle`` (an inference bundle -> ``Pipeline``), imported on first use."""
    if name == "load_bundle":
        from dtrain.export.bundle import load_bundle

        return load_bundle
    raise AttributeError(f"module 'dtrain' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
