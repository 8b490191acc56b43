"""Networks, embeddings and EMA: sizes against peers, exact math of attention / embeddings / averages."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dtrain.models import MODELS, build_denoiser, build_model, count_params
from dtrain.models.ema import EMA, decay_tag, gamma_to_std, power_beta, std_tag, std_to_gamma
from dtrain.models.embeddings import sinusoidal
from dtrain.models.mlp import MLP
from dtrain.models.unet import AttentionBlock, UNet

DDPM_CIFAR10 = dict(in_channels=3, resolution=32, channels=128, channel_mult=[1, 2, 2, 2], num_res_blocks=2,
                    attn_resolutions=[16], num_heads=1, dropout=0.1, scale_shift=False)


def tiny_unet(**kw) -> UNet:
    cfg = dict(in_channels=1, resolution=8, channels=32, channel_mult=[1, 2], num_res_blocks=1, attn_resolutions=[4],
               num_heads=2, dropout=0.0, num_classes=10)
    return UNet(**{**cfg, **kw})


def test_ddpm_cifar10_size_matches_diffusers_and_paper():
    """DDPM's CIFAR-10 network (35.7M parameters, arXiv 2006.11239) = diffusers' UNet2DModel, to the parameter."""
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        ours = count_params(UNet(**DDPM_CIFAR10))
        ref = diffusers.UNet2DModel(
            sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
    assert ours == count_params(ref) == 35_746_307


def test_adm_imagenet64_size():
    """ADM's class-conditional ImageNet-64 (ch 192, mult 1,2,3,4, 3 blocks, attn 32/16/8, 64-ch heads): ~296M."""
    with torch.device("meta"):
        n = count_params(UNet(3, 64, 192, [1, 2, 3, 4], 3, [32, 16, 8], head_channels=64, resblock_updown=True,
                              num_classes=1000))
    assert 295e6 < n < 297e6


@pytest.mark.parametrize("kw", [{}, {"scale_shift": False}, {"resblock_updown": True}, {"head_channels": 16},
                                {"channel_mult": [1, 2, 2], "attn_resolutions": [4, 2]}])
def test_unet_shapes_and_zero_init(kw):
    net = tiny_unet(**kw)
    x = torch.randn(3, 1, 8, 8)
    out = net(x, torch.tensor([1.0, 500.0, 999.0]), torch.tensor([0, 3, 10]))
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(out))  # output conv starts at zero (ADM)


def test_unet_uses_time_and_class():
    torch.manual_seed(0)
    net = tiny_unet()
    for p in net.parameters():  # leave zero init so outputs depend on every input
        torch.nn.init.normal_(p, std=0.05)
    x, c = torch.randn(2, 1, 8, 8), torch.tensor([10.0, 10.0])
    y = torch.tensor([1, 2])
    base = net(x, c, y)
    assert not torch.allclose(base, net(x, c + 100, y))
    assert not torch.allclose(base, net(x, c, torch.tensor([3, 4])))
    null = torch.tensor([10, 10])  # label num_classes is the null class; cond=None means it too
    assert torch.equal(net(x, c, null), net(x, c, None))


def test_unet_rejects_bad_geometry():
    with pytest.raises(ValueError, match=r"model.resolution"):
        UNet(1, 6, 32, [1, 2, 2], 1, [])
    with pytest.raises(ValueError, match=r"model\.num_heads: must divide the width of every level with attention "
                                         r"\[32, 64\]"):
        UNet(1, 8, 32, [1, 2], 1, [8], num_heads=3)
    with pytest.raises(ValueError, match=r"model\.head_channels: must divide the width .* \[64\]"):
        UNet(1, 8, 32, [1, 2], 1, [4], head_channels=48)  # was a ZeroDivisionError (32 // 48 heads)
    # only the levels with attention (and the middle block) split into heads: 96-wide level 0 has none
    UNet(1, 8, 96, [1, 2], 1, [4], head_channels=64)  # was refused: 64 does not divide 96
    with pytest.raises(ValueError, match=r"model\.channels: must be even .*got 33"):  # was an error at the first
        UNet(1, 8, 33, [1, 2], 1, [4], num_heads=1)  # forward naming no field


