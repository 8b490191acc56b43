"""Bad recipes fail in `dtrain fit` before anything starts (no run directory, no process, no model): the message names
the file, the dotted key and the reason. Table-driven: each case is a small YAML file over a real recipe."""

from __future__ import annotations

from pathlib import Path

import pytest

from dtrain.config import RecipeError
from dtrain.lit.fit import fit

R = Path(__file__).resolve().parents[2] / "recipes"
DIGITS, GMM, PD_GMM, PD_DIGITS = (R / "teacher" / "digits.yaml", R / "teacher" / "gmm.yaml", R / "pd" / "gmm.yaml",
                                  R / "pd" / "digits.yaml")
MEANFLOW = R / "flowmap" / "meanflow_gmm.yaml"
WDS = """data: {name: wds, shards: "%(tmp)s/nowhere/train-{000000..000003}.tar", batch_size: 8}
model: {name: unet, in_channels: 1, resolution: 8, channel_mult: [1, 2], attn_resolutions: []}
"""

# (id, base recipe, YAML body ("%(tmp)s" = the test's directory), key named, reason fragment)
CASES = [
    ("misspelt key", DIGITS, "model:\n  chanels: 32\n", "model.chanels", "did you mean 'channels'"),
    ("misspelt section", DIGITS, "trainr:\n  max_steps: 5\n", "trainr", "unknown section (did you mean 'trainer'?)"),
    ("misspelt trainer key", GMM, "trainer:\n  max_step: 5\n", "trainer.max_step", "did you mean 'max_steps'"),
    ("wrong type int", GMM, "trainer:\n  max_steps: lots\n", "trainer.max_steps", "wrong type"),
    ("wrong type float", GMM, "optim:\n  lr: fast\n", "optim.lr", "wrong type"),
    ("wrong type bool", GMM, "trainer:\n  deterministic: maybe\n", "trainer.deterministic", "wrong type"),
    ("empty run name", GMM, "name: ''\n", "name", "a non-empty name without '/'"),
    ("run name with a slash", GMM, "name: a/b\n", "name", "a non-empty name without '/'"),
    ("guidance without classes", DIGITS, "model:\n  num_classes: 0\nsampler:\n  guidance: 3.0\n", "sampler.guidance",
     "guides by class labels, which an unconditional model"),
    ("guidance without a learned null class", DIGITS, "method:\n  cfg_dropout: 0.0\n", "sampler.guidance",
     "2.0: classifier-free guidance needs the unconditional (null-class) prediction, which this model never learned"),
    ("sweep guidance without a learned null class", DIGITS,
     "method:\n  cfg_dropout: 0.0\nsampler:\n  guidance: 1.0\neval:\n  guidance: 3.0\n", "eval.guidance",
     "3.0: classifier-free guidance needs the unconditional (null-class) prediction"),
    ("scalar for a list", DIGITS, "ema:\n  decays: 0.99\n", "ema.decays", "expected list[float], got 0.99"),
    ("null section", GMM, "trainer: null\n", "trainer", "expected a section of TrainerCfg's keys, got null"),
    ("unknown key, nothing close", GMM, "optim:\n  learning_rate: 0.1\n", "optim.learning_rate",
     "unknown key for OptimCfg; valid keys: ['name', 'lr', "),
    ("unknown schedule", GMM, "schedule:\n  name: vp_foo\n", "schedule.name", "unknown schedule 'vp_foo'"),
    ("unknown model", GMM, "model:\n  name: resnet\n", "model.name", "unknown model 'resnet'; choose one of"),
    ("unknown method", GMM, "method:\n  name: dmd\n", "method.name", "unknown method 'dmd'; choose one of"),
    ("unknown data", GMM, "data:\n  name: imagenet\n", "data.name", "unknown data 'imagenet'; choose one of"),
    ("unknown sampler", GMM, "sampler:\n  name: euler_x\n", "sampler.name", "unknown sampler 'euler_x'"),
    ("unknown parameterization", GMM, "model:\n  param: noise\n", "model.param", "unknown parameterization"),
    ("unknown weighting", DIGITS, "method:\n  weighting: p2\n", "method.weighting", "unknown 'p2'; choose one of"),
    ("infinite eps weighting", GMM, "schedule: {name: flow}\nmodel: {param: v}\nmethod: {target: eps, weighting: "
     "snr_trunc}\n", "method.weighting", "'snr_trunc' on the 'eps' target is infinite at the schedule's t_max"),
    ("infinite score weighting", GMM, "schedule: {name: vp_discrete, zero_terminal_snr: true}\nmodel: {param: v}\n"
     "method: {target: score, weighting: edm}\n", "method.weighting", "'edm' on the 'score' target is infinite"),
    ("unknown strategy", GMM, "strategy:\n  name: horovod\n", "strategy.name", "unknown strategy 'horovod'"),
    ("unknown precision", GMM, "trainer:\n  precision: fp8\n", "trainer.precision", "must be one of"),
    ("missing teacher", PD_GMM, "teacher: /nonexistent/teacher.ckpt\n", "teacher", "not found: /nonexistent"),
    ("truncated teacher", PD_GMM, "teacher: %(tmp)s/truncated.ckpt\n", "teacher", "not a readable torch checkpoint"),
    ("missing base file", None, "base: [no_such_base.yaml]\nname: x\n", "base", "file not found"),
    ("missing shards", R / "_base" / "train.yaml", WDS, "data.shards", "shard file not found"),
    ("missing FID reference", DIGITS, "eval:\n  every_n_steps: 10\n  samplers: ['ddim:4']\n  ref_stats: /nope.npz\n",
     "eval.ref_stats", "file not found: /nope.npz"),
    ("PD eps student at zero terminal SNR", PD_GMM,
     "model:\n  param: eps\nschedule:\n  name: ddpm\n  kind: linear\n  T: 1000\n  zero_terminal_snr: true\n",
     "model.param", "progressive distillation's few-step student cannot recover x0"),
    ("flow schedule with eps", GMM, "schedule:\n  name: flow\nmodel:\n  param: eps\n", "model.param",
     "undefined at zero terminal SNR"),
    ("meanflow predicts eps", MEANFLOW, "model:\n  param: x0\n", "model.param", "use velocity"),
    ("guided PD without w_cond", PD_DIGITS, "method:\n  guidance: [1.0, 3.0]\n", "model.w_cond", "w-conditioned"),
    ("model does not fit the data", DIGITS, "model:\n  in_channels: 3\n", "model.in_channels",
     "must be 1 for data 'digits'"),
    ("EMA decay out of range", GMM, "ema:\n  decays: [1.5]\n", "ema.decays", "in (0, 1)"),
    ("section set to null", GMM, "method:\n", "method", "must be a mapping of keys, not null"),
    ("UNet without channels", DIGITS, "model:\n  channels: 0\n", "model.channels", "must be >= 1"),
    ("one Adam beta", GMM, "optim:\n  betas: [0.9]\n", "optim.betas", "need two numbers in [0, 1)"),
    ("negative Adam eps", GMM, "optim:\n  eps: -1.0\n", "optim.eps", "must be > 0"),
    ("zero devices", GMM, "trainer:\n  devices: 0\n", "trainer.devices", "got 0"),
    ("zero devices as a string", GMM, "trainer:\n  devices: '0'\n", "trainer.devices", "got '0'"),
    ("checkpointing through a fused JVP", R / "flowmap" / "meanflow_digits.yaml",
     "model: {grad_checkpoint: true}\nmethod: {jvp: fused}\n", "model.grad_checkpoint", "cannot recompute through"),
    ("unknown accelerator", GMM, "trainer:\n  accelerator: tpu\n", "trainer.accelerator", "not 'tpu'"),
    ("sampler without steps", GMM, "sampler:\n  nfe: 0\n", "sampler.nfe", "must be >= 1"),
    ("sampler eta out of range", GMM, "sampler:\n  eta: -1.0\n", "sampler.eta", "in [0, 1]"),
    ("EMA copies of one name", GMM, "ema:\n  stds: [0.05, 0.0504]\n", "ema", "name the same copy"),
    ("max_bad_steps zero", GMM, "trainer:\n  max_bad_steps: 0\n", "trainer.max_bad_steps", "must be >= 1"),
    ("option of another schedule", DIGITS, "schedule:\n  sigma_max: 80\n", "schedule.sigma_max",
     "schedule 'ddpm' has no option 'sigma_max'"),
    ("betas of the cosine schedule", DIGITS, "schedule:\n  beta_start: 0.5\n", "schedule.beta_start / beta_end",
     "the cosine schedule sets its own betas"),
    ("odd UNet width", DIGITS, "model:\n  channels: 33\n  num_heads: 1\n", "model.channels", "must be even"),
    ("odd MLP width", GMM, "model:\n  hidden: 99\n", "model.hidden", "even below 128"),
    ("schedule without steps", DIGITS, "schedule:\n  T: 0\n", "schedule.T", "must be an int >= 2"),
    ("flow schedule past t = 1", MEANFLOW, "schedule:\n  t_max: 1.5\n", "schedule.t_min / t_max",
     "need 0 <= t_min < t_max <= 1.0"),
    ("consistency student on a bad schedule", R / "cm" / "ict_digits.yaml",  # was blamed on method.spacing
     "method:\n  init: scratch\nschedule:\n  kind: linear\n  beta_end: 2\n", "schedule.beta_start / beta_end",
     "need 0 < beta_start <= beta_end < 1"),
    ("consistency grid rho", R / "cm" / "ict_cifar10.yaml", "method:\n  rho: 0\n", "method.rho", "must be > 0"),
    ("teacher p_std", GMM, "method:\n  time_sampling: lognormal\n  p_std: 0\n", "method.p_std", "must be > 0"),
    ("PD under deepspeed", PD_GMM, "strategy:\n  name: deepspeed\n", "strategy.name",
     "progressive distillation runs under ddp"),
    ("PD under fsdp2", PD_GMM, "strategy:\n  name: fsdp2\n", "strategy.name", "not 'fsdp2'"),
    ("MeanFlow under ZeRO-3", MEANFLOW, "strategy:\n  name: deepspeed\n  zero_stage: 3\n", "strategy.zero_stage",
     "MeanFlow's JVP (torch.func.jvp) cannot pass ZeRO-3's parameter hooks"),
    ("CTM compare zero under ZeRO-3", R / "flowmap" / "ctm_gmm.yaml", "strategy:\n  name: deepspeed\n  zero_stage: 3\n",
     "strategy.zero_stage", "method.compare: s runs under ZeRO-3; use zero_stage 1 or 2"),
    ("zero LR", GMM, "optim:\n  lr: 0\n", "optim.lr", "must be > 0"),
    ("NaN LR", GMM, "optim:\n  lr: .nan\n", "optim.lr", "must be a finite number, got nan"),  # nan <= 0: False
    ("negative weight decay", GMM, "optim:\n  weight_decay: -0.01\n", "optim.weight_decay", "must be >= 0"),
    ("infinite grad clip", GMM, "optim:\n  grad_clip: .inf\n", "optim.grad_clip", "must be a finite number"),
    ("NaN CFG kappa", R / "flowmap" / "meanflow_digits.yaml", "method:\n  cfg_kappa: .nan\n", "method.cfg_kappa",
     "must be a finite number, got nan"),  # named method.cfg_omega
    ("negative seed", GMM, "seed: -1\n", "seed", "must be in [0, 2^32)"),
    ("negative eval seed", GMM, "eval:\n  seed: -1\n", "eval.seed", "must be in [0, 2^32)"),
    ("negative eval guidance", DIGITS, "eval:\n  guidance: -3\n", "eval.guidance", "must be >= 0"),
    ("negative min-SNR gamma", GMM, "method:\n  weighting: min_snr\n  snr_gamma: -5\n", "method.snr_gamma",
     "must be > 0"),
    ("beta2 of one", GMM, "optim:\n  betas: [0.9, 1.0]\n", "optim.betas", "need two numbers in [0, 1)"),
    ("EMA every zero", GMM, "ema:\n  every: 0\n", "ema.every", "must be >= 1"),
    ("negative keep_checkpoints", GMM, "trainer:\n  keep_checkpoints: -1\n", "trainer.keep_checkpoints",
     "must be >= 0"),
    ("zero shuffle block", R / "_base" / "train.yaml", WDS.replace("batch_size: 8}", "batch_size: 8, shuffle: 0}"),
     "data", "shuffle >= 1"),
    ("offload without deepspeed", GMM, "strategy:\n  name: ddp\n  offload_optimizer: true\n",
     "strategy.offload_optimizer", "needs strategy.name=deepspeed"),
    # a fuzz of every recipe key: these crashed deep in omegaconf / torch, or were taken and failed later
    ("a mapping for a list", GMM, "ema:\n  decays:\n    fast: 0.9\n", "ema.decays",
     "a list: give the whole list, e.g. ema.decays=[0.99]"),
    ("a list for a model name", GMM, "model:\n  name: [mlp]\n", "model.name", "unknown model ['mlp']; choose one"),
    ("MLP dropout out of range", GMM, "model:\n  dropout: -1.0\n", "model.dropout", "must be in [0, 1), got -1.0"),
    ("MLP of negative depth", GMM, "model:\n  depth: -1\n", "model.depth", "must be >= 0"),
    ("NaN guidance", PD_DIGITS, "sampler:\n  guidance: .nan\n", "sampler.guidance", "must be a finite number"),
    ("infinite time std", GMM, "method:\n  time_sampling: lognormal\n  p_std: .inf\n", "method.p_std",
     "must be a finite number, got inf"),
    ("infinite Adam eps", GMM, "optim:\n  eps: .inf\n", "optim.eps", "must be a finite number"),
    ("zero sigma_data", GMM, "model:\n  param: edm\n  sigma_data: 0.0\n", "model.sigma_data", "must be > 0"),
    ("negative x0 clip", GMM, "model:\n  clip_x0: -1.0\n", "model.clip_x0", "must be null (no clipping) or > 0"),
    ("GPU ids on CPU", GMM, "trainer:\n  accelerator: cpu\n  devices: [0]\n", "trainer.devices",
     "are GPU ids; with trainer.accelerator=cpu give a count"),
    ("device ids that are not ids", GMM, "trainer:\n  devices: [x]\n", "trainer.devices", "got ['x']"),
    ("reverse SDE from pure noise", GMM, "schedule:\n  name: flow\nmodel:\n  param: velocity\nsampler:\n"
     "  name: euler_maruyama\n", "sampler.name", "euler_maruyama's reverse SDE needs alpha(t_max) > 0"),
]


