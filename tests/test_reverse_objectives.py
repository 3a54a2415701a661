"""Specification tests for the reverse-model objectives and samplers (BIFLOW.md §5-6).

The forward flows come from conftest.make_flow (random output projections: not the identity) and are
frozen; reverse models are randomised where an untrained one would make a property hold vacuously.
"""
from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from biflow.config import ConfigError, ReverseConfig, ReverseLossConfig, validate
from biflow.models.layers import patchify, unpatchify
from biflow.models.reverse import ReverseModel
from biflow.objectives.guidance import combine_cfg, draw_guidance, recover_conditional, sample_w
from biflow.objectives.perceptual import build_perceptual, perceptual_distance
from biflow.objectives.perceptual_nets import ConvNeXtV2Features, RandomConvFeatures, VGG16Features
from biflow.objectives.reverse import distance, reverse_losses, reverse_step
from biflow.objectives.weighting import adaptive_weight
from biflow.sampling.applications import edit_class, encode, inpaint, token_mask
from biflow.sampling.onenfe import sample_1nfe

GEN = lambda seed=0: torch.Generator().manual_seed(seed)  # noqa: E731


def reverse_for(flow, seed: int = 0, random: bool = True, **fields) -> ReverseModel:
    """A reverse model matching `flow`; `random` gives it non-zero adaLN modulation and heads."""
    torch.manual_seed(seed)
    model = ReverseModel(ReverseConfig.for_flow(flow.cfg, size="tiny", **fields))
    if random:
        with torch.no_grad():
            for layer in [b.modulation[-1] for b in model.blocks] + [h.proj for h in model.heads]:
                layer.weight.normal_(std=0.2)
                layer.bias.normal_(std=0.2)
    return model


def fake_outputs(flow, n: int = 4, seed: int = 0):
    """(x_clean, trajectory) of a real flow pass, for loss tests that do not need G."""
    x = torch.randn((n, *flow.image_shape()), generator=GEN(seed))
    _, traj, _ = flow(x + flow.cfg.noise_std * torch.randn(x.shape, generator=GEN(seed + 1)))
    return x, traj.detach()


# ========================================================= training-time CFG
def test_combine_with_w_zero_returns_the_plain_output():
    out, out_u = torch.randn(5, 3), torch.randn(5, 3)
    assert torch.equal(combine_cfg(out, out_u, torch.zeros(5)), out)


@pytest.mark.parametrize("batch_dim", [0, 1], ids=["output", "hidden"])
def test_combine_inverts_ordinary_cfg(batch_dim):
    """If G_cfg = G_c + w (G_c - G_u), the recovery (G_cfg + w G_u) / (1 + w) returns G_c, per-sample w."""
    shape = (6, 2, 5) if batch_dim == 0 else (3, 6, 5)  # (N, ...) or (B, N, ...)
    g_c, g_u = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    w = torch.rand(6, dtype=torch.float64) * 3
    wb = w.view([-1 if d == batch_dim else 1 for d in range(3)])
    g_cfg = g_c + wb * (g_c - g_u)
    assert torch.allclose(combine_cfg(g_cfg, g_u, w, batch_dim), g_c, atol=1e-12)


def test_sample_w_is_uniform_on_the_training_range():
    w = sample_w(4000, 3.0, GEN())
    assert w.shape == (4000,) and w.min() >= 0 and w.max() <= 3.0
    assert abs(w.mean().item() - 1.5) < 0.1
    assert torch.equal(w, sample_w(4000, 3.0, GEN()))


def test_dropped_labels_get_the_null_label_and_w_zero():
    y = torch.arange(8) % 3
    y_all, w_all = draw_guidance(y, 3, 1.0, 3.0, 8, torch.device("cpu"), GEN())
    assert (y_all == 3).all() and not w_all.any()
    y_none, w_none = draw_guidance(y, 3, 0.0, 3.0, 8, torch.device("cpu"), GEN())
    assert torch.equal(y_none, y) and (w_none > 0).all()
    assert draw_guidance(None, 3, 0.1, 3.0, 8, torch.device("cpu"))[0] is None


