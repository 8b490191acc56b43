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


def _student(method: str, tmp_path, *extra: str):
    cfg = load_recipe(ROOT / "recipes" / RECIPES[method], [f"out_dir={tmp_path}", *QUIET, *extra])
    return module_class(cfg.method.name)(cfg)


@pytest.mark.parametrize("method", ["ctm", "cd"])
def test_init_from_teacher_copies_the_network_into_net_ema_and_target(method, tmp_path):
    """CTM's student is the teacher's network plus a zero second-time embedding (``ADDED_EMBEDDINGS``), CD's the
    teacher's network: every tensor of the teacher is in net, its EMA copies and CD's target network."""
    from dtrain.models import build_model

    student = _student(method, tmp_path)
    model = {**student.recipe["model"], "second_time": False}
    teacher = type("T", (), {"net": build_model(model)})()
    student.init_from_teacher(teacher)
    theirs = teacher.net.state_dict()
    target = student.target  # CD's target network (CTM's gmm recipe keeps none)
    copies = [student.net, *(student.ema[t] for t in student.ema.tags),
              *(target[t] for t in (target.tags if target is not None else []))]
    assert len(copies) == (3 if method == "cd" else 2)
    for net in copies:
        mine = net.state_dict()
        assert {k.split(".")[0] for k in set(mine) - set(theirs)} == ({"s_emb"} if method == "ctm" else set())
        assert all(torch.equal(mine[k], v) for k, v in theirs.items())
    if method == "ctm":
        assert not student.net.s_emb.mlp[-1].weight.any()  # the new embedding is still a no-op


def test_init_from_teacher_names_what_does_not_fit(tmp_path):
    from dtrain.errors import InputError
    from dtrain.models import build_model

    student = _student("ctm", tmp_path)
    other = type("T", (), {"net": build_model({**student.recipe["model"], "second_time": False,
                                               "hidden": int(student.recipe["model"]["hidden"]) * 2})})()
    with pytest.raises(InputError, match=r"^model: the student network is not the teacher's \(None\): .*size "
                                         r"mismatch.*; copy the teacher's model section \(model\.second_time may be "
                                         r"set\)$"):
        student.init_from_teacher(other)
    with pytest.raises(InputError, match=r"^method\.init: the teacher \(object\) has no network to copy; use "
                                         r"method\.init: scratch$"):
        student.init_from_teacher(object())
    pd = _student("pd", tmp_path)  # PD keeps its own weights for a teacher that is only a function
    before = {k: v.clone() for k, v in pd.net.state_dict().items()}
    with pytest.warns(UserWarning, match="has no network to copy; the student starts from its own initialisation"):
        pd.init_from_teacher(object(), keep_own=True)
    assert all(torch.equal(v, before[k]) for k, v in pd.net.state_dict().items())
