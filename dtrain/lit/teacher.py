"""The diffusion teacher: ``DiffusionModule`` with the denoising loss of ``dtrain.methods.denoising``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from dtrain.lit.common import DiffusionModule
from dtrain.methods.denoising import DenoisingLoss

__all__ = ["TeacherModule"]


class TeacherModule(DiffusionModule):
    """Trains ``net`` with ``DenoisingLoss`` built from the recipe's ``method`` and ``model`` sections."""

    kind = "teacher"

    def __init__(self, recipe: Any) -> None:
        super().__init__(recipe)
        self.loss_fn = DenoisingLoss.from_config(self.recipe["method"], self.recipe["model"], self.schedule)

    def compute_loss(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        cond = batch.get("y") if self.num_classes > 0 else None
        return self.loss_fn(self.denoiser, batch["x"], cond)
