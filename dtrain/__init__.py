"""dtrain: train diffusion teachers and distill them into few-step students.

Importing ``dtrain`` stays light: no Lightning, DeepSpeed or W&B (inference bundles need none of them).
"""

__version__ = "0.1.0"
