"""Specification of the perceptual terms as the paper and pMF use them (BIFLOW.md §5, issue 16): a list of nets, each
adaptively weighted and logged apart; ConvNeXt-V2 pooled features; LPIPS weights in the lpips package's own format;
the paired random-resized crop; one-line errors for bad entries. Every pretrained net here is a small one whose
state dict the test writes (nothing is downloaded)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from biflow.config import ConfigError, PerceptualCropConfig, ReverseConfig, ReverseLossConfig, validate
from biflow.models.reverse import ReverseModel
from biflow.objectives.crop import paired_crop, random_resized_boxes
from biflow.objectives.perceptual import build_perceptual, perceptual_distance
from biflow.objectives.perceptual_nets import ConvNeXtV2Features, ConvNeXtV2Pooled, VGG16Features, build_net
from biflow.objectives.reverse import reverse_losses, reverse_step
from biflow.objectives.weighting import adaptive_weight

GEN = lambda seed=0: torch.Generator().manual_seed(seed)  # noqa: E731
DIMS, DEPTHS = (8, 16, 24, 32), (1, 1, 2, 1)  # a small ConvNeXt-V2 in the official layout


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one torch thread (conftest)


def randomized(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded random weights (He-scaled), LayerNorm scales near 1, GRN non-zero (its zero init is a plain block)."""
    gen = GEN(seed)
    with torch.no_grad():
        for m in module.modules():
            for name, p in m.named_parameters(recurse=False):
                if isinstance(m, torch.nn.LayerNorm) and name == "weight":
                    p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
                else:
                    fan_in = p[0].numel() if p.ndim > 1 else 1
                    p.copy_(torch.randn(p.shape, generator=gen) * (math.sqrt(2 / fan_in) if p.ndim > 1 else 0.1))
    return module


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    """A torchvision-keyed VGG16 trunk (width 8) and an official ConvNeXt-V2 checkpoint ('model' nesting, with the
    final LayerNorm `norm.*` and a classifier `head.*`)."""
    root = tmp_path_factory.mktemp("weights")
    vgg = randomized(VGG16Features(base=8), 1)
    torch.save({k.replace("layers.", "features.", 1): v for k, v in vgg.state_dict().items()}, root / "vgg16.pth")
    trunk = randomized(ConvNeXtV2Features(DIMS, DEPTHS), 2).state_dict()
    gen = GEN(3)
    extra = {"norm.weight": 1 + 0.1 * torch.randn(32, generator=gen), "norm.bias": 0.1 * torch.randn(32, generator=gen),
             "head.weight": torch.randn(10, 32, generator=gen), "head.bias": torch.zeros(10)}
    torch.save({"model": {**trunk, **extra}}, root / "convnextv2.pt")
    return {"vgg": str(root / "vgg16.pth"), "convnext": str(root / "convnextv2.pt"), "root": root}


def both_terms(files, w_vgg: float = 0.4, w_cnx: float = 0.1, **loss) -> ReverseLossConfig:
    terms = [{"net": "vgg_lpips", "weight": w_vgg, "weights": files["vgg"]},
             {"net": "convnext_pooled", "weight": w_cnx, "weights": files["convnext"]}]
    return validate(ReverseLossConfig, {"perceptual_terms": [t for t in terms if t["weight"] > 0], **loss})


def reverse_for(flow, seed: int = 0) -> ReverseModel:
    torch.manual_seed(seed)
    model = ReverseModel(ReverseConfig.for_flow(flow.cfg, size="tiny"))
    with torch.no_grad():
        for layer in [b.modulation[-1] for b in model.blocks] + [h.proj for h in model.heads]:
            layer.weight.normal_(std=0.2)
            layer.bias.normal_(std=0.2)
    return model


def grads_of(flow, cfg: ReverseLossConfig, seed: int = 0):
    """Loss terms and G's parameter gradients of one reverse_step, all randomness from the seed."""
    model, pnet = reverse_for(flow), build_perceptual(cfg)
    x = torch.rand((4, *flow.image_shape()), generator=GEN(9)) * 2 - 1
    out = reverse_step(flow, model, x, torch.tensor([0, 1, 2, 0]), cfg, pnet, generator=GEN(seed))
    out["loss"].backward()
    return out, [p.grad.clone() for p in model.parameters()], pnet


# ======================================================== the combined loss
def test_gradients_reach_G_through_both_perceptual_terms_and_not_the_nets(make_flow, weight_files):
    """With only perceptual terms in the loss, each term alone moves G, and both together move it by the sum of the
    two (the same draws): each term reaches G; the frozen nets get no gradient."""
    flow = make_flow(image_size=8, in_channels=3)
    only = dict(recon=0.0, align=0.0)
    out, both, pnet = grads_of(flow, both_terms(weight_files, **only))
    _, vgg, _ = grads_of(flow, both_terms(weight_files, w_cnx=0.0, **only))
    _, cnx, _ = grads_of(flow, both_terms(weight_files, w_vgg=0.0, **only))
    norm = lambda gs: sum(g.norm() ** 2 for g in gs).sqrt()  # noqa: E731
    assert norm(vgg) > 0 and norm(cnx) > 0
    for g, a, b in zip(both, vgg, cnx):
        torch.testing.assert_close(g, a + b, rtol=1e-5, atol=1e-7)
    assert all(p.grad is None and not p.requires_grad for p in pnet.parameters())
    assert torch.allclose(out["loss"], out["perceptual"])


