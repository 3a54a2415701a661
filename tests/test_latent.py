"""Latent space: the frozen VAE codec, latent shards, and a latent-space BiFlow run end to end (tiny, CPU).

The VAE is a real diffusers AutoencoderKL (the class of the Stable Diffusion VAE) with tiny blocks and
random weights, saved to disk and loaded back through the same `from_pretrained(local_files_only=True)`
path a pretrained VAE takes. Tests that need diffusers skip, with the reason, where it is not installed.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from biflow.config import DataConfig, ForwardConfig, LatentConfig, ReverseConfig, ReverseLossConfig, TrainConfig
from biflow.data import ShardError, load_split, prepare, to_model
from biflow.errors import UserError
from biflow.latent import (
    LatentCodec,
    LatentShardWriter,
    encode_shards,
    latent_batches,
    latents_from_rows,
    load_latent_split,
    read_latent_manifest,
    read_latent_shards,
    tiny_vae,
)
from biflow.latent.encode import content_noise

NO_DIFFUSERS = "diffusers is not installed (optional extra: pip install -e '.[latent]')"


@pytest.fixture(scope="module")
def diffusers():
    return pytest.importorskip("diffusers", reason=NO_DIFFUSERS)


@pytest.fixture(scope="module")
def vae_dir(diffusers, tmp_path_factory):
    """A tiny random AutoencoderKL saved like a pretrained one (config.json + safetensors)."""
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    tiny_vae(seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def codec(vae_dir):
    return LatentCodec.load(str(vae_dir))


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory):
    """A prepared imagefolder dataset: 2 classes x 6 structured 32x32 RGB images -> train/ and test/ shards."""
    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 32)
    for label, name in enumerate(("bars", "rings")):
        (root / name).mkdir()
        for i in range(6):
            if label == 0:
                base = np.tile(ramp[None, :, None], (32, 1, 3))
            else:
                yy, xx = np.mgrid[:32, :32]
                base = np.repeat((np.hypot(yy - 16, xx - 16) * 16 % 255)[..., None], 3, axis=2)
            img = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{i}.png")
    cfg = DataConfig(name="imagefolder", source=str(root), image_size=32, test_fraction=0.34)
    return prepare(cfg, tmp_path_factory.mktemp("prepared"))


# ----------------------------------------------------------------------------- codec
def test_tiny_vae_is_the_sd_vae_class_with_its_scaling(diffusers, codec):
    """The test VAE is a diffusers AutoencoderKL; downsampling 8 and scaling 0.18215 come from its config."""
    assert isinstance(codec.vae, diffusers.AutoencoderKL)
    assert codec.downsample == 8 and codec.latent_channels == 4
    assert codec.scaling_factor == pytest.approx(0.18215) and codec.shift_factor == 0.0
    assert codec.latent_shape(256) == (4, 32, 32)
    with pytest.raises(ValueError, match="divisible"):
        codec.latent_shape(36)


def test_encode_decode_shapes_and_scaling(codec):
    """uint8 NHWC and float NCHW inputs give the same latents: (N, 4, H/8, W/8) = posterior mean * 0.18215."""
    images = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    x = to_model(images)  # (3, 3, 32, 32) in [-1, 1]
    with torch.no_grad():
        lat = codec.encode(images)
        assert lat.shape == (3, 4, 4, 4) and lat.dtype == torch.float32
        torch.testing.assert_close(codec.encode(x), lat)
        torch.testing.assert_close(lat, codec.vae.encode(x).latent_dist.mean * 0.18215)
        out = codec.decode(lat)
        assert out.shape == (3, 3, 32, 32) and out.dtype == torch.float32
        torch.testing.assert_close(out, codec.vae.decode(lat / 0.18215).sample)
        assert codec.decode_uint8(lat, batch_size=2).shape == (3, 32, 32, 3)


def test_scaling_and_shift_come_from_the_config_or_the_override(vae_dir, tmp_path):
    """A VAE config's scaling/shift factors are used; LatentConfig fields override them."""
    path = tmp_path / "shifted"
    tiny_vae(scaling_factor=0.5, shift_factor=0.1).save_pretrained(path)
    codec = LatentCodec.load(str(path))
    assert (codec.scaling_factor, codec.shift_factor) == (0.5, pytest.approx(0.1))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(codec.encode(x), (codec.vae.encode(x).latent_dist.mean - 0.1) * 0.5)
    override = LatentCodec.load(LatentConfig(vae=str(vae_dir), scaling_factor=1.0))
    assert override.scaling_factor == 1.0