def test_recover_conditional_runs_the_unconditional_pass_only_for_w_above_zero(tiny_flow):
    model = reverse_for(tiny_flow)
    calls = []
    model.register_forward_pre_hook(lambda mod, args: calls.append(torch.is_grad_enabled()))
    z, y = torch.randn(3, *model.image_shape()), torch.tensor([0, 1, 2])
    x, hidden = recover_conditional(model, z, y, torch.zeros(3))
    assert calls == [True] and torch.equal(x, model(z, y, 0.0)[0])  # w = 0: the plain output, one pass
    calls.clear()
    w = torch.tensor([0.5, 1.0, 2.0])
    x, hidden = recover_conditional(model, z, y, w)
    assert calls == [True, False]  # the unconditional pass is a stop-gradient reference
    x_u, h_u = model(z, None, 0.0)
    x_c, h_c = model(z, y, w)
    assert torch.allclose(x, combine_cfg(x_c, x_u, w)) and torch.allclose(hidden, combine_cfg(h_c, h_u, w, 1))
    calls.clear()
    recover_conditional(model, z, y, w, uncond_grad=True)
    assert calls[-1] is True


# ======================================================== adaptive weighting
@pytest.mark.parametrize("p", [0.0, 0.5, 1.0, 2.0])
def test_adaptive_weight_value_and_gradient(p):
    """value D / (D + c)^p; gradient (D + c)^-p * dD (the weight is a stop-gradient)."""
    c = 1e-2
    theta = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    d = (theta**2).mean(1)  # per-sample distances (N,)
    out = adaptive_weight(d, p, c)
    assert torch.allclose(out, d / (d + c) ** p)
    (grad,) = torch.autograd.grad(out.sum(), theta, retain_graph=True)
    (dd,) = torch.autograd.grad(d, theta, grad_outputs=((d + c) ** -p).detach())
    assert torch.allclose(grad, dd, atol=1e-12)


def test_normalized_distance_divides_by_the_target_rms():
    pred, target = torch.randn(4, 10, 3), torch.randn(4, 10, 3) * 5
    mse = ((pred - target) ** 2).flatten(1).mean(1)
    assert torch.allclose(distance(pred, target, False), mse)
    rms2 = target.flatten(1).pow(2).mean(1)
    assert torch.allclose(distance(pred, target, True), mse / rms2, rtol=1e-5)
    assert torch.allclose(distance(7 * pred, 7 * target, True), distance(pred, target, True), rtol=1e-5)  # scale-free
    t = target.clone().requires_grad_(True)
    distance(pred, t, True).sum().backward()
    assert torch.allclose(t.grad, (2 * (t - pred) / (t[0].numel() * rms2.view(-1, 1, 1))).detach(), rtol=1e-4)  # RMS is sg


# ============================================================== reverse losses
def test_perfect_predictions_give_zero_distances(tiny_flow):
    x, traj = fake_outputs(tiny_flow)
    B = tiny_flow.cfg.num_blocks
    out = reverse_losses(x, traj[:B], traj, x, ReverseLossConfig())
    assert out["loss"].item() == 0 and all(out[f"raw/x{i}"] == 0 for i in range(B))


def test_hidden_i_is_compared_with_trajectory_i(tiny_flow):
    x, traj = fake_outputs(tiny_flow)
    hidden = traj[:-1].clone()
    hidden[1] += 0.5
    out = reverse_losses(x, hidden, traj, x, ReverseLossConfig())
    assert out["raw/x0"] == 0 and out["raw/x1"] > 0 and out["raw/recon"] == 0


def test_total_is_the_statically_weighted_sum_of_terms(tiny_flow):
    x, traj = fake_outputs(tiny_flow)
    cfg = ReverseLossConfig(align=0.3, recon=2.0, perceptual=0.5)
    net = build_perceptual(cfg)
    out = reverse_losses(x + 0.1, traj[:-1] + 0.1, traj, x, cfg, net)
    expected = 0.3 * out["align"] + 2.0 * out["recon"] + out["perceptual"]  # 'perceptual' has its static weight in
    assert torch.allclose(out["loss"], expected) and out["perceptual"] > 0
    assert torch.equal(out["perceptual"], 0.5 * out["perceptual/random_conv"])
    with pytest.raises(ConfigError):
        reverse_losses(x, traj[:-1], traj, x, cfg)  # a perceptual term without its net


