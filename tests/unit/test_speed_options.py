"""Training speed options from the recipe reach what they configure: bf16 autocast (``trainer.precision``),
``trainer.channels_last``, ``trainer.compile``, the AdamW implementation (``optim.impl``), gradient accumulation
(``trainer.accumulate_grad_batches``) and TF32 (``trainer.tf32``). Each runs on the CPU in a few seconds; the
compiled training run itself is in ``tests/e2e/test_compile.py``."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

from dtrain.config import RecipeError, load_recipe
from dtrain.lit.teacher import TeacherModule

ROOT = Path(__file__).resolve().parents[2]
GMM = ROOT / "recipes" / "teacher" / "gmm.yaml"
PATCHES = ROOT / "recipes" / "teacher" / "patches.yaml"
FAST = ["trainer.progress_bar=false", "logger.mode=disabled", "trainer.ckpt_every_n_steps=0",
        "trainer.sample_every_n_steps=0", "trainer.accelerator=cpu"]


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def gmm(tmp_path, *extra):
    return load_recipe(GMM, [f"out_dir={tmp_path}", "model.hidden=16", "model.depth=1", "data.batch_size=16",
                             "data.num_samples=256", "trainer.max_steps=2", *FAST, *extra])


def patches(tmp_path, *extra):
    """A small RGB UNet (3 input channels: NCHW and NHWC layouts differ from the first convolution on)."""
    return load_recipe(PATCHES, [f"out_dir={tmp_path}", "model.channels=8", "model.num_heads=1", "model.resolution=8",
                                 "model.channel_mult=[1,2]", "model.attn_resolutions=[4]", "data.size=8",
                                 "data.num_samples=64", "data.batch_size=8", "trainer.max_steps=1", *FAST, *extra])


def run(cfg, *callbacks):
    """Fit ``cfg`` through ``build_trainer`` (the Trainer of ``dtrain fit``) with extra callbacks."""
    from dtrain.data import build_datamodule
    from dtrain.lit.fit import build_trainer, run_dir

    module = TeacherModule(cfg)
    trainer = build_trainer(cfg, run_dir(cfg), extra_callbacks=list(callbacks))
    trainer.fit(module, datamodule=build_datamodule(cfg.data, seed=0))
    return module, trainer


def test_bf16_mixed_runs_the_network_under_autocast(tmp_path):
    seen: list[torch.dtype] = []

    class Spy(L.Callback):
        def on_train_start(self, trainer, pl_module):
            pl_module.net.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))

    module, trainer = run(gmm(tmp_path, "trainer.precision=bf16-mixed"), Spy())
    assert trainer.precision == "bf16-mixed"
    assert seen and set(seen) == {torch.bfloat16}  # activations in bf16 ...
    assert all(p.dtype == torch.float32 for p in module.net.parameters())  # ... weights and updates in fp32
    _, trainer = run(gmm(tmp_path / "fp32"), Spy())
    assert seen[-1] == torch.float32  # the default stays exact float32


def test_bf16_true_keeps_the_ema_in_float32_and_samples(tmp_path):
    """trainer.precision=bf16-true casts the whole module: the EMA copies are averaged in float32 again (in bf16 a
    lerp by 1 - decay left tensors frozen at their initial value), and the bf16 network samples from float32 noise."""
    start: list[torch.Tensor] = []

    class Start(L.Callback):  # the EMA as training starts (after Lightning's cast), before any update
        def on_train_start(self, trainer, pl_module):
            start.extend(p.detach().float().clone() for p in pl_module.ema["0_999"].parameters())

    module, _ = run(gmm(tmp_path, "trainer.precision=bf16-true", "trainer.max_steps=30", "ema.decays=[0.999]",
                        "optim.lr=1e-2", "optim.warmup_steps=0"), Start())
    ema = module.ema["0_999"]
    assert {p.dtype for p in module.net.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in ema.parameters()} == {torch.float32}
    assert len(start) == len(list(ema.parameters()))
    assert all(not torch.equal(e, s) for e, s in zip(ema.parameters(), start))  # every tensor moved
    g = torch.Generator().manual_seed(0)
    for which in ("default", None):
        assert torch.isfinite(module.sample(4, nfe=2, ema=which, generator=g)).all()


def test_channels_last_reaches_weights_and_inputs(tmp_path):
    seen: list[bool] = []

    class Spy(L.Callback):
        def on_train_start(self, trainer, pl_module):
            pl_module.net.register_forward_pre_hook(
                lambda mod, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))

    def weights(module):  # 3x3 convolutions over several channels: the two layouts differ
        return [m.weight for m in module.net.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[1] > 1
                and m.weight.shape[-1] > 1]

    module, _ = run(patches(tmp_path, "trainer.channels_last=true"), Spy())
    assert weights(module) and all(w.is_contiguous(memory_format=torch.channels_last) for w in weights(module))
    assert seen == [True]  # the RGB batch too
    plain, _ = run(patches(tmp_path / "plain"), Spy())
    assert not any(w.is_contiguous(memory_format=torch.channels_last) for w in weights(plain))
    assert seen == [True, False]


@pytest.mark.parametrize(("impl", "fused", "foreach"),
                         [("fused", True, None), ("foreach", None, True), ("plain", None, False),
                          ("auto", None, True)])  # auto: foreach on the CPU, fused on a GPU
def test_optim_impl_reaches_adamw(tmp_path, impl, fused, foreach):
    module = TeacherModule(gmm(tmp_path, f"optim.impl={impl}"))
    opt = module.configure_optimizers()["optimizer"]
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["fused"] == fused and opt.defaults["foreach"] == foreach
    x = torch.randn(4, 2)
    module.net(x, torch.rand(4) * 1000).square().mean().backward()
    opt.step()  # every implementation steps on the CPU


@pytest.mark.parametrize("impl,foreach", [("auto", True), ("foreach", True), ("plain", False)])
def test_optim_name_radam_builds_radam_with_the_recipes_settings(tmp_path, impl, foreach):
    """optim.name=radam: torch's RAdam with the recipe's lr, betas, eps and weight decay (decoupled, as AdamW's), and
    its step is RAdam's: equal to a fresh torch RAdam's on a copy of the weights (AdamW's differs)."""
    import copy

    module = TeacherModule(gmm(tmp_path, "optim.name=radam", f"optim.impl={impl}", "optim.lr=1e-3",
                               "optim.warmup_steps=0", "optim.betas=[0.8,0.99]", "optim.eps=1e-6",
                               "optim.weight_decay=0.01"))
    opt = module.configure_optimizers()["optimizer"]
    assert type(opt) is torch.optim.RAdam and opt.defaults["foreach"] == foreach
    d = opt.defaults
    assert (d["lr"], d["betas"], d["eps"], d["weight_decay"], d["decoupled_weight_decay"]) == (
        1e-3, (0.8, 0.99), 1e-6, 0.01, True)
    twin = copy.deepcopy(module.net)
    ref = torch.optim.RAdam(twin.parameters(), lr=1e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.01,
                            decoupled_weight_decay=True)
    other = copy.deepcopy(module.net)
    adamw = torch.optim.AdamW(other.parameters(), lr=1e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.01)
    x, t = torch.randn(4, 2), torch.rand(4) * 1000
    for _ in range(7):  # RAdam's rectification switches on after a few steps (rho_t > 5)
        for net, o in ((module.net, opt), (twin, ref), (other, adamw)):
            o.zero_grad()
            (net(x, t) - 1.0).square().mean().backward()  # not 0 - 0: the output layer starts at zero
            o.step()
    for a, b in zip(module.net.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    assert any(not torch.allclose(a, c) for a, c in zip(module.net.parameters(), other.parameters()))


@pytest.mark.parametrize("over,key,needle", [
    (["optim.name=sgd"], "optim.name", "unknown optimizer 'sgd'; choose one of ['adamw', 'radam']"),
    (["optim.name=radam", "optim.impl=fused"], "optim.impl", "torch's RAdam has no fused kernel"),
])
def test_optim_name_is_validated(tmp_path, over, key, needle):
    with pytest.raises(RecipeError) as e:
        gmm(tmp_path, *over)
    assert e.value.key == key and needle in str(e.value)


def test_radam_cannot_be_offloaded():
    """An offloaded DeepSpeed optimizer steps as DeepSpeedCPUAdam: RAdam there is refused by name."""
    with pytest.raises(RecipeError) as e:
        load_recipe(Path(__file__).resolve().parents[2] / "recipes" / "teacher" / "cifar10.yaml",
                    ["optim.name=radam", "optim.impl=foreach", "strategy.name=deepspeed",
                     "strategy.offload_optimizer=true"])
    assert e.value.key == "optim.name" and "DeepSpeedCPUAdam" in str(e.value)


def test_optim_impl_is_validated(tmp_path):
    with pytest.raises(RecipeError, match=r"optim\.impl: must be auto, fused, foreach or plain"):
        gmm(tmp_path, "optim.impl=apex")


def test_gradient_accumulation_steps_once_per_k_batches(tmp_path):
    calls = {"batches": 0, "steps": 0}

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            calls["batches"] += 1

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            calls["steps"] += 1

    _, trainer = run(gmm(tmp_path, "trainer.accumulate_grad_batches=3", "ema.decays=[]"), Spy())
    assert trainer.accumulate_grad_batches == 3
    assert calls == {"batches": 6, "steps": 2} and trainer.global_step == 2


def test_compile_wraps_the_network_in_place(tmp_path):
    module = TeacherModule(gmm(tmp_path, "trainer.compile=true"))
    keys = list(module.state_dict())
    assert module.net._compiled_call_impl is None
    module.setup("fit")
    assert module.net._compiled_call_impl is not None  # nn.Module.compile: compiled on first call
    assert list(module.state_dict()) == keys  # checkpoints keep their keys (no _orig_mod. prefix)
    assert module.ema is not None and all(m._compiled_call_impl is None for m in module.ema.children())
    plain = TeacherModule(gmm(tmp_path))
    plain.setup("fit")
    assert plain.net._compiled_call_impl is None
    for stage, warns in ((3, True), (2, False)):  # ZeRO-3's hooks defeat the compile: said at setup
        cfg = load_recipe(GMM, [f"out_dir={tmp_path}", "model.hidden=16", "model.depth=1", "trainer.compile=true",
                                "strategy.name=deepspeed", f"strategy.zero_stage={stage}"], validate=False)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            TeacherModule(cfg).setup("fit")
        assert any("trainer.compile under ZeRO-3" in str(w.message) for w in seen) == warns


def test_tf32_flag_reaches_the_cuda_backends(tmp_path, monkeypatch):
    from dtrain.lit import fit as fit_mod

    before = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    try:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        assert fit_mod.set_tf32(True) is False and torch.get_float32_matmul_precision() == before[0]  # CPU: exact
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert fit_mod.set_tf32(True) is True
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
        fit_mod.set_tf32(False)
        assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    got: list[bool] = []
    monkeypatch.setattr(fit_mod, "set_tf32", lambda on: got.append(on) or False)
    fit_mod.fit(gmm(tmp_path, "trainer.tf32=false", "trainer.max_steps=1"))
    assert got == [False]  # dtrain fit hands the recipe's value over


def test_cpu_threads_survive_lightning_ddp(monkeypatch):
    """Lightning's DDP sets cpu_count / processes threads unless OMP_NUM_THREADS is set: ``trainer.cpu_threads`` sets
    it, so a one-thread recipe keeps one thread under DDP (two OpenMP threads stall on a shared 2-core machine)."""
    from lightning.fabric.utilities.distributed import _set_num_threads_if_needed

    from dtrain.lit.fit import set_cpu_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("lightning.fabric.utilities.distributed._num_cpus_available", lambda: 8)
    set_cpu_threads(1)
    _set_num_threads_if_needed(num_processes=2)  # what DDPStrategy.setup_environment calls
    assert torch.get_num_threads() == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    _set_num_threads_if_needed(num_processes=2)  # without it: Lightning's choice
    assert torch.get_num_threads() == 4


@pytest.mark.parametrize(("overrides", "fused"), [
    (["strategy.name=ddp", "trainer.precision=bf16-mixed"], True),
    (["strategy.name=ddp", "trainer.precision=16-mixed"], False),  # clipping must see unscaled gradients
    (["strategy.name=ddp", "trainer.precision=16-mixed", "optim.grad_clip=0"], True),
    (["strategy.name=fsdp2", "trainer.precision=bf16-mixed"], False),  # Lightning's plugin refuses to clip for it
    (["strategy.name=fsdp2", "trainer.precision=32-true"], True),
])
def test_auto_impl_on_a_gpu_is_fused_where_clipping_can_run_with_it(tmp_path, overrides, fused):
    module = TeacherModule(gmm(tmp_path, *overrides))
    module._device = torch.device("cuda", 0)  # what configure_optimizers sees on a GPU (the parameters stay here)
    opt = module.configure_optimizers()["optimizer"]
    assert bool(opt.defaults["fused"]) is fused and bool(opt.defaults["foreach"]) is not fused


@pytest.mark.parametrize("overrides", [["trainer.precision=16-mixed"],
                                       ["strategy.name=fsdp2", "trainer.precision=bf16-mixed"]])
def test_fused_adamw_with_clipping_is_refused_where_it_cannot_clip(tmp_path, overrides):
    with pytest.raises(RecipeError, match=r"optim\.impl: fused with optim\.grad_clip=1\.0: .*use optim\.impl=auto"):
        gmm(tmp_path, "optim.impl=fused", *overrides)
    gmm(tmp_path, "optim.impl=fused", "optim.grad_clip=0", *overrides)  # nothing to clip: fine


def test_deepspeed_leaves_clipping_and_gradients_to_its_engine(tmp_path, caplog):
    """Lightning's DeepSpeedStrategy is a DDPStrategy, but the engine holds the gradients and clips them itself:
    the module neither clips nor drops them (a bad step is counted, as the guard documents), and it logs the norm
    the engine computed. Lightning calls the hook after every micro-batch there: the guard judges once per optimizer
    step (at the engine's accumulation boundary), with a NaN of an earlier micro-batch counted."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DeepSpeedStrategy

    module = TeacherModule(gmm(tmp_path))
    strategy = DeepSpeedStrategy(config={"train_micro_batch_size_per_gpu": 1})
    boundary = [False]  # micro-batch 1 of 2, then 2 of 2
    strategy.model = SimpleNamespace(get_global_grad_norm=lambda: 2.5,  # the engine after its step
                                     is_gradient_accumulation_boundary=lambda: boundary[0])
    logged = {}
    module._trainer = SimpleNamespace(strategy=strategy, precision_plugin=SimpleNamespace(), world_size=1,
                                      is_global_zero=True, log_every_n_steps=1, max_steps=10, global_step=1,
                                      should_stop=False)
    module.log_dict = lambda d, **kw: logged.update(d)
    opt = module.configure_optimizers()["optimizer"]
    grads = [torch.full_like(p, 100.0) for p in module.net.parameters()]
    for p, g in zip(module.net.parameters(), grads):
        p.grad = g.clone()
    module.guard.observe(torch.tensor([float("nan")]))
    module.configure_gradient_clipping(opt, 1.0, "norm")
    assert module.guard.total == 0  # not the boundary: nothing judged yet
    module.guard.observe(torch.tensor([1.0]))
    boundary[0] = True
    with caplog.at_level("WARNING", logger="dtrain.guard"):
        module.configure_gradient_clipping(opt, 1.0, "norm")
    assert all(torch.equal(p.grad, g) for p, g in zip(module.net.parameters(), grads))  # not clipped, not dropped
    assert module.guard.total == 1  # the non-finite loss is counted, and the log says what happened
    assert "EMA update skipped (the optimizer step is DeepSpeed's)" in caplog.text
    module.on_train_batch_end(None, None, 0)  # global_step 1: the fake trainer's
    assert logged["train/grad_norm"] == 2.5


def test_the_step_seeds_the_generators_of_the_device_its_batch_is_on(tmp_path, monkeypatch):
    """Under FSDP1 Lightning leaves ``module.device`` at cpu while the step runs on the GPU: the step seeds the
    generators of the device the batch lives on, so noise drawn there replays exactly after a resume."""
    import dtrain.lit.common as common

    seen = []
    monkeypatch.setattr(common, "seed_generators", lambda seed, device: seen.append(device))
    module = TeacherModule(gmm(tmp_path))
    module._device = torch.device("cuda", 0)  # what the module may claim; the batch below is on the CPU
    module.training_step({"x": torch.randn(4, 2)}, 0)
    assert seen == [torch.device("cpu")]


@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_grad_norm_is_unscaled_under_16_mixed(tmp_path, impl):
    """Under 16-mixed, Lightning unscales the gradients before the clipping hook unless the optimizer unscales in its
    own step (fused AdamW): ``train/grad_norm`` is the true norm either way (the scaled one was 2^10 too large)."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    from dtrain.data import build_datamodule

    def norm(amp: bool) -> float:
        cfg = gmm(tmp_path, f"optim.impl={impl}", "optim.grad_clip=0", "trainer.max_steps=1")
        L.seed_everything(0, verbose=False)
        module = TeacherModule(cfg)
        plugins = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))]
        trainer = L.Trainer(accelerator="cpu", devices=1, plugins=plugins if amp else [], max_steps=1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, datamodule=build_datamodule(cfg.data, seed=0))
        return float(module._grad_norm)

    fp16, fp32 = norm(True), norm(False)
    assert fp16 == pytest.approx(fp32, rel=0.02)


def test_sample_grids_of_many_classes_show_a_spread_of_them():
    """ImageNet-64's grid sampled 8 images for each of 1000 classes in one batch (8000, 16000 with CFG: out of
    memory hours into a job); at most 16 classes, spread over the labels, are shown."""
    from types import SimpleNamespace

    from dtrain.lit.callbacks import SampleGrid

    for k, want in ((1000, [0, 67, 133, 200, 266, 333, 400, 466, 533, 599, 666, 733, 799, 866, 932, 999]),
                    (10, list(range(10)))):
        seen = {}

        def sample(labels, generator, seen=seen):
            seen["labels"] = labels
            return torch.zeros(len(labels), 1, 8, 8)

        SampleGrid(100, None).log_grid(SimpleNamespace(loggers=[]), SimpleNamespace(num_classes=k, sample=sample), 100)
        assert seen["labels"].tolist() == [c for c in want for _ in range(8)]