def test_sample_mode_adds_the_posterior_std(vae_dir):
    """mode 'sample': (mean + std * noise) * scale; the shard encoder seeds the noise by image content."""
    codec = LatentCodec.load(LatentConfig(vae=str(vae_dir), mode="sample"))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    noise = torch.randn(2, 4, 2, 2)
    with torch.no_grad():
        post = codec.vae.encode(x).latent_dist
        torch.testing.assert_close(codec.encode(x, noise=noise), (post.mean + post.std * noise) * 0.18215)
    img = np.zeros((16, 16, 3), np.uint8)
    np.testing.assert_array_equal(content_noise(img, 0, (4, 2, 2)), content_noise(img.copy(), 0, (4, 2, 2)))
    assert not np.array_equal(content_noise(img, 0, (4, 2, 2)), content_noise(img, 1, (4, 2, 2)))


def test_codec_is_frozen_but_differentiable(codec):
    """No VAE parameter trains, train() keeps eval mode, and gradients flow through decode to its input."""
    assert not any(p.requires_grad for p in codec.parameters())
    codec.train()
    assert not codec.vae.training
    lat = torch.randn(2, 4, 4, 4, requires_grad=True)
    codec.decode(lat).square().mean().backward()
    assert lat.grad is not None and lat.grad.abs().sum() > 0
    assert all(p.grad is None for p in codec.parameters())


def test_a_missing_vae_is_a_one_line_error(diffusers, tmp_path):
    with pytest.raises(UserError, match="could not be loaded") as err:
        LatentCodec.load(str(tmp_path / "no-such-vae"))
    assert "\n" not in str(err.value)


def test_perceptual_gradient_reaches_the_reverse_model_through_the_frozen_decoder(codec):
    """Perceptual term alone (recon = align = 0): G's parameters get gradient only through the VAE decoder;
    the decoder's parameters get none. Without a decoder, 4-channel latents are rejected."""
    from biflow.models import ForwardFlow, ReverseModel
    from biflow.objectives.perceptual import build_perceptual
    from biflow.objectives.reverse import reverse_step

    torch.manual_seed(0)
    fcfg = ForwardConfig(size="tiny", in_channels=4, image_size=4, patch_size=2, num_classes=2, noise_std=0.3)
    flow = ForwardFlow(fcfg).eval().requires_grad_(False)
    reverse = ReverseModel(ReverseConfig.for_flow(fcfg, size="tiny"))
    for head in reverse.heads:  # non-zero output heads, so the output depends on the trunk
        torch.nn.init.normal_(head.proj.weight, std=0.1)
    loss_cfg = ReverseLossConfig(recon=0.0, align=0.0, perceptual=1.0)
    pnet = build_perceptual(loss_cfg)
    latents, y = torch.randn(3, 4, 4, 4), torch.tensor([0, 1, 0])
    out = reverse_step(flow, reverse, latents, y, loss_cfg, pnet, decoder=codec.decode)
    out["loss"].backward()
    grads = [p.grad for p in reverse.parameters() if p.grad is not None]
    assert grads and sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is None for p in codec.parameters())
    with pytest.raises(ValueError, match="decode latents first"):
        reverse_step(flow, reverse, latents, y, loss_cfg, pnet)