@pytest.mark.parametrize("name,base,body,key,reason", CASES, ids=[c[0] for c in CASES])
def test_bad_recipe_fails_before_anything_starts(tmp_path, name, base, body, key, reason):
    (tmp_path / "truncated.ckpt").write_bytes(b"PK\x03\x04" + bytes(100))  # a zip header and nothing else
    recipe = tmp_path / "bad.yaml"
    text = body % {"tmp": tmp_path}
    recipe.write_text((f"base: [{base}]\n" if base is not None else "") + text + f"out_dir: {tmp_path / 'runs'}\n")
    with pytest.raises(RecipeError) as e:
        fit(recipe)
    msg = str(e.value)
    assert e.value.key == key, msg
    assert reason in e.value.reason, msg
    assert msg.startswith(f"{e.value.source}: {key}: ")
    assert e.value.source.endswith("bad.yaml"), msg  # the file that set the key
    assert not (tmp_path / "runs").exists()  # nothing was started or written


def test_at_least_fifteen_cases():
    assert len(CASES) >= 15 and len({c[0] for c in CASES}) == len(CASES)


def test_command_line_override_is_named(tmp_path):
    with pytest.raises(RecipeError) as e:
        fit(GMM, ["trainer.max_bad_steps=-2", f"out_dir={tmp_path}"])
    assert e.value.source == "command line" and e.value.key == "trainer.max_bad_steps"


