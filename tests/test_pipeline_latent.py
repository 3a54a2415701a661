"""A latent-space pipeline end to end on tiny data: prepare -> latent (VAE encoding on Ray Data) -> stage 1 on
latents -> stage 2 with the perceptual loss through the frozen decoder -> evaluation on decoded samples.

The VAE is a real diffusers AutoencoderKL with tiny blocks and random weights (4x downsampling: 16x16 RGB
patches become 4x4x4 latents), saved like a pretrained one and named by `pipeline.latent.vae`.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from biflow.checkpoint import read_checkpoint
from biflow.cli import main
from biflow.pipeline.cache import RECORD, Storage
from biflow.pipeline.runner import plan
from biflow.pipeline.spec import load_pipeline
from test_pipeline import ROOT, TINY, run_cli, table

PATCHES = ROOT / "pipelines" / "patches.yaml"
STEPS = ["prepare", "latent", "train_forward", "train_reverse", "evaluate", "report"]
pytestmark = pytest.mark.usefixtures("local_ray")  # one local Ray for the module (conftest)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    pytest.importorskip("diffusers", reason="diffusers is not installed (optional extra: pip install -e '.[latent]')")
    from biflow.latent import tiny_vae

    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    tiny_vae(downsample=4, seed=0).save_pretrained(path)
    return path


def latent_sets(storage, vae_dir, *extra: str) -> list[str]:
    out = []
    for item in [*TINY, "data.patches_per_image=16", "reverse_loss.perceptual=0.5", f"pipeline.latent.vae={vae_dir}",
                 "pipeline.latent.batch_size=32", f"pipeline.storage={storage}", *extra]:
        out += ["--set", item]
    return out


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory, vae_dir):
    storage = tmp_path_factory.mktemp("latent-pipeline")
    code = main(["run", str(PATCHES), *latent_sets(storage, vae_dir)])
    assert code == 0
    return storage


def only(path):
    (child,) = path.iterdir()
    return child


def test_the_latent_step_encodes_every_split_into_latent_shards(latent_run):
    from biflow.latent import load_latent_split

    step = only(latent_run / "latent")
    train, test = load_latent_split(step / "latents", "train"), load_latent_split(step / "latents", "test")
    assert train.latents.shape[1:] == (4, 4, 4) and train.meta["source_image_shape"] == [16, 16, 3]
    assert len(train) + len(test) == 16 * 9 and train.meta["codec"]["scaling_factor"] == pytest.approx(0.18215)
    record = json.loads((step / RECORD).read_text())["result"]
    assert record["meta"]["latent_shape"] == [4, 4, 4] and record["splits"]["train"]["count"] == len(train)
    assert all(f"latent/channel{c}_std" in record["metrics"] for c in range(4))


def test_ray_data_encoding_writes_the_same_bytes_as_in_process_and_train_workers_read_its_rows(latent_run, vae_dir,
                                                                                              tmp_path):
    """The step's Ray Data batch inference (an actor pool) equals the in-process path, in shard order; a Ray Train
    worker's dataset shard (read_parquet of the latent split) decodes back to the stored latents."""
    import ray.data

    from biflow.latent import encode_shards, latents_from_rows, load_latent_split, read_latent_manifest

    import torch

    step = only(latent_run / "latent") / "latents"
    caller = torch.get_num_threads()
    for threads in (1, 2):  # the caller's thread count does not change the bytes (encoding uses the actors' count)
        torch.set_num_threads(threads)
        local = encode_shards(only(latent_run / "prepare") / "data", tmp_path / f"local{threads}", str(vae_dir),
                              batch_size=32, use_ray=False)  # the step's batch size: the floats depend on it too
        assert torch.get_num_threads() == threads  # and it is restored
        for split in ("train", "test"):
            assert read_latent_manifest(step / split)["content_hash"] == read_latent_manifest(local / split)["content_hash"]
    torch.set_num_threads(caller)
    train = load_latent_split(step, "train")
    rows = ray.data.read_parquet(str(step / "train")).take_batch(len(train), batch_format="numpy")
    x, y = latents_from_rows(rows, train.meta)  # rows in any order: compare them sorted
    assert x.shape == (len(train), 4, 4, 4) and sorted(y.tolist()) == sorted(train.labels.tolist())
    np.testing.assert_array_equal(sorted_rows(x.numpy()), sorted_rows(train.latents.astype(np.float32)))


def sorted_rows(a: np.ndarray) -> np.ndarray:
    flat = a.reshape(len(a), -1)
    return flat[np.lexsort(flat.T[::-1])]


def test_stage_1_trains_on_latents_and_the_checkpoints_record_the_vae_and_the_images(latent_run, vae_dir):
    fwd = read_checkpoint(only(latent_run / "train_forward") / "forward.pt")
    rev = read_checkpoint(only(latent_run / "train_reverse") / "reverse.pt")
    assert fwd["config"]["in_channels"] == 4 and fwd["config"]["image_size"] == 4  # the latent geometry
    for ckpt in (fwd, rev):
        assert ckpt["latent"]["vae"] == str(vae_dir)
        assert ckpt["data_dir"].startswith(str(latent_run / "prepare"))  # evaluation's reference: the images
        assert ckpt["latent_dir"].startswith(str(latent_run / "latent"))
    assert rev["reverse_loss"]["perceptual"] == 0.5