# ------------------------------------------------------------------------ latent shards
def _latent_toy(n: int = 10):
    rng = np.random.default_rng(0)
    lat, lab = rng.normal(size=(n, 4, 2, 2)).astype(np.float32), rng.integers(0, 3, n)
    meta = {"kind": "latent", "name": "t", "split": "train", "num_classes": 3, "class_names": ["a", "b", "c"],
            "latent_shape": [4, 2, 2], "dtype": "float16", "image_shape": [2, 2, 4]}
    return lat, lab, meta


def test_latent_shards_round_trip_without_a_vae(tmp_path):
    """Writer -> reader keeps latents (float16), labels and meta; several parts; corruption is a ShardError."""
    lat, lab, meta = _latent_toy()
    writer = LatentShardWriter(tmp_path, meta, rows_per_shard=4)
    writer.add(lat[:7], lab[:7])
    writer.add(lat[7:], lab[7:])
    manifest = writer.close()
    assert [f["rows"] for f in manifest["files"]] == [4, 4, 2]
    got = read_latent_shards(tmp_path)
    np.testing.assert_array_equal(got.latents, lat.astype(np.float16))
    np.testing.assert_array_equal(got.labels, lab)
    assert got.latent_shape == (4, 2, 2) and got.meta["count"] == 10 and got.content_hash == manifest["content_hash"]
    np.testing.assert_allclose(got.meta["stats"]["mean"], lat.astype(np.float16).astype(np.float64).mean(axis=(0, 2, 3)), atol=1e-6)
    x, y = next(latent_batches(got, 4, seed=0))
    assert x.shape == (4, 4, 2, 2) and x.dtype == torch.float32 and y.dtype == torch.long
    rows = {"latent": np.array([r.tobytes() for r in got.latents[:3]], dtype=object), "label": got.labels[:3]}
    xr, yr = latents_from_rows(rows, got.meta)
    torch.testing.assert_close(xr, torch.from_numpy(got.latents[:3].astype(np.float32)))
    part = tmp_path / manifest["files"][1]["name"]
    part.write_bytes(part.read_bytes()[:-9] + b"corrupted")
    with pytest.raises(ShardError, match="sha256|corrupt"):
        read_latent_shards(tmp_path)


def test_latent_writer_output_is_pinned_byte_for_byte(tmp_path):
    """Content hashes recorded before the latent writer moved onto the shared PartWriter."""
    import pyarrow as pa

    if pa.__version__ != "25.0.1":
        pytest.skip(f"hashes pinned with pyarrow 25.0.1 (Parquet files name their writer), this is {pa.__version__}")
    lat, lab, meta = _latent_toy()
    pinned = {4: "15a02cf8e95a8e37f4fabede", 5: "c011be9d5b61d27f28e0ed9f", 100: "098ec94fba51339f4ab8c09c"}
    for rows_per_shard, want in pinned.items():
        writer = LatentShardWriter(tmp_path / str(rows_per_shard), meta, rows_per_shard)
        writer.add(lat[:7], lab[:7])
        writer.add(lat[7:], lab[7:])
        assert writer.close()["content_hash"].startswith(want)


def test_latent_writer_writes_an_empty_split_as_one_part_and_rejects_bad_batches(tmp_path):
    lat, lab, meta = _latent_toy()
    writer = LatentShardWriter(tmp_path, meta)
    with pytest.raises(ValueError, match=r"expected \(n, 4, 2, 2\)"):
        writer.add(lat[:, :2], lab)
    with pytest.raises(ValueError, match="labels span"):
        writer.add(lat, lab + 3)
    manifest = writer.close()
    assert [f["rows"] for f in manifest["files"]] == [0] and manifest["meta"]["count"] == 0
    got = read_latent_shards(tmp_path)
    assert got.latents.shape == (0, 4, 2, 2) and got.latents.dtype == np.float16 and len(got) == 0