def test_naive_distillation_ignores_hidden_terms(tiny_flow):
    x, traj = fake_outputs(tiny_flow)
    x_pred = (x + 0.1).requires_grad_(True)
    hidden = torch.randn_like(traj[:-1]).requires_grad_(True)
    out = reverse_losses(x_pred, hidden, traj, x, ReverseLossConfig(strategy="naive_distillation"))
    assert "align" not in out and not any(k.startswith("raw/x") for k in out)
    out["loss"].backward()
    assert hidden.grad is None and x_pred.grad is not None
    other = reverse_losses(x_pred, hidden * 10, traj, x, ReverseLossConfig(strategy="naive_distillation"))
    assert torch.equal(other["loss"], out["loss"])


@pytest.mark.parametrize("denoising", ["none", "score"])
def test_without_learned_denoising_the_output_targets_the_noisy_input(tiny_flow, denoising):
    x, traj = fake_outputs(tiny_flow)
    x_noisy = unpatchify(traj[0], tiny_flow.cfg.patch_size, tiny_flow.cfg.in_channels)
    cfg = ReverseLossConfig(denoising=denoising)
    assert reverse_losses(x_noisy, traj[:-1], traj, x, cfg)["raw/recon"] == 0
    assert reverse_losses(x, traj[:-1], traj, x, cfg)["raw/recon"] > 0
    assert reverse_losses(x, traj[:-1], traj, x, ReverseLossConfig(denoising="learned"))["raw/recon"] == 0


# ================================================================ reverse step
def test_reverse_step_trains_only_the_reverse_model(tiny_flow):
    model = reverse_for(tiny_flow)
    x, y = torch.randn(4, *tiny_flow.image_shape()), torch.tensor([0, 1, 2, 0])
    out = reverse_step(tiny_flow, model, x, y, ReverseLossConfig(), generator=GEN())
    out["loss"].backward()
    assert all(p.grad is None for p in tiny_flow.parameters())
    assert all(p.grad is not None for p in model.parameters())
    assert {"loss", "recon", "align", "raw/recon", "raw/x0", "raw/x1"} <= out.keys()
    assert not any(v.requires_grad for k, v in out.items() if k != "loss")


def test_reverse_step_checks_the_pair(tiny_flow):
    with pytest.raises(ConfigError, match="num_blocks"):
        reverse_step(tiny_flow, reverse_for(tiny_flow, num_blocks=1, depth=2), torch.randn(2, 1, 4, 4), None, ReverseLossConfig())
    with pytest.raises(ConfigError, match="head_feedback"):
        reverse_step(tiny_flow, reverse_for(tiny_flow), torch.randn(2, 1, 4, 4), None, ReverseLossConfig(strategy="hidden_distillation"))


def test_hidden_distillation_runs_with_head_feedback(tiny_flow):
    model = reverse_for(tiny_flow, head_feedback=True)
    out = reverse_step(tiny_flow, model, torch.randn(4, 1, 4, 4), None, ReverseLossConfig(strategy="hidden_distillation"))
    out["loss"].backward()
    assert all(p.grad is not None for p in model.feedback.parameters())