def test_samples_are_decoded_to_images_and_the_vae_cost_is_reported_apart(latent_run):
    report = json.loads((only(latent_run / "report") / "report.json").read_text())
    for sampler in ("1nfe", "exact"):
        res = report["samplers"][sampler]
        assert res["ms_per_image"] > 0 and res["decode_ms_per_image"] > 0
    assert "VAE decoding" in (only(latent_run / "report") / "report.md").read_text()
    grid = np.asarray(Image.open(only(latent_run / "evaluate") / "samples_1nfe.png"))
    assert grid.ndim == 3 and grid.shape[2] == 3  # RGB images, not 4-channel latents


def test_a_rerun_is_cached_and_vae_settings_change_only_latent_and_downstream(latent_run, vae_dir, capsys):
    code, out, _ = run_cli(capsys, "run", str(PATCHES), *latent_sets(latent_run, vae_dir, "pipeline.latent.workers=2"))
    assert code == 0 and table(out, STEPS) == {s: "cached" for s in STEPS}  # execution settings: same keys
    cfg = load_pipeline(PATCHES, [item for item in latent_sets(latent_run, vae_dir, "pipeline.latent.mode=sample")
                                  if item != "--set"])
    assert [(p.name, p.action) for p in plan(cfg, Storage(str(latent_run)))] == \
        [("prepare", "cached")] + [(s, "run") for s in STEPS[1:]]


def test_biflow_sample_decodes_a_latent_checkpoint(latent_run, tmp_path, capsys):
    out = tmp_path / "samples.npz"
    code, _, _ = run_cli(capsys, "sample", str(only(latent_run / "train_reverse") / "reverse.pt"), "--num", "4",
                         "--out", str(out))
    assert code == 0
    images = np.load(out)["images"]
    assert images.shape == (4, 16, 16, 3) and images.dtype == np.uint8 and images.std() > 0


@pytest.mark.parametrize("command", [("inpaint", "--keep", "top"), ("edit", "--to-label", "1")])
def test_inpainting_and_class_editing_run_in_latent_space_on_images(latent_run, tmp_path, capsys, command):
    out = tmp_path / "out.npz"
    code, _, _ = run_cli(capsys, command[0], str(only(latent_run / "train_reverse") / "reverse.pt"), *command[1:],
                         "--num", "3", "--out", str(out))
    assert code == 0
    assert np.load(out)["images"].shape == (3, 16, 16, 3)  # encoded with the VAE, decoded back to RGB


def test_biflow_eval_scores_decoded_samples_of_a_latent_checkpoint(latent_run, tmp_path, capsys):
    """`biflow eval` on a latent reverse checkpoint scores the VAE-decoded samples against the 16x16 RGB training
    images (not latents): fd_evaluator equals the Fréchet distance recomputed from the same draws (noise seed 0,
    balanced labels, batches of 8, decoded by the checkpoint's VAE) under the evaluator the command trained."""
    from biflow.checkpoint import load_checkpoint
    from biflow.data import load_split
    from biflow.metrics import FeatureStats, as_uint8_nhwc
    from biflow.metrics.evaluator import load_or_train_evaluator
    from biflow.sampling import sample_1nfe
    from biflow.sampling.draw import image_decoder

    path = only(latent_run / "train_reverse") / "reverse.pt"
    out = tmp_path / "eval.json"
    code, stdout, _ = run_cli(capsys, "eval", str(path), "--num", "16", "--batch", "8", "--repeats", "1",
                              "--cache-dir", str(tmp_path / "metrics"), "--out", str(out))
    assert code == 0 and "decode_ms_per_image" in stdout
    result = json.loads(out.read_text())
    assert result["nfe"] == 1 and result["decode_ms_per_image"] > 0 and result["num_samples"] == 16

    ckpt = read_checkpoint(path)
    assert ckpt.get("denoising") != "score"  # so the command's 1-NFE samples are G's output itself
    train = load_split(ckpt["data_dir"], "train")
    assert train.images.shape[1:] == (16, 16, 3) and result["num_reference"] == len(train)
    evaluator = load_or_train_evaluator(train.images, train.labels, content_hash=train.content_hash,
                                        cache_dir=tmp_path / "metrics")
    assert evaluator.info["from_cache"]  # the evaluator the command trained and cached
    reverse, decode, gen = load_checkpoint(path), image_decoder(ckpt), torch.Generator().manual_seed(0)
    labels = torch.arange(16) % reverse.cfg.num_classes
    with torch.no_grad():
        images = np.concatenate([as_uint8_nhwc(decode(sample_1nfe(reverse, 8, labels[i:i + 8], 0.0, generator=gen)))
                                 for i in (0, 8)])
    assert images.shape == (16, 16, 16, 3)
    fd = FeatureStats.from_features(evaluator.features(train.images)).frechet(
        FeatureStats.from_features(evaluator.features(images)))
    assert result["fd_evaluator"] == pytest.approx(fd, rel=1e-4)