def test_encode_shards_in_process(image_shards, vae_dir, codec, tmp_path):
    """Image shards -> latent shards per split: shapes, geometry meta, the codec's latents, and no rework on rerun."""
    out = encode_shards(image_shards, tmp_path / "latents", str(vae_dir), batch_size=3, use_ray=False)
    train, test = load_latent_split(out, "train"), load_latent_split(out, "test")
    images = load_split(image_shards, "train")
    assert len(train) == len(images) and len(test) == len(load_split(image_shards, "test"))
    assert train.latents.shape[1:] == (4, 4, 4) and train.latents.dtype == np.float16
    assert train.meta["image_shape"] == [4, 4, 4] and train.meta["source_image_shape"] == [32, 32, 3]
    assert train.meta["codec"]["scaling_factor"] == pytest.approx(0.18215)
    assert train.meta["source_hash"] == images.content_hash
    np.testing.assert_array_equal(train.labels, images.labels)
    with torch.no_grad():
        want = codec.encode(images.images).numpy().astype(np.float16)
    np.testing.assert_allclose(train.latents.astype(np.float32), want.astype(np.float32), atol=1e-3)
    before = read_latent_manifest(out / "train")
    mtime = (out / "train" / before["files"][0]["name"]).stat().st_mtime_ns
    encode_shards(image_shards, out, str(vae_dir), batch_size=5, use_ray=False)  # same recipe: nothing rewritten
    assert (out / "train" / before["files"][0]["name"]).stat().st_mtime_ns == mtime
    encode_shards(image_shards, out, LatentConfig(vae=str(vae_dir), mode="sample"), use_ray=False)
    assert read_latent_manifest(out / "train")["content_hash"] != before["content_hash"]


# ------------------------------------------------------------------------ end to end
def test_latent_space_biflow_end_to_end(image_shards, vae_dir, codec, tmp_path):
    """imagefolder shards -> latent shards -> stage 1 on latents -> stage 2 with the perceptual loss through the
    frozen decoder -> 1-NFE and exact samples decoded to images. Tiny and short: it checks the wiring."""
    from biflow.models import ForwardFlow, ReverseModel
    from biflow.objectives.perceptual import build_perceptual
    from biflow.objectives.reverse import reverse_step
    from biflow.sampling import sample_1nfe, sample_exact
    from biflow.training.forward import forward_step
    from biflow.training.loop import fit
    from biflow.training.stages import with_geometry

    root = encode_shards(image_shards, tmp_path / "latents", str(vae_dir), batch_size=8, use_ray=False)
    train = load_latent_split(root, "train")
    fcfg = with_geometry(ForwardConfig(size="tiny", patch_size=2, noise_std=0.3), train.meta)
    assert (fcfg.in_channels, fcfg.image_size, fcfg.num_classes) == (4, 4, 2)
    tcfg = TrainConfig(steps=3, batch_size=4, lr=1e-3, warmup_steps=1, log_every=3, ckpt_every=3)
    data = lambda start: latent_batches(train, tcfg.batch_size, seed=start)  # noqa: E731
    fwd = fit(ForwardFlow(fcfg), forward_step(fcfg, pixels=False), data, tcfg, tmp_path / "forward.pt", progress=False)
    assert np.isfinite(fwd.metrics["loss"]) and np.isfinite(fwd.metrics["nll_noisy_bpd"])

    flow = fwd.ema.module.eval().requires_grad_(False)
    loss_cfg = ReverseLossConfig(perceptual=0.5)
    pnet = build_perceptual(loss_cfg)
    step = lambda model, x, y: reverse_step(flow, model, x, y, loss_cfg, pnet, decoder=codec.decode)  # noqa: E731
    rev = fit(ReverseModel(ReverseConfig.for_flow(fcfg, size="tiny")), step, data, tcfg, tmp_path / "reverse.pt", progress=False)
    assert np.isfinite(rev.metrics["loss"]) and rev.metrics["perceptual"] > 0

    labels = torch.tensor([0, 1, 0])
    samples = {"1nfe": sample_1nfe(rev.ema.module.eval(), 3, labels, 1.0),
               "exact": sample_exact(flow, 3, labels, guidance=1.0, denoise=True)}
    for latents in samples.values():
        assert latents.shape == (3, 4, 4, 4) and torch.isfinite(latents).all()
        images = codec.decode_uint8(latents)
        assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
