"""Specification tests for the BiFlow reverse model G (BIFLOW.md §4).

Most tests randomise the zero-initialised parts (adaLN modulation, projection heads): an untrained G
is the identity trunk with zero heads, so most properties would hold vacuously.
"""
from __future__ import annotations

import pytest
import torch

from biflow.config import REVERSE_SIZES, ConfigError, ForwardConfig, ReverseConfig, validate
from biflow.models.layers import patchify, unpatchify
from biflow.models.reverse import ReverseModel

GEOMETRY = dict(image_size=4, patch_size=2, in_channels=1, num_classes=3)  # 4 tokens of dim 4


def randomize(model: ReverseModel, std: float = 0.2, seed: int = 0) -> ReverseModel:
    """Random adaLN modulation and head weights, so blocks are not the identity and heads not zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layers = [b.modulation[-1] for b in model.blocks] + [h.proj for h in model.heads]
        for layer in layers:
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * std)
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=gen) * std)
    return model.eval()


def make(seed: int = 0, random: bool = True, **overrides) -> ReverseModel:
    torch.manual_seed(seed)
    model = ReverseModel("tiny", **{**GEOMETRY, **overrides})
    return randomize(model, seed=seed) if random else model.eval()


def noise(model: ReverseModel, n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn((n, *model.image_shape()), generator=torch.Generator().manual_seed(seed))


# ================================================================ registry and shapes
@pytest.mark.parametrize("size", list(REVERSE_SIZES))
def test_every_registry_size_runs_with_the_documented_shapes(size):
    """Each named size (depth, B kept; width shrunk) maps z to x (N, C, H, W) and hidden (B, N, T, D)."""
    torch.manual_seed(0)
    model = randomize(ReverseModel(size, width=16, heads=2, **GEOMETRY))
    cfg = model.cfg
    print(f"{size}: depth {cfg.depth}, B {cfg.num_blocks}, segments {cfg.segments}, {model.num_params():,} params at width 16")
    z = noise(model)
    x, hidden = model(z, torch.tensor([0, 1, 2]), torch.tensor([0.0, 1.0, 2.5]))
    assert x.shape == z.shape
    assert hidden.shape == (cfg.num_blocks, 3, cfg.num_tokens, cfg.token_dim)
    assert torch.isfinite(x).all() and torch.isfinite(hidden).all()
    x_null, _ = model(z)  # y=None -> null label, w=None -> 0
    assert x_null.shape == z.shape


def test_B_size_at_paper_geometry_has_about_133M_parameters():
    """BiFlow-B/2: 32x32x4 latent, patch 2 (256 tokens of dim 16), 1000 classes, B = 8 forward blocks."""
    with torch.device("meta"):  # counts parameters without allocating 0.5 GB
        model = ReverseModel("B", image_size=32, patch_size=2, in_channels=4, num_classes=1000, num_blocks=8)
    n = model.num_params()
    print(f"reverse B/2 at paper geometry: {n:,} parameters (paper: 133M)")
    assert model.cfg.num_tokens == 256 and model.cfg.token_dim == 16
    assert 125e6 < n < 140e6


def test_for_flow_copies_geometry_blocks_and_classes():
    fwd = ForwardConfig(size="cpu-paper", image_size=16, patch_size=4, in_channels=3, num_classes=7)
    cfg = ReverseConfig.for_flow(fwd, size="cpu-paper")
    assert (cfg.image_size, cfg.patch_size, cfg.in_channels, cfg.num_classes, cfg.num_blocks) == (16, 4, 3, 7, 8)
    assert cfg.width == REVERSE_SIZES["cpu-paper"]["width"]


# ==================================================================== segments
def test_default_segment_split_is_as_even_as_possible():
    assert ReverseConfig(size="B").segments == [2, 2, 2, 1, 1, 1, 1, 1, 1]  # 12 layers, 8 + 1 segments
    assert ReverseConfig(size="tiny", depth=6).segments == [2, 2, 2]
    model = ReverseModel("tiny", segment_layers=[1, 3, 2], depth=6, **GEOMETRY)
    assert model.bounds == [(0, 1), (1, 4), (4, 6)]


@pytest.mark.parametrize(
    "fields, words",
    [
        (dict(segment_layers=[1, 1]), "segment_layers"),  # B + 1 = 3 entries needed
        (dict(segment_layers=[1, 1, 2]), "segment_layers"),  # sums to 4, depth is 3
        (dict(segment_layers=[0, 2, 1]), "segment_layers"),  # an empty segment
        (dict(depth=2), "depth 2"),  # fewer layers than segments
        (dict(width=30, heads=4), "divisible"),
    ],
    ids=["length", "sum", "empty", "too-shallow", "heads"],
)
def test_bad_segment_split_is_a_one_line_config_error(fields, words):
    with pytest.raises(ConfigError) as err:
        validate(ReverseConfig, {"size": "tiny", **fields}, "reverse")
    assert words in str(err.value) and "\n" not in str(err.value)


# ============================================================ initialisation
def test_untrained_blocks_are_the_identity_and_heads_output_zero():
    """adaLN-Zero: every block returns its input exactly; zero-initialised heads predict 0."""
    model = make(random=False)
    seen = []
    for block in model.blocks:
        block.register_forward_hook(lambda mod, args, out: seen.append((args[0], out)))
    x, hidden = model(noise(model), torch.tensor([0, 1, 2]), 2.0)
    assert len(seen) == model.cfg.depth
    for h_in, h_out in seen:
        assert torch.equal(h_in, h_out)
    assert not x.any() and not hidden.any()


# ================================================================ conditioning
def test_class_and_guidance_scale_change_the_output():
    model = make()
    z = noise(model)
    y = torch.tensor([0, 1, 2])
    x_ref, _ = model(z, y, 1.0)
    assert not torch.allclose(x_ref, model(z, torch.tensor([2, 0, 1]), 1.0)[0], atol=1e-4)
    assert not torch.allclose(x_ref, model(z, y, 2.0)[0], atol=1e-4)
    per_sample_w, _ = model(z, y, torch.tensor([1.0, 2.0, 1.0]))  # w is per sample
    assert torch.allclose(per_sample_w[0::2], x_ref[0::2]) and not torch.allclose(per_sample_w[1], x_ref[1], atol=1e-4)
    null = torch.full((3,), model.cfg.num_classes)
    assert torch.equal(model(z)[0], model(z, null, 0.0)[0])  # defaults: null label, w = 0


# ================================================================== attention
@pytest.mark.parametrize("attention", ["bidirectional", "causal"])
def test_last_token_reaches_the_first_only_with_bidirectional_attention(attention):
    model = make(attention=attention)
    p = model.cfg.patch_size
    z = noise(model)
    z2 = z.clone()
    z2[..., -p:, -p:] += 1.0  # the last token in raster order
    (x, hid), (x2, hid2) = model(z), model(z2)
    first, first2 = patchify(x, p)[:, 0], patchify(x2, p)[:, 0]
    if attention == "bidirectional":
        assert not torch.allclose(first, first2, atol=1e-5)
        assert not torch.allclose(hid[:, :, 0], hid2[:, :, 0], atol=1e-5)
    else:
        assert torch.allclose(first, first2, atol=1e-6)
        assert torch.allclose(hid[:, :, 0], hid2[:, :, 0], atol=1e-6)


# ============================================================ heads and order
def test_hidden_is_ordered_like_the_forward_trajectory():
    """hidden[i] is head B-1-i (the head after segment B-1-i), which predicts trajectory[i]; x is head B."""
    model = make(depth=4, num_blocks=3)
    outs = {}
    for k, head in enumerate(model.heads):
        head.register_forward_hook(lambda mod, args, out, k=k: outs.__setitem__(k, out))
    x, hidden = model(noise(model))
    B = model.cfg.num_blocks
    for i in range(B):
        assert torch.equal(hidden[i], outs[B - 1 - i])
    assert torch.equal(x, unpatchify(outs[B], model.cfg.patch_size, model.cfg.in_channels))


@pytest.mark.parametrize("feedback", [False, True], ids=["alignment", "distillation"])
def test_heads_replace_the_stream_only_with_head_feedback(feedback):
    """Zeroing the last flow head (prediction of x~) cuts z off from the output iff heads are fed back."""
    model = make(head_feedback=feedback)
    z = noise(model)
    x_before, _ = model(z)
    with torch.no_grad():
        model.heads[model.cfg.num_blocks - 1].proj.weight.zero_()
    x_after, _ = model(z)
    x_other, _ = model(noise(model, seed=7))
    if feedback:
        assert torch.allclose(x_after, x_other[:1].expand_as(x_after), atol=1e-6)  # same output for any z
    else:
        assert torch.equal(x_before, x_after)  # heads only read the stream
        assert not torch.allclose(x_after, x_other, atol=1e-4)
