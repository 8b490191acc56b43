"""Checkpoint handoff: inference bundles (``bundle``), checkpoint reading and export (``checkpoint``).

Attributes load lazily so ``import dtrain.export.bundle`` stays free of everything but torch and safetensors.
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_bundle", "save_bundle", "Pipeline", "BundleError", "export_checkpoint", "load_teacher",
           "read_checkpoint", "CheckpointError"]

_HOME = {"load_bundle": "bundle", "save_bundle": "bundle", "Pipeline": "bundle", "BundleError": "bundle",
         "export_checkpoint": "checkpoint", "load_teacher": "checkpoint", "read_checkpoint": "checkpoint",
         "CheckpointError": "checkpoint"}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        import importlib

        return getattr(importlib.import_module(f"dtrain.export.{_HOME[name]}"), name)
    raise AttributeError(f"module 'dtrain.export' has no attribute {name!r}")
