"""Every recipe in recipes/ loads, validates and names real components; bad recipes fail with file, key, choices.

Recipes are found by glob, so new ones are covered without touching this file. ``recipes/_base`` holds
partial files that recipes list under ``base:``; they are checked through the recipes that use them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from dtrain.config import SCHEMAS, RecipeError, load_recipe

ROOT = Path(__file__).resolve().parent.parent / "recipes"
RECIPES = sorted(p for p in ROOT.rglob("*.yaml") if "_base" not in p.relative_to(ROOT).parts)
BASES = sorted((ROOT / "_base").glob("*.yaml"))


def test_recipes_exist():
    assert RECIPES, f"no recipes under {ROOT}"
    assert (ROOT / "teacher" / "digits.yaml") in RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_recipe_loads_and_builds(path):
    from dtrain.data import DATAMODULES
    from dtrain.lit.common import LIT_MODULES
    from dtrain.models import build_model

    cfg = load_recipe(path)
    assert OmegaConf.is_readonly(cfg)
    assert cfg.method.name in LIT_MODULES, f"{path}: no LightningModule for method {cfg.method.name!r}"
    data = cfg.data.name
    assert data in DATAMODULES or (Path(__file__).parent.parent / "dtrain" / "data" / f"{data}.py").is_file()
    with torch.device("meta"):  # the network the recipe describes can be built (no memory used)
        build_model(cfg.model)
    _check_flat(OmegaConf.to_container(OmegaConf.load(path)), str(path))


def _check_flat(node, where: str, depth: int = 1) -> None:
    """Recipes stay flat: at most 3 levels of mappings (section.key.subkey)."""
    if isinstance(node, dict):
        assert depth <= 3, f"{where}: nested deeper than 3 levels"
        for k, v in node.items():
            _check_flat(v, f"{where}:{k}", depth + 1)


@pytest.mark.parametrize("path", BASES, ids=lambda p: p.name)
def test_bases_are_used(path):
    repo = ROOT.parent  # a base may also serve the inline recipes of tests and benchmarks
    users = RECIPES + BASES + sorted((repo / "tests").rglob("*.py")) + sorted((repo / "benchmarks").glob("*.py"))
    used = any(path.name in p.read_text() for p in users if p not in (path, Path(__file__)))
    assert used, f"{path} is not listed under base: by any recipe, test or benchmark"


def test_dotlist_overrides_win():
    cfg = load_recipe(ROOT / "teacher" / "digits.yaml", ["trainer.max_steps=7", "model.channels=32"])
    assert cfg.trainer.max_steps == 7 and cfg.model.channels == 32


@pytest.mark.parametrize("override,key,needle", [
    (["model.chanels=32"], "model.chanels", "did you mean 'channels'"),
    (["model.name=dit"], "model.name", "choose one of ['mlp', 'unet']"),
    (["method.weighting=p2"], "method.weighting", "choose one of"),
    (["trainer.precision=fp8"], "trainer.precision", "must be one of"),
    (["model.attn_resolutions=[16]"], "model.attn_resolutions", "not among the resolutions [8, 4]"),
    (["model.in_channels=3"], "model.in_channels", "must be 1 for data 'digits'"),
    (["ema.stds=[0.5]"], "ema.stds", "sigma_rel must be in"),
    (["method.time_sampling=uniform_discrete", "schedule.name=edm"], "method.time_sampling", "discrete schedule"),
    (["model.resolution=16", "model.attn_resolutions=[8]"], "model.resolution", "must be 8 for data 'digits'"),
    (["trainer.max_steps=[1"], "trainer.max_steps", "bad override value in 'trainer.max_steps=[1'"),
])
def test_bad_overrides_name_the_key(override, key, needle):
    with pytest.raises(RecipeError) as e:
        load_recipe(ROOT / "teacher" / "digits.yaml", override)
    assert e.value.key == key and needle in e.value.reason, str(e.value)


def test_a_section_can_switch_its_kind(tmp_path):
    """data.name=wds over the digits teacher: the digits-only keys of the base (split) are dropped, the shared ones
    (batch_size) carry over; a teacher recipe becomes a PD recipe with method.name=pd (both failed on the old kind's
    keys, naming the base file)."""
    from dtrain.cli import main

    assert main(["shards", "digits", "--out", str(tmp_path / "s"), "--num-shards", "2", "--quiet"]) == 0
    base = load_recipe(ROOT / "teacher" / "digits.yaml")
    shards = f"data.shards={tmp_path / 's' / 'index.json'}"
    cfg = load_recipe(ROOT / "teacher" / "digits.yaml", ["data.name=wds", shards])
    assert cfg.data.name == "wds" and cfg.data.batch_size == base.data.batch_size and "split" not in cfg.data
    pd = load_recipe(ROOT / "teacher" / "gmm.yaml", ["method.name=pd", "method.start_steps=8", "method.end_steps=2",
                                                     "method.round_steps=[5]", "trainer.max_steps=10"])
    assert pd.method.name == "pd" and "time_sampling" not in pd.method and pd.method.cfg_dropout == 0.0


def test_a_base_reached_twice_is_merged_once(tmp_path):
    """run: [fast, wds], both on common: common is merged where first reached, so fast's lr is not reverted by
    common's second copy."""
    (tmp_path / "common.yaml").write_text(f"base: [{ROOT / 'teacher' / 'gmm.yaml'}]\noptim:\n  lr: 1.0e-4\n")
    (tmp_path / "fast.yaml").write_text("base: [common.yaml]\noptim:\n  lr: 5.0e-3\n")
    (tmp_path / "other.yaml").write_text("base: [common.yaml]\ntrainer:\n  max_steps: 9\n")
    (tmp_path / "run.yaml").write_text("base: [fast.yaml, other.yaml]\n")
    cfg = load_recipe(tmp_path / "run.yaml")
    assert cfg.optim.lr == 5e-3 and cfg.trainer.max_steps == 9


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {ROOT / 'teacher' / 'digits.yaml'}\ntrainer:\n  max_step: 5\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(bad)
    assert e.value.source.endswith("bad.yaml") and e.value.key == "trainer.max_step"
    assert "did you mean 'max_steps'" in e.value.reason