def test_each_term_is_adaptively_weighted_and_logged_apart(make_flow, weight_files):
    """perceptual/<net> = batch mean of sg((d + c)^-p) d for that net's distance d, raw/perceptual/<net> = mean d, and
    the total adds each term times its static weight (0.4 LPIPS, 0.1 ConvNeXt: pMF's)."""
    flow = make_flow(image_size=8, in_channels=3)
    cfg = both_terms(weight_files, adaptive_c=0.05)
    x = torch.rand((4, *flow.image_shape()), generator=GEN(1)) * 2 - 1
    _, traj, _ = flow(x)
    x_pred = x + 0.2 * torch.randn(x.shape, generator=GEN(2))
    pnet = build_perceptual(cfg)
    out = reverse_losses(x_pred, traj[:-1], traj, x, cfg, pnet)
    for label, net in (("vgg_lpips", pnet.nets[0]), ("convnext_pooled", pnet.nets[1])):
        d = perceptual_distance(net, x_pred, x)
        torch.testing.assert_close(out[f"raw/perceptual/{label}"], d.mean())
        torch.testing.assert_close(out[f"perceptual/{label}"], adaptive_weight(d, 1.0, 0.05).mean())
    expected = 0.4 * out["perceptual/vgg_lpips"] + 0.1 * out["perceptual/convnext_pooled"]
    torch.testing.assert_close(out["perceptual"], expected)
    torch.testing.assert_close(out["loss"], out["recon"] + out["align"] + expected)


def test_a_one_term_list_equals_the_single_net_shorthand_bit_for_bit(make_flow):
    """`perceptual: 0.5` (+ perceptual_net) and `perceptual_terms: [{net: random_conv, weight: 0.5}]` give identical
    losses, logs and gradients."""
    flow = make_flow(image_size=8, in_channels=1)
    old = ReverseLossConfig(perceptual=0.5, perceptual_net="random_conv")
    new = validate(ReverseLossConfig, {"perceptual_terms": [{"net": "random_conv", "weight": 0.5}]})
    (out_a, g_a, _), (out_b, g_b, _) = grads_of(flow, old), grads_of(flow, new)
    assert out_a.keys() == out_b.keys() and all(torch.equal(out_a[k], out_b[k]) for k in out_a)
    assert all(torch.equal(a, b) for a, b in zip(g_a, g_b))


# ========================================================== the nets
def test_convnext_pooled_is_the_final_layernorm_of_the_pooled_last_stage(weight_files):
    """convnext_pooled(a, b) = ||LN(mean_hw stage4(a)) - LN(mean_hw stage4(b))||^2 with the checkpoint's `norm.*`,
    written out here from the stage-wise net loaded from the same file; the classifier head is not used."""
    net = build_net("convnext_pooled", weight_files["convnext"])
    assert isinstance(net, ConvNeXtV2Pooled) and not hasattr(net, "head")
    sd = torch.load(weight_files["convnext"], weights_only=True)["model"]
    stages = build_net("convnext", weight_files["convnext"])
    a, b = torch.rand(3, 3, 64, 64, generator=GEN(4)) * 2 - 1, torch.rand(3, 3, 64, 64, generator=GEN(5)) * 2 - 1

    def pooled(x):
        last = stages.features(x)[-1]  # (N, 32, 2, 2): the final stage
        return F.layer_norm(last.mean(dim=(2, 3)), (32,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)

    expected = (pooled(a) - pooled(b)).pow(2).sum(1)
    torch.testing.assert_close(net.distance(a, b), expected, rtol=1e-5, atol=1e-6)
    assert (expected > 0).all()


def test_lpips_format_lin_file_gives_the_same_lin_weights_as_the_native_format(weight_files):
    """The lpips package's vgg.pth (lin{l}.model.1.weight, (1, C, 1, 1)) and our lin.{l} (C,) load to the same lin."""
    root, widths = weight_files["root"], (8, 16, 32, 64, 64)  # VGG16 at width 8: relu1_2 .. relu5_3
    lin = [torch.rand(c, generator=GEN(10 + i)) for i, c in enumerate(widths)]
    torch.save({f"lin{i}.model.1.weight": w.view(1, -1, 1, 1) for i, w in enumerate(lin)}, root / "lpips_vgg.pth")
    native = {**torch.load(weight_files["vgg"], weights_only=True), **{f"lin.{i}": w for i, w in enumerate(lin)}}
    torch.save(native, root / "vgg16_lin.pth")
    a = build_net("vgg_lpips", weight_files["vgg"], root / "lpips_vgg.pth")
    b = build_net("vgg_lpips", root / "vgg16_lin.pth")
    assert len(a.lin) == 5 and all(torch.equal(p, q) and torch.equal(p, w) for p, q, w in zip(a.lin, b.lin, lin))
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, 3, 1, 1) for i in range(5)}, root / "bad_lin.pth")
    with pytest.raises(ConfigError, match="not LPIPS lin weights") as err:
        build_net("vgg_lpips", weight_files["vgg"], root / "bad_lin.pth")
    assert "\n" not in str(err.value)