def test_an_unbounded_ctm_span_is_finite_enough():
    """method.max_span=.inf means no bound (the one float key that may be infinite): the finite check refused it."""
    from dtrain.config import load_recipe

    assert load_recipe(R / "flowmap" / "ctm_gmm.yaml", ["method.max_span=.inf"]).method.max_span == float("inf")
    with pytest.raises(RecipeError, match=r"method\.p_std: must be a finite number, got inf"):
        load_recipe(R / "flowmap" / "ctm_gmm.yaml", ["method.p_std=.inf"])


@pytest.mark.parametrize(("item", "key", "reason"), [
    ("ema.decays.0=0.5", "ema.decays", "a list: give the whole list, e.g. ema.decays=[0.99] (single elements"),
    ("model.channel_mult.1=3", "model.channel_mult", "e.g. model.channel_mult=[1,2] ("),
    ("optim.betas={a: 1}", "optim.betas", "a list: give the whole list"),
    ("method.name=[1,2]", "method.name", "unknown method [1, 2]; choose one of"),
    ("=5", "=5", "an override is key=value with a dotted key"),
    ("trainer..max_steps=1", "trainer..max_steps=1", "an override is key=value with a dotted key"),
])
def test_malformed_overrides_are_named(tmp_path, item, key, reason):
    """An element override of a list (the natural ema.decays.0=0.5) raised omegaconf's TypeError, a list name an
    unhashable-type TypeError; an empty key part was an 'unknown section'."""
    recipe = DIGITS if "channel_mult" in item else GMM
    with pytest.raises(RecipeError) as e:
        fit(recipe, [item, f"out_dir={tmp_path / 'runs'}"])
    assert (e.value.source, e.value.key) == ("command line", key) and reason in e.value.reason, str(e.value)
    assert not (tmp_path / "runs").exists()