def test_attention_equals_naive_multihead_softmax():
    torch.manual_seed(0)
    blk = AttentionBlock(16, heads=4)
    torch.nn.init.normal_(blk.proj.weight, std=0.2)
    x = torch.randn(2, 16, 3, 5)
    h = blk.norm(x)
    q, k, v = blk.qkv(h).flatten(2).chunk(3, dim=1)  # [B, C, N] each
    outs = []
    for i in range(4):  # heads take consecutive channel groups of 4
        qi, ki, vi = (z[:, 4 * i: 4 * i + 4] for z in (q, k, v))
        a = torch.softmax(torch.einsum("bcn,bcm->bnm", qi, ki) / math.sqrt(4), dim=-1)
        outs.append(torch.einsum("bnm,bcm->bcn", a, vi))
    ref = x + blk.proj(torch.cat(outs, 1).reshape(2, 16, 3, 5))
    torch.testing.assert_close(blk(x), ref, rtol=1e-5, atol=1e-5)


def test_sinusoidal_closed_form():
    c = torch.tensor([0.0, 3.0])
    e = sinusoidal(c, 8)
    w = torch.tensor([10000 ** (-k / 4) for k in range(4)])
    torch.testing.assert_close(e[1], torch.cat([torch.cos(3 * w), torch.sin(3 * w)]))
    torch.testing.assert_close(e[0], torch.cat([torch.ones(4), torch.zeros(4)]))
    with pytest.raises(ValueError):
        sinusoidal(c, 7)


def test_mlp_shapes_and_conditioning():
    torch.manual_seed(0)
    net = MLP(dim=2, hidden=32, depth=2, num_classes=3)
    x, c = torch.randn(5, 2), torch.full((5,), 100.0)
    assert torch.equal(net(x, c, None), torch.zeros(5, 2))
    torch.nn.init.normal_(net.out[-1].weight)
    assert not torch.allclose(net(x, c, torch.zeros(5, dtype=torch.long)), net(x, c, None))


def test_build_model_and_denoiser_from_recipe_section():
    from dtrain.diffusion.schedule import make_schedule

    cfg = {"name": "unet", "param": "v", "sigma_data": 0.5, "input_scaling": False, "clip_x0": 1.0,
           **{k: v for k, v in DDPM_CIFAR10.items()}, "channels": 32, "num_classes": 10}
    net = build_model(cfg)
    assert isinstance(net, UNet) and net.num_classes == 10
    den = build_denoiser(cfg, make_schedule("ddpm"))
    assert den.param == "v" and den.clip_x0 == 1.0 and den.sigma_data == 0.5
    with pytest.raises(TypeError, match=r"chanels"):
        build_model({**cfg, "chanels": 3})
    with pytest.raises(KeyError, match=r"model.name.*choose one of"):
        build_model({"name": "dit"})
    assert MODELS.names() == ["mlp", "unet"]


# ---- EMA ------------------------------------------------------------------------------------------------------


def test_ema_tags():
    assert decay_tag(0.999) == "0_999" and decay_tag(0.9999) == "0_9999" and std_tag(0.05) == "std0_050"
    net = torch.nn.Linear(2, 2)
    ema = EMA(net, [0.999], [0.05])
    assert ema.tags == ["0_999", "std0_050"]
    assert sorted(ema.state_dict()) == ["0_999.bias", "0_999.weight", "std0_050.bias", "std0_050.weight"]
    with pytest.raises(KeyError, match=r"no copy"):
        ema["0_99"]
    with pytest.raises(ValueError, match=r"ema\.stds: 0\.0504 gives the copy name 'std0_050' of another entry"):
        EMA(net, [], [0.05, 0.0504])  # one copy would silently take the second rate
    with pytest.raises(ValueError, match=r"ema\.decays: 0\.999 gives the copy name '0_999'"):
        EMA(net, [0.999, 0.999])


def test_power_ema_gamma_matches_edm2():
    """EDM2 (arXiv 2312.02696, Sec. 3.1): sigma_rel 0.10 <-> gamma 6.94, 0.05 <-> gamma 16.97."""
    assert std_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)
    assert std_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
    for g in (0.5, 3.0, 40.0):
        assert std_to_gamma(gamma_to_std(g)) == pytest.approx(g, rel=1e-9)
    with pytest.raises(ValueError, match=r"ema.stds"):
        std_to_gamma(0.3)


def _scalar_net(v: float) -> torch.nn.Module:
    net = torch.nn.Linear(1, 1, bias=False)
    net.weight.data.fill_(v)
    return net


