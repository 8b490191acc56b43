"""Distillation targets come from the teacher's raw x0 (``DiffusionModule.frozen_teacher``, the one teacher loader of
PD, CD, CTM and MeanFlow): the student trains on its raw output and clips only when it samples, so targets clipped
by the teacher's ``model.clip_x0`` would pile up on the bound and cost the samples contrast. ``method.teacher_clip``
keeps the teacher's clip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from dtrain.config import load_recipe
from dtrain.lit.common import module_class
from dtrain.models import build_denoiser

ROOT = Path(__file__).resolve().parents[2]
RECIPES = {"pd": "pd/gmm.yaml", "cd": "cm/cd_gmm.yaml", "ctm": "flowmap/ctm_gmm.yaml",
           "meanflow": "flowmap/meanflow_gmm.yaml"}
QUIET = ["trainer.cpu_threads=1", "trainer.progress_bar=false", "logger.mode=disabled"]


def overshooting_teacher(schedule):
    """An x0-predicting teacher whose raw x0 is 3 everywhere, clipped to 1 by ``clip_x0``."""
    den = build_denoiser({"name": "mlp", "param": "x0", "dim": 2, "hidden": 8, "depth": 1, "clip_x0": 1.0}, schedule)
    last = [m for m in den.net.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(3.0)
    return den


@pytest.mark.filterwarnings("ignore:sampler.spacing")
@pytest.mark.parametrize("method", list(RECIPES))
@pytest.mark.parametrize("clip", [False, True])
def test_targets_use_the_raw_teacher_unless_teacher_clip(method, clip, tmp_path):
    cfg = load_recipe(ROOT / "recipes" / RECIPES[method], [f"out_dir={tmp_path}", *QUIET,
                                                            f"method.teacher_clip={str(clip).lower()}"])
    assert cfg.method.teacher_clip is clip
    module = module_class(cfg.method.name)(cfg)
    given = overshooting_teacher(module.schedule)
    teacher, _ = module.frozen_teacher(given, same_schedule=False, init_from=False)
    x, t = torch.randn(5, 2), torch.full((5,), 0.5, dtype=torch.float64)
    with torch.no_grad():
        out = teacher(x, t)
    assert torch.allclose(out, torch.full_like(out, 1.0 if clip else 3.0))
    assert given.clip_x0 == 1.0 and torch.allclose(given(x, t), torch.ones(5, 2))  # the caller's object is untouched


def test_every_distillation_recipe_section_has_teacher_clip_off():
    for rel in RECIPES.values():
        assert load_recipe(ROOT / "recipes" / rel, ["teacher=null"]).method.teacher_clip is False, rel
