"""FID: closed forms, the digits extractor, reference statistics and their metadata, the sweep's exact split."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from dtrain.data.digits import digits_arrays
from dtrain.data.synthetic import GaussianMixture
from dtrain.diffusion.schedule import make_schedule
from dtrain.eval.features import (
    DIGITS_WEIGHTS,
    INCEPTION_URL,
    DigitsFeatures,
    build_extractor,
    file_sha256,
)
from dtrain.eval.fid import (
    FID,
    ClassStats,
    RefStats,
    RefStatsError,
    _get_stats,
    _set_stats,
    compute_ref_stats,
    make_fid,
    ref_meta,
)
from dtrain.eval.grids import image_grid
from dtrain.eval.sweep import generate, global_batches, indexed_noise, parse_specs

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return build_extractor("digits")


@pytest.fixture(scope="module")
def test_x():
    return digits_arrays("test")[0]


def fid_of(extractor, real, fake) -> float:
    m = make_fid(extractor)
    m.update(real, real=True)
    m.update(fake, real=False)
    return float(m.compute())


def digits_gmm(std: float = 0.25) -> GaussianMixture:
    """A 64-D mixture around the class means of the digits train split (exact denoiser, labels = components)."""
    x, y = digits_arrays("train")
    return GaussianMixture(torch.stack([x[y == k].mean(0).flatten() for k in range(10)]), std)


# ---------------------------------------------------------------------------------------------
# Closed forms


def test_fid_of_a_set_with_itself_is_zero(digits, test_x):
    assert abs(fid_of(digits, test_x, test_x)) < 1e-6


def test_fid_grows_monotonically_with_a_shift(digits, test_x):
    shifts = [0.0, 0.05, 0.1, 0.2, 0.4, 0.8]
    fids = [fid_of(digits, test_x, (test_x + d).clamp(-1, 1)) for d in shifts]
    assert abs(fids[0]) < 1e-6
    assert all(b > a for a, b in itertools.pairwise(fids)), fids


def test_fid_of_a_mean_shift_in_raw_space_is_exact():
    """Identity features: shifting every sample by d changes only the mean, FID = D d^2."""
    x = torch.randn(500, 2, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    raw = build_extractor("raw", shape=(2, 3, 3))
    for d in (0.1, 0.5, 2.0):
        assert fid_of(raw, x, x + d) == pytest.approx(18 * d**2, rel=1e-9)


@pytest.mark.filterwarnings("ignore:.*called before the ``update`` method")
def test_fid_of_two_diagonal_gaussians_matches_the_closed_form():
    """FID(N(m1, diag a), N(m2, diag b)) = |m1 - m2|^2 + sum (sqrt a - sqrt b)^2, through torchmetrics' sums."""
    g = torch.Generator().manual_seed(1)
    m1, m2 = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    a, b = torch.rand(6, generator=g, dtype=torch.float64) + 0.1, torch.rand(6, generator=g, dtype=torch.float64) + 0.1
    m = make_fid(build_extractor("raw", shape=(6,)))
    _set_stats(m, "real", m1.numpy(), torch.diag(a).numpy(), 1000)
    _set_stats(m, "fake", m2.numpy(), torch.diag(b).numpy(), 37)
    mu, sigma, n = _get_stats(m, "fake")
    np.testing.assert_allclose(mu, m2.numpy(), atol=1e-12)
    np.testing.assert_allclose(sigma, torch.diag(b).numpy(), atol=1e-12)
    assert n == 37
    want = float(((m1 - m2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum())
    assert float(m.compute()) == pytest.approx(want, rel=1e-10)


def test_inception_score_and_class_accuracy_closed_forms():
    K = 10
    s = ClassStats(K)
    s.update(torch.zeros(50, K), torch.arange(50) % K)  # uniform p(y|x): IS = 1
    assert s.compute()["inception_score"] == pytest.approx(1.0, abs=1e-12)
    s = ClassStats(K)
    labels = torch.arange(100) % K
    logits = 60.0 * torch.nn.functional.one_hot(labels, K).double()  # confident, balanced: IS = K
    logits[:10] = logits[:10].roll(1, dims=1)  # 10 wrong, the predictions stay balanced
    s.update(logits, labels)
    out = s.compute()
    assert out["inception_score"] == pytest.approx(K, rel=1e-9)
    assert out["class_acc"] == pytest.approx(0.9)


# ---------------------------------------------------------------------------------------------
# Extractors


def test_digits_classifier_asset_matches_its_record(test_x):
    record = json.loads(DIGITS_WEIGHTS.with_suffix(".json").read_text())
    assert DIGITS_WEIGHTS.stat().st_size < 1_000_000
    assert file_sha256(DIGITS_WEIGHTS) == record["sha256"]
    ext = DigitsFeatures()
    y = digits_arrays("test")[1]
    acc = float((ext.logits(test_x).argmax(1) == y).double().mean())
    assert acc == pytest.approx(record["test_accuracy"], abs=1e-12)
    assert acc >= 0.97
    assert ext.weights_sha256 == record["sha256"] and ext(test_x[:3]).dtype == torch.float64


def test_digits_extractor_refuses_other_image_sizes(digits):
    with pytest.raises(ValueError, match=r"'digits' takes images \[B, 1, 8, 8\].*got \[2, 3, 32, 32\]"):
        digits(torch.zeros(2, 3, 32, 32))


def test_missing_weights_name_the_key_and_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"eval.feature_extractor_weights_path is not set.*curl") as e:
        build_extractor("inception")
    assert INCEPTION_URL in str(e.value)
    with pytest.raises(FileNotFoundError, match=r"missing file: .*nope.pth"):
        build_extractor("inception", tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match=r"eval.feature_extractor_weights_path.*train_digits_classifier"):
        build_extractor("digits", tmp_path / "nope.safetensors")
    with pytest.raises(KeyError, match=r"eval.feature_extractor: unknown feature extractor 'incepton'"):
        build_extractor("incepton")


def test_inception_runs_from_a_local_weights_file(tmp_path, monkeypatch):
    """A randomly initialised network saved to disk stands in for the real weights (no download)."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    with monkeypatch.context() as mp:  # build once without loading anything, to get a state dict of the right keys
        mp.setattr(tfi, "load_state_dict_from_url", lambda *a, **k: None)
        mp.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        torch.manual_seed(0)
        net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path = tmp_path / "inception.pth"
    torch.save(net.state_dict(), path)
    ext = build_extractor("inception", path)
    assert ext.weights_sha256 == file_sha256(path) and ext.num_features == 2048
    x = torch.rand(2, 1, 8, 8) * 2 - 1  # grayscale, any size: quantised, repeated to RGB, resized to 299
    f, logits = ext._both(x)  # one forward for both outputs (299x299 on CPU is the slow part)
    assert f.shape == (2, 2048) and f.dtype == torch.float64 and logits.shape == (2, 1008)
    assert torch.equal(ext(x.expand(-1, 3, -1, -1)), f)
    with pytest.raises(ValueError, match="inception"):
        ext(torch.zeros(2, 4, 8, 8))
    # the reference FID's TF1-style resize (torch-fidelity's), recorded with reference statistics: files made
    # without the record (the earlier antialiased torch resize) are refused
    assert ext.net.use_antialias is False and ext.preprocess == "tf1-bilinear-299"
    meta = ref_meta(ext, (1, 8, 8), 2, "test")
    assert meta["preprocess"] == "tf1-bilinear-299"
    RefStats(np.zeros(2048), np.eye(2048), meta).check(ext, (1, 8, 8))
    old = {k: v for k, v in meta.items() if k != "preprocess"}
    with pytest.raises(RefStatsError, match=r"preprocess: file has None, evaluation uses 'tf1-bilinear-299'"):
        RefStats(np.zeros(2048), np.eye(2048), old).check(ext, (1, 8, 8))


# ---------------------------------------------------------------------------------------------
# Reference statistics


def test_ref_stats_round_trip_and_equal_direct_features(digits, test_x, tmp_path):
    train = digits_arrays("train")[0]
    stats = compute_ref_stats(digits, train.split(100), source="digits train")
    assert stats.meta["count"] == len(train) and stats.meta["resolution"] == [1, 8, 8]
    path = stats.save(tmp_path / "ref.npz")
    loaded = RefStats.load(path)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    assert loaded.meta == {"format": 1, **stats.meta}
    m = FID(digits, loaded, shape=(1, 8, 8))
    m.update(test_x)
    assert m.compute()["fid"] == pytest.approx(fid_of(digits, train, test_x), rel=1e-9, abs=1e-9)


def test_ref_stats_metadata_mismatch_fails_clearly(digits, tmp_path):
    stats = compute_ref_stats(digits, [digits_arrays("test")[0]], source="digits test")
    with pytest.raises(RefStatsError, match=r"extractor: file has 'digits', evaluation uses 'raw'.*fid_ref_stats"):
        FID(build_extractor("raw", shape=(1, 8, 8)), stats)
    other = RefStats(stats.mu, stats.sigma, {**stats.meta, "weights_sha256": "0" * 64})
    sha = digits.weights_sha256
    with pytest.raises(RefStatsError, match=rf"weights_sha256: file has '0000.*evaluation uses '{sha}"):
        FID(digits, other)
    with pytest.raises(RefStatsError, match=r"resolution: file has \[1, 8, 8\], evaluation uses \[1, 16, 16\]"):
        FID(digits, stats, shape=(1, 16, 16))
    with pytest.raises(FileNotFoundError, match=r"eval.ref_stats: .*missing.npz.*fid_ref_stats.py"):
        RefStats.load(tmp_path / "missing.npz")
    np.savez(tmp_path / "bad.npz", mu=np.zeros(3))
    with pytest.raises(RefStatsError, match="not a dtrain reference-statistics file"):
        RefStats.load(tmp_path / "bad.npz")
    (tmp_path / "notes.md").write_text("# not numpy\n")  # numpy's reason suggested allow_pickle=True: not shown
    with pytest.raises(RefStatsError, match=r"notes\.md is not a dtrain reference-statistics file .*: not an \.npz "
                                            r"archive$") as e:
        RefStats.load(tmp_path / "notes.md")
    assert "pickle" not in str(e.value)
    good = stats.save(tmp_path / "ref.npz")  # cut short (a copy, or a write killed before saves were atomic):
    (tmp_path / "cut.npz").write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # zipfile's BadZipFile
    with pytest.raises(RefStatsError, match=r"cut\.npz is not a dtrain reference-statistics file"):
        RefStats.load(tmp_path / "cut.npz")


def test_ref_stats_are_replaced_whole_or_not_at_all(digits, tmp_path, monkeypatch):
    """tools/fid_ref_stats.py rerun onto a good file and stopped while writing left an 11-byte file."""
    stats = compute_ref_stats(digits, [digits_arrays("test")[0]], source="digits test")
    path = stats.save(tmp_path / "ref.npz")
    before = path.read_bytes()

    def cut(f, **kw):
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", cut)
    with pytest.raises(KeyboardInterrupt):
        RefStats(stats.mu + 1, stats.sigma, stats.meta).save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["ref.npz"]


# ---------------------------------------------------------------------------------------------
# The sweep's sample set


def test_parse_specs_accepts_any_registered_sampler():
    assert parse_specs("ddim:1,2,4 dpm++2m:4,8") == [("ddim", [1, 2, 4]), ("dpm++2m", [4, 8])]
    assert parse_specs([("heun", [3])]) == [("heun", [3])]
    with pytest.raises(ValueError, match=r"eval.samplers: unknown sampler 'student'; choose one of \[.*'ddim'"):
        parse_specs(["student:1,2"])
    with pytest.raises(ValueError, match="must be 'sampler:nfe,nfe"):
        parse_specs(["ddim"])
    with pytest.raises(ValueError, match="NFE values must be integers"):
        parse_specs(["ddim:1,x"])
    with pytest.raises(ValueError, match=">= 1"):
        parse_specs(["ddim:0"])


@pytest.mark.parametrize("num, batch", [(1, 4), (103, 10), (120, 10)])
def test_global_batches_partition_the_samples_for_any_world_size(num, batch):
    for world in (1, 2, 3, 7):
        got = [i for r in range(world) for _, idx in global_batches(num, batch, r, world) for i in idx]
        assert sorted(got) == list(range(num))


def test_samples_do_not_depend_on_world_size():
    """DDPM (stochastic): rank 0 and 1 of two together produce exactly the single-process samples."""
    sch = make_schedule("ddpm")
    den = digits_gmm().denoiser(sch, conditional=True)
    kw = dict(shape=(1, 8, 8), num_classes=10, seed=3)

    def run(rank: int, world: int) -> dict[int, torch.Tensor]:
        batches = global_batches(23, 5, rank, world)
        return {b: x for (b, _), (x, _) in zip(batches, generate(den, "ddpm", 3, batches, **kw))}

    one, two = run(0, 1), {**run(0, 2), **run(1, 2)}
    assert sorted(one) == sorted(two) and all(torch.equal(one[b], two[b]) for b in one)
    assert torch.equal(indexed_noise(range(3, 6), (1, 8, 8), 3), indexed_noise([3, 4, 5], (1, 8, 8), 3)[[0, 1, 2]])
    assert not torch.equal(indexed_noise([0], (1, 8, 8), 3), indexed_noise([0], (1, 8, 8), 4))


def test_image_grid_layout():
    x = torch.stack([torch.full((1, 2, 2), v) for v in (-1.0, 0.0, 1.0)])
    g = image_grid(x, nrow=2, pad=1)
    assert g.shape == (2 * 3 + 1, 2 * 3 + 1) and g.dtype == np.uint8
    assert g[1, 1] == 0 and g[1, 4] == 128 and g[4, 1] == 255 and g[4, 4] == 0 and g[0].max() == 0
    assert image_grid(torch.zeros(5, 3, 4, 4), upscale=2).shape == (2 * 9 + 1, 3 * 9 + 1, 3)
    from dtrain.data.images import tile  # the layout `dtrain sample --out grid.png` shares

    assert tile(torch.zeros(7, 2, 3, 3, dtype=torch.uint8), nrow=4).shape == (2 * 4 + 1, 4 * 4 + 1, 2)
    with pytest.raises(ValueError, match=r"tile: need uint8 images"):
        tile(torch.zeros(1, 1, 2, 2))


def test_sweep_rows_report_and_wandb(digits, tmp_path, monkeypatch):
    """A small sweep on the exact GMM denoiser: rows equal a direct FID of the same samples; outputs written."""
    from dtrain.eval.report import log_wandb, plot_fid_vs_nfe, scalars, summary_line, write_json
    from dtrain.eval.sweep import fid_sweep

    ref = compute_ref_stats(digits, [digits_arrays("train")[0]], source="digits train")
    den = digits_gmm().denoiser(make_schedule("ddpm"), conditional=True)
    rows = fid_sweep(den, ["ddim:1,4", "ddpm:4"], num=60, batch_size=25, shape=(1, 8, 8), extractor=digits, ref=ref,
                     num_classes=10, seed=5, grid_size=30, progress=False)
    assert [(r.sampler, r.nfe, r.num) for r in rows] == [("ddim", 1, 60), ("ddim", 4, 60), ("ddpm", 4, 60)]
    m = FID(digits, ref)
    batches = global_batches(60, 25)
    for x, y in generate(den, "ddpm", 4, batches, shape=(1, 8, 8), num_classes=10, seed=5):
        m.update(x, y)
    direct = m.compute()
    assert rows[2].fid == pytest.approx(direct["fid"], rel=1e-12) and rows[2].class_acc == direct["class_acc"]
    assert rows[0].grid.shape == (30, 1, 8, 8) and all(math.isfinite(r.fid) for r in rows)

    png = plot_fid_vs_nfe(rows, tmp_path / "fid.png", floor=0.5)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(write_json(rows, tmp_path / "rows.json", seed=5).read_text())
    assert data["seed"] == 5 and data["rows"][1]["nfe"] == 4 and "grid" not in data["rows"][0]

    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    run = wandb.init(dir=str(tmp_path), project="dtrain-test", mode="offline")
    log_wandb(rows, run, step=7)
    run_dir, logged = run.dir, set(run.summary.keys())
    run.finish()
    media = sorted(p.name for p in (tmp_path / "wandb").rglob("*.png"))
    assert len(media) == 3, media
    # FID and class accuracy are chartable scalars, logged as such
    assert scalars(rows) == {**{f"eval/fid/{r.sampler}_nfe{r.nfe}": r.fid for r in rows},
                             **{f"eval/class_acc/{r.sampler}_nfe{r.nfe}": r.class_acc for r in rows}}
    assert set(scalars(rows)) <= logged  # (the record log's bytes split a key where it crosses a 32 KiB block)
    assert summary_line(rows[:1]) == f"ddim@1 FID {rows[0].fid:.2f} (acc {rows[0].class_acc:.2f})"
    assert any((tmp_path / "wandb").rglob("*.table.json")), "the W&B table was not written"
    assert run_dir


def test_non_finite_samples_make_the_fid_nan(digits):
    """A diverged model's NaN / inf samples are counted and give FID nan with a warning (as uint8 they were black
    images with a finite FID); the count stays exact and reset clears them. The classifier scores them as zeros,
    which keeps the Inception Score of the rest finite."""
    ref = compute_ref_stats(digits, [digits_arrays("train")[0]], source="digits train")
    m = FID(digits, ref)
    x = digits_arrays("test")[0][:20].clone()
    x[3, 0, 2, 2], x[7, 0, 0, 0] = math.nan, math.inf
    m.update(x)
    with pytest.warns(UserWarning, match=r"FID: 2 of 20 samples are not finite"):
        out = m.compute()
    assert math.isnan(out["fid"]) and out["nonfinite"] == 2 and out["count"] == 20
    assert math.isfinite(out["inception_score"])  # scored as zeros: NaN logits made it nan too
    m.reset()
    m.update(digits_arrays("test")[0][:20])
    assert math.isfinite(m.compute()["fid"])


def test_sweep_uses_given_grids_and_skips_repeated_step_counts(digits):
    """``grids``: a (sampler, NFE) point samples on the given grid (a bundle's PD grid) and gives the FID of the
    same samples drawn on it directly; heun:1,2 both come to 1 step, so the second is skipped with a warning."""
    from dtrain.diffusion.timesteps import make_grid
    from dtrain.eval.sweep import fid_sweep

    ref = compute_ref_stats(digits, [digits_arrays("train")[0]], source="digits train")
    den = digits_gmm().denoiser(make_schedule("vp_cosine"), conditional=True)
    grid = torch.tensor([0.9946, 0.9347, 0.4283, 0.0355, 0.0], dtype=torch.float64)
    kw = dict(num=40, batch_size=20, shape=(1, 8, 8), extractor=digits, ref=ref, num_classes=10, seed=2,
              progress=False)
    with pytest.warns(UserWarning, match=r"eval.samplers: heun:2 runs the 1 step\(s\) of an earlier point; skipped"):
        rows = fid_sweep(den, ["ddim:4", "heun:1,2"], grids={("ddim", 4): grid}, **kw)
    assert [(r.sampler, r.nfe) for r in rows] == [("ddim", 4), ("heun", 1)]
    m = FID(digits, ref)
    for x, y in generate(den, "ddim", 4, global_batches(40, 20), shape=(1, 8, 8), num_classes=10, seed=2, grid=grid):
        m.update(x, y)
    assert rows[0].fid == pytest.approx(m.compute()["fid"], rel=1e-12)
    assert grid.tolist() != make_grid(den.schedule, 4).tolist()
    assert rows[0].fid != pytest.approx(fid_sweep(den, ["ddim:4"], **kw)[0].fid, rel=1e-6)


def test_fid_ref_stats_tool_reads_folders_like_tensors(digits, tmp_path, load_tool, capsys):
    """tools/fid_ref_stats.py on a folder of PNGs equals the statistics of the same uint8 images in memory; a long
    read says how many images it has read (it printed nothing before the final JSON, minutes for 50k Inception
    images)."""
    from PIL import Image

    tool = load_tool("fid_ref_stats")
    x = digits_arrays("test")[0][:40]
    u8 = ((x + 1) * 127.5).round().to(torch.uint8)
    for i, im in enumerate(u8):
        Image.fromarray(im[0].numpy()).save(tmp_path / f"{i:03d}.png")
    out = tmp_path / "ref.npz"
    assert tool.main(["--folder", str(tmp_path), "--out", str(out), "--batch-size", "16", "--device", "cpu"]) == 0
    got = RefStats.load(out)
    want = compute_ref_stats(digits, [u8.float() / 127.5 - 1.0])
    np.testing.assert_allclose(got.mu, want.mu, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got.sigma, want.sigma, rtol=0, atol=1e-12)
    assert got.meta["count"] == 40 and got.meta["source"] == f"folder {tmp_path}"
    assert not capsys.readouterr().err.startswith("fid_ref_stats: ")  # a short read: the result only
    assert [len(b) for b in tool.reported(iter([torch.zeros(3), torch.zeros(2)]), True, every_s=0)] == [3, 2]
    err = capsys.readouterr().err.splitlines()
    assert [ln.split(" (")[0].split(" in ")[0] for ln in err] == ["fid_ref_stats: 3 images", "fid_ref_stats: 5 images",
                                                                  "fid_ref_stats: 5 images"], err


@pytest.mark.parametrize("override, key, reason", [
    ("eval.samplers=['ddim:1,2','nope:4']", "eval.samplers", "unknown sampler 'nope'"),
    ("eval.samplers=['ddim:0']", "eval.samplers", "NFE values must be >= 1"),
    ("eval.samplers=[ddim:1,2]", "eval.samplers", "quote each spec"),  # OmegaConf: ['ddim:1', 2]
    ("eval.feature_extractor=inceptoin", "eval.feature_extractor", "unknown 'inceptoin'"),
    ("eval.every_n_steps=100", "eval.samplers", "needs at least one"),
])
def test_recipe_eval_section_is_validated(override, key, reason):
    from dtrain.config import RecipeError, load_recipe

    with pytest.raises(RecipeError, match=r"digits\.yaml|command line") as e:
        load_recipe("recipes/teacher/digits.yaml", [override])
    assert e.value.key == key and reason in e.value.reason


def test_recipe_training_sweep_needs_reference_stats(tmp_path):
    """Set at load; the files (reference statistics, extractor weights) exist at launch (``check_inputs``), so a
    recipe naming files made later still loads on a login node."""
    from dtrain.config import RecipeError, check_inputs, load_recipe

    base = ["eval.every_n_steps=100", "eval.samplers=['ddim:4']"]
    with pytest.raises(RecipeError, match=r"eval.ref_stats: eval.every_n_steps > 0 needs reference statistics.*"
                                          r"fid_ref_stats"):
        load_recipe("recipes/teacher/digits.yaml", base)
    for over, key in ((f"eval.ref_stats={tmp_path}/missing.npz", "eval.ref_stats"),
                      ("eval.feature_extractor_weights_path=/no/such.pth", "eval.feature_extractor_weights_path")):
        ov = [*base, "eval.ref_stats=digits:train", over]
        cfg = load_recipe("recipes/teacher/digits.yaml", ov)
        with pytest.raises(RecipeError, match=r"^command line: " + key.replace(".", r"\.") + r": file not found"):
            check_inputs(cfg, "digits.yaml", ov)
    assert load_recipe("recipes/teacher/digits.yaml", [*base, "eval.ref_stats=digits:train"]).eval.ref_stats


def test_fid_ref_stats_tool_takes_a_shard_index_like_its_pattern(tmp_path, load_tool):
    """--shards index.json (as data.shards takes it) reads the shards it lists: the same statistics as the pattern."""
    from dtrain.cli import main

    assert main(["shards", "digits", "--split", "test", "--out", str(tmp_path / "s"), "--num-shards", "2",
                 "--quiet"]) == 0
    tool = load_tool("fid_ref_stats")
    stats = []
    for src in (str(tmp_path / "s" / "test-{000000..000001}.tar"), str(tmp_path / "s" / "index.json")):  # the
        # held-out split's shards are test-*.tar (they were train-*.tar)
        out = tmp_path / f"ref{len(stats)}.npz"
        assert tool.main(["--shards", src, "--out", str(out), "--batch-size", "100", "--device", "cpu"]) == 0
        stats.append(RefStats.load(out))
    assert stats[0].meta["count"] == stats[1].meta["count"] == 450
    np.testing.assert_array_equal(stats[0].mu, stats[1].mu)
    np.testing.assert_array_equal(stats[0].sigma, stats[1].sigma)
