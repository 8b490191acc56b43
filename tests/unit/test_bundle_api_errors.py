"""Bad input to the public bundle API (load_bundle, Pipeline.sample, Pipeline.to) is an InputError naming the argument
or dtrain.json field and what is valid: never a raw torch error, never a silent wrong result."""

from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import pytest
import torch

from dtrain.errors import InputError
from dtrain.export.bundle import INFO_FILE, BundleError, load_bundle


@pytest.fixture(scope="module")
def bundle(digits_bundle):
    return digits_bundle  # tests/conftest.py


@pytest.fixture(scope="module")
def pipe(bundle):
    return load_bundle(bundle)


@pytest.mark.parametrize(("kw", "match"), [
    ({"n": -1}, r"^n: must be an int >= 1"),
    ({"n": 2.5}, r"^n: must be an int >= 1"),
    ({"n": None}, r"^n: must be an int >= 1"),
    ({"nfe": "2"}, r"^nfe: must be an int >= 1"),
    ({"nfe": math.nan}, r"^nfe: must be an int >= 1"),
    ({"nfe": True}, r"^nfe: must be an int >= 1"),
    ({"nfe": 5000}, r"^nfe: 5000 .*at most 1000"),
    ({"spacing": "bogus"}, r"^spacing: unknown spacing 'bogus'; choose one of \['uniform'"),
    ({"labels": 1.0}, r"^labels: need ints in \[0, 10\]"),
    ({"labels": object()}, r"^labels: need an int, a class name"),
    ({"w": math.nan}, r"^w: .*finite number"),
    ({"w": math.inf}, r"^w: .*finite number"),
    ({"w": [2]}, r"^w: .*finite number"),
    ({"w": torch.tensor([2.0, 3.0])}, r"^w: one guidance scale for the whole batch .*shape \[2\]"),
    ({"w": torch.tensor(math.nan)}, r"^w: .*finite number"),
    ({"eta": -1}, r"^eta: must be a number in \[0, 1\]"),
    ({"eta": math.nan}, r"^eta: must be a number in \[0, 1\]"),
    ({"eta": "a"}, r"^eta: must be a number in \[0, 1\]"),
    ({"eta": 1, "sampler": "dpm++2m"}, r"^eta: sampler 'dpm\+\+2m' takes no eta; samplers that do: \['ddim'"),
    ({"times": 0.5}, r"^times: must be a sequence of numbers"),
    ({"times": ["a"]}, r"^times: must be a sequence of numbers"),
    ({"generator": 42}, r"^generator: must be a torch.Generator"),
    ({"callback": 3}, r"^callback: must be a function"),  # a TypeError after the first network call
])
def test_bad_sample_arguments(pipe, kw, match):
    kw = {"n": 2, "nfe": 1, **kw}
    with pytest.raises(InputError, match=match):
        pipe.sample(kw.pop("n"), **kw)


@pytest.mark.parametrize("kw", [{"labels": np.int64(3)}, {"labels": torch.tensor(3)}, {"nfe": 2.0},
                                {"nfe": np.int64(2)}, {"w": torch.tensor(3.0)}, {"w": torch.tensor([3.0])},
                                {"w": np.float32(3.0)}])
def test_scalar_arguments_accepted(pipe, kw, monkeypatch):
    scales, guided = [], pipe.guided
    monkeypatch.setattr(pipe, "guided", lambda cond, w, *a: scales.append(w) or guided(cond, w, *a))
    gen = torch.Generator().manual_seed(0)
    x = pipe.sample(2, **{"nfe": 2, "labels": 3, **kw}, generator=gen)
    ref = pipe.sample(2, nfe=2, labels=[3, 3], w=3.0 if "w" in kw else None,
                      generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, ref) and scales[0] == scales[1] and type(scales[0]) is float
    default = pipe.info["sampler"]["guidance"]
    assert default != 3.0 and scales[0] == (3.0 if "w" in kw else default)  # the scale reaches the model as a float


@pytest.mark.parametrize("device", ["bogus", "cuda:99"])
def test_bad_device(bundle, pipe, device):
    with pytest.raises(InputError, match=r"^device: "):
        load_bundle(bundle, device=device)
    with pytest.raises(InputError, match=r"^device: "):
        pipe.to(device)


@pytest.mark.parametrize(("section", "key", "value", "field"), [
    ("image", "shape", [3, 8, 8], "image.shape"),
    ("image", "shape", [1, 8], "image.shape"),
    ("image", "shape", [1, 8, 8, 8], "image.shape"),
    ("image", "shape", [1, 16, 16], "image.shape"),
    ("sampler", "nfe", 5000, "sampler.nfe"),
    ("sampler", "eta", 2, "sampler.eta"),
    ("sampler", "eta", -0.5, "sampler.eta"),
    ("sampler", "grid", [2000.0, 0.0], "sampler.grid"),
    ("model", "clip_x0", "yes", "model.clip_x0"),
])
def test_hand_edited_info(bundle, tmp_path, section, key, value, field):
    out = tmp_path / "b"
    shutil.copytree(bundle, out)
    info = json.loads((out / INFO_FILE).read_text())
    info[section][key] = value
    (out / INFO_FILE).write_text(json.dumps(info))
    with pytest.raises(BundleError, match=rf": {re.escape(field)}: ") as e:
        load_bundle(out)
    assert e.value.field == field


def test_eps_bundle_at_zero_terminal_snr_is_refused(bundle, tmp_path):
    """An eps network cannot give x0 where alpha(t_max) = 0, where sampling starts: every sample was nan."""
    out = tmp_path / "b"
    shutil.copytree(bundle, out)
    info = json.loads((out / INFO_FILE).read_text())
    info["model"]["param"], info["schedule"]["zero_terminal_snr"] = "eps", True
    (out / INFO_FILE).write_text(json.dumps(info))
    with pytest.raises(BundleError, match=r": model.param: 'eps' is undefined at zero terminal SNR") as e:
        load_bundle(out)
    assert e.value.field == "model.param"
    info["schedule"]["zero_terminal_snr"] = False  # the same network on its own schedule loads
    (out / INFO_FILE).write_text(json.dumps(info))
    assert load_bundle(out).info["model"]["param"] == "eps"