def test_fixed_decay_ema_closed_form():
    net = _scalar_net(2.0)
    ema = EMA(net, [0.9], start_step=2)
    thetas = [2.0, 3.0, 5.0, 7.0, 11.0]
    expect = 0.0
    for step, th in enumerate(thetas, 1):
        net.weight.data.fill_(th)
        ema.update(net, step)
        expect = th if step <= 2 else 0.9 * expect + 0.1 * th  # a plain copy until start_step
        assert float(ema["0_9"].weight) == pytest.approx(expect, rel=1e-6)


def test_ema_update_with_the_callers_decay():
    """``update(beta=)``: that decay for every copy after ``start_step`` (a plain copy up to it still)."""
    net = _scalar_net(2.0)
    ema = EMA(net, [0.9], stds=[0.1], start_step=1)
    expect = 0.0
    for step, (th, beta) in enumerate([(7.0, 0.3), (3.0, 0.5), (5.0, 0.8)], 1):  # step 1: 7, not the initial 2
        net.weight.data.fill_(th)
        ema.update(net, step, beta=beta)
        expect = th if step <= 1 else beta * expect + (1 - beta) * th
        assert [float(ema[t].weight) for t in ema.tags] == pytest.approx([expect] * 2, rel=1e-6)


def test_power_ema_is_the_closed_form_weighted_average():
    """beta_t = (1 - 1/t)^(g+1) gives theta_T = sum_t (1 - beta_t) (t/T)^(g+1) theta_t exactly."""
    gamma = std_to_gamma(0.1)
    net = _scalar_net(0.0)
    ema = EMA(net, [], [0.1])
    T = 200
    theta = torch.linspace(-1.0, 3.0, T, dtype=torch.float64) ** 2
    for t in range(1, T + 1):
        net.weight.data.fill_(float(theta[t - 1]))
        ema.update(net, t)
    w = torch.tensor([(1 - power_beta(gamma, t)) * (t / T) ** (gamma + 1) for t in range(1, T + 1)],
                     dtype=torch.float64)
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-12)
    assert float(ema["std0_100"].weight) == pytest.approx(float((w * theta).sum()), rel=1e-5)
    # and its profile is ~ t^gamma: the exact power average of the same sequence is close
    tt = torch.arange(1, T + 1, dtype=torch.float64)
    assert float(ema["std0_100"].weight) == pytest.approx(float((tt**gamma * theta).sum() / (tt**gamma).sum()),
                                                          rel=0.02)


def test_power_ema_every_k_steps_is_the_closed_form_over_its_snapshots():
    """Updates every k steps with beta_t = (1 - k/t)^(g+1) telescope the same way over the snapshots t = k, 2k, ...:
    theta_T = sum_t (1 - beta_t) (t/T)^(g+1) theta_t (weights summing to 1). A beta that ignored k kept too much
    of the start."""
    gamma, k, T = std_to_gamma(0.1), 4, 200
    net = _scalar_net(0.0)
    ema = EMA(net, [], [0.1], every=k)
    theta = torch.linspace(-1.0, 3.0, T, dtype=torch.float64) ** 2
    for t in range(1, T + 1):
        net.weight.data.fill_(float(theta[t - 1]))
        ema.update(net, t)
    snaps = range(k, T + 1, k)
    w = torch.tensor([(1 - power_beta(gamma, t, k)) * (t / T) ** (gamma + 1) for t in snaps], dtype=torch.float64)
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-12)
    want = float((w * theta[[t - 1 for t in snaps]]).sum())
    assert float(ema["std0_100"].weight) == pytest.approx(want, rel=1e-5)
    assert ema.beta("std0_100", 8) == pytest.approx((1 - 4 / 8) ** (gamma + 1))


def test_ema_every_and_eval_mode():
    net = torch.nn.Sequential(torch.nn.Linear(1, 1, bias=False), torch.nn.Dropout(0.5))
    net[0].weight.data.fill_(1.0)
    ema = EMA(net, [0.5], every=2)
    ema.train()
    assert not ema["0_5"].training  # averaged copies never train
    ema.update(net, 1)  # skipped: not a multiple of every
    net[0].weight.data.fill_(3.0)
    ema.update(net, 2)  # beta = 0.5^2
    assert float(ema["0_5"][0].weight) == pytest.approx(0.25 * 1 + 0.75 * 3)
    assert not any(p.requires_grad for p in ema.parameters())