def overfit(flow, strategy: str, steps: int, x: torch.Tensor, y: torch.Tensor):
    """Adam (cosine decay) on one batch; returns (first, last) final-output distance (raw/recon) and the model.

    Guidance training is off (w_max = 0, no label dropout): this isolates "G learns F's inverse";
    the CFG recovery has its own tests above.
    """
    model = reverse_for(flow, random=False, width=64, heads=4, w_max=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    cfg, gen, dists = ReverseLossConfig(strategy=strategy, label_drop=0.0), GEN(2), []
    for _ in range(steps):
        out = reverse_step(flow, model, x, y, cfg, generator=gen)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        sched.step()
        dists.append(out["raw/recon"].item())
    return dists[0], sum(dists[-10:]) / 10, model


def test_overfitting_one_batch_inverts_the_flow(make_flow):
    """Hidden alignment drives G(F(x~)) to x on one batch of 16 digit-like 8x8 images; naive distillation learns too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is fastest, and immune to a busy machine
    try:
        _overfit_one_batch(make_flow)
    finally:
        torch.set_num_threads(threads)


def _overfit_one_batch(make_flow):
    torch.manual_seed(0)
    flow = make_flow(image_size=8, num_classes=10).requires_grad_(False)
    x = F.interpolate(torch.rand(16, 1, 4, 4, generator=GEN(3)) * 2 - 1, size=8, mode="bilinear")  # smooth blobs
    y = torch.arange(16) % 10
    start = time.perf_counter()
    first, last, model = overfit(flow, "hidden_alignment", 200, x, y)
    z = encode(flow, x, y, GEN(4))
    with torch.no_grad():
        mse = ((model(z, y, 0.0)[0] - x) ** 2).mean().item()
    print(f"hidden alignment: distance {first:.3f} -> {last:.3f}, reconstruction MSE {mse:.4f} vs data variance {x.var():.4f}")
    assert mse < 0.1 * x.var().item()
    first, last, _ = overfit(flow, "naive_distillation", 60, x, y)
    print(f"naive distillation: distance {first:.3f} -> {last:.3f}; {time.perf_counter() - start:.1f}s")
    assert last < 0.5 * first


# ================================================================== perceptual
def test_random_conv_distance_is_a_differentiable_frozen_distance():
    net = build_perceptual(ReverseLossConfig(perceptual=1.0)).nets[0]
    assert isinstance(net, RandomConvFeatures) and not any(p.requires_grad for p in net.parameters())
    crop = ReverseLossConfig(perceptual_crop=0.5).perceptual_crop  # the old shorthand: square crops, area >= 0.5
    a, b = torch.rand(3, 1, 8, 8) * 2 - 1, torch.rand(3, 1, 8, 8) * 2 - 1  # grey, below min_size: repeated, upsampled
    assert torch.allclose(perceptual_distance(net, a, a), torch.zeros(3), atol=1e-6)
    assert torch.allclose(perceptual_distance(net, a, a, crop=crop, generator=GEN()), torch.zeros(3), atol=1e-6)
    a.requires_grad_(True)
    d = perceptual_distance(net, a, b, crop=crop, generator=GEN())
    assert d.shape == (3,) and (d > 0).all()
    d.sum().backward()
    assert torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0
    same = RandomConvFeatures()  # seeded: the same net in every process
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), same.parameters()))


def test_pretrained_backends_load_from_a_local_weights_file(tmp_path):
    vgg = VGG16Features(base=8)
    torch.save({k.replace("layers.", "features.", 1): v for k, v in vgg.state_dict().items()}, tmp_path / "vgg.pt")  # torchvision keys
    convnext = ConvNeXtV2Features(dims=(8, 16, 24, 32), depths=(1, 1, 2, 1))
    with torch.no_grad():
        convnext.stages[0][0].grn.gamma.fill_(0.5)
    lin = {f"lin.{k}": torch.rand(d) for k, d in enumerate((8, 16, 24, 32))}  # optional per-channel weights
    torch.save({"model": {**convnext.state_dict(), **lin}}, tmp_path / "convnext.pt")  # official nesting
    a, b = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    for name, ref, file in [("vgg_lpips", vgg, "vgg.pt"), ("convnext", convnext, "convnext.pt")]:
        cfg = ReverseLossConfig(perceptual=1.0, perceptual_net=name, perceptual_weights=str(tmp_path / file))
        net = build_perceptual(cfg).nets[0]
        assert type(net) is type(ref) and not any(p.requires_grad for p in net.parameters())
        assert all(torch.equal(v, net.state_dict()[k]) for k, v in ref.state_dict().items())
        assert (perceptual_distance(net, a, b) > 0).all() and perceptual_distance(net, a, a).abs().max() < 1e-6
    assert len(net.lin) == 4 and torch.equal(net.lin[3], lin["lin.3"])


@pytest.mark.parametrize("weights", [None, "missing.pt", "wrong.pt"])
def test_bad_perceptual_weights_are_a_one_line_config_error(tmp_path, weights):
    """No file: the config is rejected; a missing file or one of another architecture: building the nets is."""
    torch.save({"something": torch.zeros(2)}, tmp_path / "wrong.pt")
    path = None if weights is None else str(tmp_path / weights)
    for name in ("vgg_lpips", "convnext", "convnext_pooled"):
        with pytest.raises(ConfigError) as err:
            build_perceptual(validate(ReverseLossConfig, dict(perceptual=1.0, perceptual_net=name, perceptual_weights=path)))
        assert "\n" not in str(err.value) and name in str(err.value)


# ==================================================================== samplers
def test_sample_1nfe_draws_images_in_one_pass(tiny_flow):
    model = reverse_for(tiny_flow)
    calls = []
    model.register_forward_pre_hook(lambda mod, args: calls.append(1))
    for labels in (None, 2, torch.tensor([0, 1, 2, 0, 1])):
        x = sample_1nfe(model, 5, labels, w=1.5, generator=GEN())
        assert x.shape == (5, *model.image_shape()) and torch.isfinite(x).all()
    assert len(calls) == 3
    assert torch.equal(sample_1nfe(model, 5, 1, generator=GEN()), sample_1nfe(model, 5, 1, generator=GEN()))
    denoised = sample_1nfe(model, 5, 1, generator=GEN(), denoise_flow=tiny_flow)  # denoising='score'
    assert denoised.shape == x.shape and not torch.equal(denoised, sample_1nfe(model, 5, 1, generator=GEN()))


def test_token_mask_keeps_only_fully_known_tokens():
    mask = torch.ones(1, 1, 4, 4)
    mask[0, 0, 0, 0] = 0  # one unknown pixel in token 0; tokens are 2x2 patches
    keep = token_mask(mask, torch.Size([2, 2, 4, 4]), 2)
    assert keep.shape == (2, 2, 4, 4)
    assert not keep[:, :, :2, :2].any() and keep[:, :, 2:, :].all() and keep[:, :, :2, 2:].all()


def noise_of(flow, x, y, generator) -> torch.Tensor:
    """F's noise for x, by the definition the applications document: z = F(x + sigma*eps | y), eps ~ N(0, I)."""
    eps = torch.randn(x.shape, generator=generator)
    with torch.no_grad():
        return flow(x + flow.cfg.noise_std * eps, y)[0]


def test_encode_is_the_flow_applied_to_the_noised_image(tiny_flow):
    """encode(x, y) = F(x + sigma*eps | y) with eps from the generator: the input distribution G was trained on."""
    assert tiny_flow.cfg.noise_std > 0  # else the noising would go unchecked
    x, y = torch.rand(3, 1, 4, 4) * 2 - 1, torch.tensor([0, 1, 2])
    assert torch.equal(encode(tiny_flow, x, y, GEN(7)), noise_of(tiny_flow, x, y, GEN(7)))
    assert not torch.allclose(encode(tiny_flow, x, y, GEN(7)), encode(tiny_flow, x, y, GEN(8)))


def test_inpaint_keeps_the_noise_of_the_known_region(tiny_flow):
    """G sees F's noise of x on the fully known tokens and fresh noise elsewhere; known pixels are pasted back."""
    model = reverse_for(tiny_flow)
    seen = []
    model.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    x, y = torch.rand(2, 1, 4, 4) * 2 - 1, torch.tensor([0, 2])
    mask = torch.zeros(2, 1, 4, 4)
    mask[..., :2, :] = 1  # top half known: tokens 0 and 1
    out = inpaint(tiny_flow, model, x, mask, y, w=1.0, generator=GEN(5))
    z_in, z_ref = patchify(seen[0], 2), patchify(noise_of(tiny_flow, x, y, GEN(5)), 2)
    assert torch.equal(z_in[:, :2], z_ref[:, :2]) and not torch.allclose(z_in[:, 2:], z_ref[:, 2:])
    assert torch.equal(out[..., :2, :], x[..., :2, :])  # known pixels are kept
    assert not torch.allclose(out[..., 2:, :], x[..., 2:, :])


def test_edit_class_encodes_under_the_source_and_decodes_under_the_target(tiny_flow):
    """edit_class(x, 0 -> 2) = G(F(x + sigma*eps | 0), 2): noise taken under the source class, drawn with the target."""
    model = reverse_for(tiny_flow)
    labels = []
    model.register_forward_pre_hook(lambda mod, args: labels.append(args[1]))
    x = torch.rand(2, 1, 4, 4) * 2 - 1
    out = edit_class(tiny_flow, model, x, 0, 2, w=1.0, generator=GEN())
    assert out.shape == x.shape and torch.equal(labels[0], torch.tensor([2, 2]))
    z = noise_of(tiny_flow, x, torch.tensor([0, 0]), GEN())
    assert not torch.allclose(z, noise_of(tiny_flow, x, torch.tensor([2, 2]), GEN()))  # the source class matters
    with torch.no_grad():
        assert torch.allclose(out, model(z, torch.tensor([2, 2]), 1.0)[0])