def test_interpolated_values_are_blamed_on_the_source_that_wrote_them(tmp_path):
    """Finding the source of a bad value read each source alone, where a ${...} set on the command line does not
    resolve: an OmegaConf traceback instead of the message. A failed interpolation was always blamed on the command
    line."""
    gmm = ROOT / "teacher" / "gmm.yaml"
    with pytest.raises(RecipeError) as e:
        load_recipe(gmm, ["teacher=${out_dir}/nowhere/last.ckpt"])
    assert (e.value.source, e.value.key) == ("command line", "teacher") and "not found" in e.value.reason
    with pytest.raises(RecipeError) as e:
        load_recipe(gmm, ["trainer.max_steps=${seed}"])
    assert (e.value.source, e.value.key) == ("command line", "trainer.max_steps")
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: [{gmm}]\nlogger:\n  name: ${{nme}}-run\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(bad)
    assert e.value.source == str(bad) and e.value.key == "logger.name", str(e.value)


def test_a_section_set_to_a_list_or_scalar_is_named(tmp_path):
    """A list for a section was an OmegaConf TypeError naming nothing; a scalar named no key."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: [{ROOT / 'teacher' / 'gmm.yaml'}]\nmodel: [1, 2]\n")
    for path, over, src in ((bad, [], str(bad)), (ROOT / "teacher" / "gmm.yaml", ["trainer=5"], "command line")):
        with pytest.raises(RecipeError) as e:
            load_recipe(path, over)
        assert e.value.source == src and e.value.key in ("model", "trainer"), str(e.value)
        assert "a section: a mapping of keys" in e.value.reason


def test_model_must_fit_the_data(tmp_path):
    bad = tmp_path / "gmm_unet.yaml"
    bad.write_text(f"base: {ROOT / '_base' / 'train.yaml'}\ndata:\n  name: gmm\nmodel:\n  name: unet\n")
    with pytest.raises(RecipeError, match=r"model\.name: data 'gmm' needs model 'mlp', not 'unet'"):
        load_recipe(bad)


def test_every_section_choice_has_a_schema():
    assert {"unet", "mlp"} <= set(SCHEMAS["model"]) and "denoising" in SCHEMAS["method"]
    assert {"digits", "gmm", "patches"} <= set(SCHEMAS["data"])