def test_ema_update_follows_foreach_lerp_on_all_float_tensors():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = EMA(net, [0.9])
    before = {k: v.clone() for k, v in ema["0_9"].state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
        net[1].running_mean.add_(2.0)
    ema.update(net, 5)
    after, src = ema["0_9"].state_dict(), net.state_dict()
    for k, v in before.items():
        if v.is_floating_point():
            torch.testing.assert_close(after[k], 0.9 * v + 0.1 * src[k])
        else:  # integer buffers (num_batches_tracked) are not averaged
            assert torch.equal(after[k], v)


def test_ema_tensor_cache_follows_replaced_tensors():
    """The update's tensor lists are reused between steps, but never stale: a cast of the module (new buffer
    objects), a new source network, a deepcopy or a strategy's own ``sources`` all read the current tensors."""
    import copy

    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = EMA(net, [0.5])
    ema.update(net, 1)
    assert ema._cache is not None and ema._cache[1][0] is net[0].weight
    parent = torch.nn.ModuleDict({"net": net, "ema": ema}).double()  # .double() replaces every buffer object
    assert ema._cache is None
    with torch.no_grad():
        net[1].running_mean.fill_(4.0)
    ema.update(net, 2)
    assert float(ema["0_5"][1].running_mean[0]) == pytest.approx(2.0)  # 0.5 * 0 + 0.5 * 4: the new buffer
    other = copy.deepcopy(net)
    with torch.no_grad():
        other[1].running_mean.fill_(6.0)
    ema.update(other, 3)  # another network: its own tensors
    assert float(ema["0_5"][1].running_mean[0]) == pytest.approx(4.0)
    twin = copy.deepcopy(parent)
    assert twin["ema"]._cache is None and ema._cache is not None
    ema.sources = lambda n: [t * 0 for t in EMA._tensors(n)]  # a strategy's fresh tensors: never cached
    ema.update(net, 4)
    assert ema._cache is None and float(ema["0_5"][1].running_mean[0]) == pytest.approx(2.0)


def test_unet_gradcheck_small_net_is_differentiable():
    net = tiny_unet(channels=8, num_heads=1)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    F.mse_loss(net(x, torch.tensor([3.0, 4.0]), torch.tensor([1, 2])), torch.zeros_like(x)).backward()
    assert x.grad is not None and all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_grad_checkpoint_recomputes_stages_and_keeps_the_gradients():
    """``grad_checkpoint``: every stage's forward runs again in the backward (its activations were not kept), dropout
    replayed, so the gradients equal the plain network's; eval mode and no-grad forwards are not checkpointed."""
    from dtrain.models.unet import ResBlock

    kw = dict(in_channels=1, resolution=8, channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
              num_heads=2, dropout=0.3, num_classes=3)
    nets = [UNet(**kw), UNet(**kw, grad_checkpoint=True)]
    nets[1].load_state_dict(nets[0].state_dict())
    for n in nets:  # zero-initialised output layers would hide most gradients
        for p in n.parameters():
            p.data.add_(0.05 * torch.randn_like(p))
    nets[1].load_state_dict(nets[0].state_dict())
    calls = [0, 0]
    for i, n in enumerate(nets):
        for m in n.modules():
            if isinstance(m, ResBlock):
                m.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
    x, c, y = torch.randn(4, 1, 8, 8), torch.rand(4) * 1000, torch.tensor([0, 1, 2, 3])
    grads = []
    for n in nets:
        torch.manual_seed(0)
        n(x, c, y).square().mean().backward()
        grads.append([p.grad for p in n.parameters()])
    blocks = sum(isinstance(m, ResBlock) for m in nets[0].modules())
    assert calls[0] == blocks and blocks < calls[1] <= 2 * blocks  # recomputed (up to what the backward needs)
    done = calls[1]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    nets[1].eval()
    nets[1](x, c, y).sum().backward()
    nets[1].train()
    with torch.no_grad():
        nets[1](x, c, y)
    assert calls[1] == done + 2 * blocks  # one forward each, no recomputation


def test_grad_checkpoint_skips_a_call_with_detached_weights():
    """CTM's stop-gradient jump calls the training network through ``torch.func.functional_call`` with detached
    weights, the gradient flowing to the input only: checkpointing it recomputed with the trainable weights after the
    call and failed the backward ("Recomputed values ... have different metadata")."""
    kw = dict(in_channels=1, resolution=8, channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
              num_heads=2, dropout=0.0, grad_checkpoint=True)
    net = UNet(**kw).train()
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    h = net(x, torch.rand(2) * 1000)  # checkpointed: the weights train
    sg = {k: v.detach() for k, v in net.named_parameters()}
    out = torch.func.functional_call(net, sg, (h, torch.rand(2) * 1000))
    out.square().sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in net.parameters() if p.ndim > 1)