def test_lpips_that_cannot_run_here_fails_at_launch_and_in_a_dry_run(tmp_path, monkeypatch, cli_error):
    """distance: lpips without the package (or its backbone's weights) passed --dry-run, then fit died in the module's
    constructor with a 20-line traceback and exit code 1."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no backbone weights, whatever is installed
    for dry in ([], ["--dry-run"]):
        err = cli_error("fit", str(R / "cm" / "ict_digits.yaml"), "method.init=scratch", "method.distance=lpips",
                        f"out_dir={tmp_path / 'runs'}", "logger.mode=disabled", *dry)
        assert "method.distance: 'lpips' needs the" in err, err
    assert not (tmp_path / "runs").exists()


def test_a_teacher_the_method_ignores_is_refused(tmp_path, digits_bundle):
    """teacher= on a teacher recipe (or iCT from scratch) was silently ignored."""
    for recipe, extra in ((GMM, []), (R / "cm" / "ict_digits.yaml", ["method.init=scratch"])):
        with pytest.raises(RecipeError) as e:
            fit(recipe, [f"teacher={digits_bundle}", *extra, f"out_dir={tmp_path}"])
        assert e.value.key == "teacher" and e.value.source == "command line"
        assert "with these settings reads no teacher (it would be ignored)" in e.value.reason
    assert not any(tmp_path.iterdir())


def test_a_teacher_on_another_schedule_is_refused_before_the_run(tmp_path, digits_bundle):
    """A CD student on vp_cosine with the digits teacher (vp_discrete) passed --dry-run and failed only in the
    module's setup, after Lightning had started; the teacher's metadata tells its schedule without its weights."""
    for dry in (True, False):
        with pytest.raises(RecipeError) as e:
            fit(R / "cm" / "cd_gmm.yaml", [f"teacher={digits_bundle}", f"out_dir={tmp_path}"], dry_run=dry)
        assert e.value.key == "schedule" and "is not the teacher's" in e.value.reason, e.value
    assert not any(tmp_path.iterdir())


def test_a_cross_field_error_names_where_its_other_key_was_set():
    """method.end_steps=128 on the command line made `recipes/pd/digits.yaml: method.start_steps: 64 must be
    method.end_steps (128) times ...`: the file that set start_steps, not the line that broke it."""
    from dtrain.config import load_recipe

    with pytest.raises(RecipeError) as e:
        load_recipe(PD_DIGITS, ["method.end_steps=128"])
    assert (e.value.source, e.value.key) == ("command line", "method.start_steps")
    assert "method.end_steps (128)" in e.value.reason
    with pytest.raises(RecipeError) as e:  # the key itself set on the command line
        load_recipe(PD_DIGITS, ["method.start_steps=48"])
    assert e.value.source == "command line"


def test_zero3_refuses_only_what_cannot_run():
    """ZeRO-3 refuses MeanFlow and CTM's ``compare: zero``; CTM with ``compare: s``, CD and the teacher pass (their
    only objection on this CPU machine is the GPU one)."""
    from dtrain.config import load_recipe
    from dtrain.dist.strategy import check_strategy

    z3 = ["strategy.name=deepspeed", "strategy.zero_stage=3"]
    for recipe, extra, refused in ((R / "flowmap" / "ctm_gmm.yaml", ["method.compare=s"], False),
                                   (R / "cm" / "cd_gmm.yaml", [], False), (GMM, [], False),
                                   (R / "flowmap" / "ctm_gmm.yaml", [], True), (MEANFLOW, [], True)):
        cfg = load_recipe(recipe, [*z3, *extra], validate=False)
        keys = [k for k, _ in check_strategy(cfg)]
        assert ("strategy.zero_stage" in keys) == refused, (recipe.name, extra, keys)


def test_circular_base_is_named(tmp_path):
    """Two recipes that name each other as base fail with the file, not a RecursionError."""
    (tmp_path / "a.yaml").write_text("base: [b.yaml]\nname: a\n")
    (tmp_path / "b.yaml").write_text("base: [a.yaml]\nname: b\n")
    with pytest.raises(RecipeError, match=r"base: circular base reference"):
        fit(tmp_path / "a.yaml")


def test_defaults_a_user_relies_on():
    """The schema's own defaults (a recipe without recipes/_base/train.yaml gets them): gradient clipping at 1,
    AdamW's betas, one EMA update per step."""
    from dtrain.config import load_recipe

    cfg = load_recipe(None, validate=False)
    assert cfg.optim.grad_clip == 1.0 and list(cfg.optim.betas) == [0.9, 0.999] and cfg.ema.every == 1


def test_an_out_dir_that_cannot_be_written_and_a_batch_split_fail_in_a_dry_run(tmp_path, cli_error):
    """out_dir a file: a NotADirectoryError traceback after the dry run had passed; a global batch the recipe's rank
    count does not divide passed --dry-run and failed at launch."""
    afile = tmp_path / "afile"
    afile.write_text("")
    for dry in ([], ["--dry-run"]):
        err = cli_error("fit", str(GMM), f"out_dir={afile}", *dry)
        assert f"command line: out_dir: cannot create {afile}/teacher-gmm: {afile} is not a directory" in err, err
    err = cli_error("fit", str(GMM), f"out_dir={tmp_path}", "trainer.devices=3", "trainer.accelerator=cpu",
                    "trainer.global_batch_size=100", "--dry-run")
    assert "trainer.global_batch_size: 100 is not a multiple of 3 rank(s)" in err, err