# ========================================================== the paired crop
def test_the_paired_crop_uses_the_same_box_for_both_images():
    """A coordinate image and the same image plus 0.5 come out of the crop 0.5 apart everywhere: one box per pair;
    different pairs get different boxes."""
    n, side = 6, 32
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, side), torch.linspace(-1, 1, side), indexing="ij")
    a = torch.stack([xs, ys, xs * ys]).expand(n, -1, -1, -1).contiguous()
    ca, cb = paired_crop(a, a + 0.5, 24, (0.08, 1.0), (3 / 4, 4 / 3), GEN(0))
    assert ca.shape == (n, 3, 24, 24)
    torch.testing.assert_close(cb - ca, torch.full_like(ca, 0.5), rtol=0, atol=1e-5)
    assert (ca[1:] - ca[:1]).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # boxes differ between pairs


@pytest.mark.parametrize(("scale", "ratio", "aspect"), [((0.08, 1.0), (3 / 4, 4 / 3), 1.0), ((0.3, 0.5), (0.5, 2.0), 1.5)])
def test_crop_boxes_respect_scale_and_ratio_over_many_draws(scale, ratio, aspect):
    """10000 boxes: inside the image, area fraction in [scale], aspect ratio (width/height in pixels) in [ratio],
    and both ranges are covered to within 5% of their ends."""
    boxes = random_resized_boxes(10000, scale, ratio, aspect, GEN(0))
    left, top, w, h = boxes.unbind(1)
    assert (left >= 0).all() and (top >= 0).all() and (left + w <= 1 + 1e-12).all() and (top + h <= 1 + 1e-12).all()
    area, r = w * h, (w * aspect) / h
    assert area.min() >= scale[0] - 1e-12 and area.max() <= scale[1] + 1e-12
    assert r.min() >= ratio[0] - 1e-9 and r.max() <= ratio[1] + 1e-9
    span = math.log(ratio[1] / ratio[0])
    assert area.min() < scale[0] + 0.05 * (scale[1] - scale[0]) and math.log(r.max() / r.min()) > 0.9 * span


def test_crop_defaults_are_pmf_and_a_number_is_the_old_square_crop():
    crop = validate(ReverseLossConfig, {"perceptual_crop": {}}).perceptual_crop
    assert (crop.size, crop.scale, crop.ratio) == (None, (0.08, 1.0), (3 / 4, 4 / 3))
    assert PerceptualCropConfig.model_validate(0.5).scale == (0.5, 1.0)


# ========================================================== bad input
@pytest.mark.parametrize(("term", "match"), [
    ({"net": "lpips_alex", "weight": 0.4}, "perceptual_terms.0.net"),
    ({"net": "random_conv", "weight": -0.1}, "greater than or equal to 0"),
    ({"net": "convnext_pooled", "weight": 0.1}, "needs weights"),
    ({"net": "random_conv", "weight": 1.0, "lin_weights": "x.pth"}, "has none"),
])
def test_a_bad_perceptual_entry_is_a_one_line_config_error(term, match):
    with pytest.raises(ConfigError, match=match) as err:
        validate(ReverseLossConfig, {"perceptual_terms": [term]}, "exp.yaml")
    assert "\n" not in str(err.value) and str(err.value).startswith("exp.yaml")


def test_a_weights_file_of_the_wrong_architecture_is_a_one_line_config_error(weight_files):
    cfg = validate(ReverseLossConfig, {"perceptual_terms": [{"net": "convnext_pooled", "weight": 0.1, "weights": weight_files["vgg"]}]})
    with pytest.raises(ConfigError, match="not a convnext_pooled state dict") as err:
        build_perceptual(cfg)
    assert "\n" not in str(err.value)


def test_reports_name_random_conv_as_not_the_papers_loss():
    """The report line of the stage-2 distance lists every net with its weight and flags the offline random features."""
    from biflow.config.perceptual import describe_perceptual

    line = describe_perceptual(ReverseLossConfig(perceptual=0.5).perceptual_list())
    assert "random_conv x0.5" in line and "NOT the paper's" in line
    assert describe_perceptual([]) == "MSE only (no perceptual term)"
