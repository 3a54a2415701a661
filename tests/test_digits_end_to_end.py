"""Both stages on the built-in digits: the flow learns, both samplers draw digits, 1-NFE matches the inverse.

The figures printed here (run pytest with -s) are the sanity numbers quoted in the issue notes.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from biflow.cli import main as cli
from biflow.data import to_model, to_uint8
from biflow.sampling import sample_1nfe, sample_exact, tweedie_denoise
from biflow.training.forward import evaluate_bpd

pytestmark = pytest.mark.slow
N = 200  # samples per check (20 per class)


def labels(n: int = N) -> torch.Tensor:
    return torch.arange(n) % 10


def test_stage1_lowers_test_bits_per_dim_well_below_the_untrained_flow(digits_models):
    flow, test = digits_models.flow, digits_models.test
    x, y = to_model(test.images), torch.as_tensor(test.labels)
    untrained = evaluate_bpd(type(flow)(flow.cfg).eval(), x, y)
    trained = evaluate_bpd(flow, x, y)
    print(f"\ntest bits/dim: untrained {untrained:.3f} -> trained {trained:.3f}")
    assert trained < untrained - 1.5


def test_the_exact_sampler_draws_digits_of_the_requested_class(digits_models, digits_evaluator):
    x = sample_exact(digits_models.flow, N, labels(), guidance=1.0, generator=torch.Generator().manual_seed(0))
    acc = digits_evaluator.accuracy(to_uint8(x), labels().numpy())
    print(f"\nexact sampler (g=1, denoised): class accuracy {acc:.2f}")
    assert acc > 0.5  # chance is 0.1


def test_one_network_pass_draws_digits_of_the_requested_class(digits_models, digits_evaluator):
    x = sample_1nfe(digits_models.reverse, N, labels(), w=1.0, generator=torch.Generator().manual_seed(0))
    acc = digits_evaluator.accuracy(to_uint8(x), labels().numpy())
    print(f"\n1-NFE sampler (w=1): class accuracy {acc:.2f}")
    assert acc > 0.5


@torch.no_grad()
def test_the_reverse_model_approximates_the_exact_inverse_on_the_same_noise(digits_models):
    flow, reverse = digits_models.flow, digits_models.reverse
    z = torch.randn(N, *flow.image_shape(), generator=torch.Generator().manual_seed(1))
    exact = tweedie_denoise(flow, flow.inverse(z, labels()), labels())
    one = reverse(z, labels())[0]
    data_var = to_model(digits_models.test.images).var().item()
    mse = (one - exact).pow(2).mean().item()
    print(f"\nMSE(G(z), F^-1(z)) = {mse:.4f} vs data variance {data_var:.4f}")
    assert mse < 0.25 * data_var


def test_stage2_never_changed_the_forward_checkpoint(digits_models):
    assert hashlib.sha256(digits_models.forward_ckpt.read_bytes()).hexdigest() == digits_models.forward_sha


def test_the_sample_command_writes_npz_and_grid_for_both_samplers(digits_models, tmp_path):
    for sampler in ("1nfe", "exact"):
        out = tmp_path / f"{sampler}.npz"
        code = cli(["sample", str(digits_models.reverse_ckpt), "--sampler", sampler, "--num", "12",
                    "--label", "3", "--guidance", "1", "--out", str(out), "--grid"])
        assert code == 0
        data = np.load(out)
        assert data["images"].shape == (12, 8, 8, 1) and data["images"].dtype == np.uint8
        assert (data["labels"] == 3).all()
        assert out.with_suffix(".png").is_file()


def test_the_sample_command_explains_a_wrong_checkpoint_kind(digits_models, tmp_path, capsys):
    code = cli(["sample", str(digits_models.forward_ckpt), "--sampler", "1nfe", "--out", str(tmp_path / "x.npz")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "reverse-model checkpoint" in err


def test_inpainting_keeps_the_known_region_and_fills_the_rest(digits_models, tmp_path):
    out = tmp_path / "inpaint.npz"
    assert cli(["inpaint", str(digits_models.reverse_ckpt), "--keep", "left", "--num", "20", "--out", str(out)]) == 0
    filled, original = np.load(out)["images"], digits_models.test.images[:20]
    np.testing.assert_array_equal(filled[:, :, :4], original[:, :, :4])  # known half is untouched
    assert out.with_suffix(".png").is_file()


def test_class_editing_redraws_images_as_the_target_class(digits_models, digits_evaluator, tmp_path):
    out = tmp_path / "edit.npz"
    assert cli(["edit", str(digits_models.reverse_ckpt), "--to-label", "3", "--num", "40", "--guidance", "1",
                "--out", str(out)]) == 0
    acc = digits_evaluator.accuracy(np.load(out)["images"], np.full(40, 3))
    print(f"\nclass editing to 3: evaluator agrees for {acc:.2f}")
    assert acc > 0.5
