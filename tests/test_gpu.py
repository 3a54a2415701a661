"""GPU efficiency paths: bf16 autocast, torch.compile, the exact sampler's KV cache and its CUDA graph.

Tests marked `gpu` need CUDA and are skipped, with the reason, on machines without it (CI);
benchmarks/gpu_check.sh runs them on a GPU machine (`pytest -m gpu`). The unmarked tests check, on any
machine, the parts of those paths that do not need a GPU (compile wiring, autocast KV cache, guards).
"""
from __future__ import annotations

import math

import pytest
import torch

from biflow.config import TrainConfig
from biflow.errors import UserError
from biflow.training.forward import forward_step
from biflow.training.loop import Trainer, fit

CUDA = torch.cuda.is_available()
NO_CUDA = "needs CUDA: no GPU on this machine (benchmarks/gpu_check.sh runs it on one)"


def digits_batches(device="cpu"):
    def gen(start: int):
        g = torch.Generator().manual_seed(start)
        while True:
            yield (torch.rand(8, 1, 4, 4, generator=g) * 2 - 1).to(device), torch.randint(0, 3, (8,), generator=g).to(device)
    return gen


# ---------------------------------------------------------------------- any machine
def test_compile_switch_wraps_the_model_and_keeps_bare_checkpoints(make_flow, tmp_path, monkeypatch):
    """TrainConfig.compile=True trains through torch.compile's wrapper; checkpoints hold the bare model's keys and
    resume. (torch.compile runs with the 'eager' backend here: the wiring, not inductor's speed, is under test.)"""
    calls = []
    real_compile = torch.compile

    def eager_compile(model, **kw):
        calls.append(model)
        return real_compile(model, backend="eager")

    monkeypatch.setattr(torch, "compile", eager_compile)
    flow = make_flow(randomize=False).train()
    cfg = TrainConfig(steps=3, batch_size=8, lr=1e-3, warmup_steps=1, log_every=1, ckpt_every=3, compile=True, device="cpu")
    trainer = fit(flow, forward_step(flow.cfg), digits_batches(), cfg, tmp_path / "f.pt", progress=False)
    assert calls == [flow] and type(trainer.model).__name__ == "OptimizedModule" and trainer.net is flow
    state = torch.load(tmp_path / "f.pt", weights_only=True)["model"]
    assert state.keys() == flow.state_dict().keys()  # no `_orig_mod.` prefix
    again = fit(make_flow(randomize=False).train(), forward_step(flow.cfg), digits_batches(),
                cfg.model_copy(update={"steps": 4}), tmp_path / "f.pt", progress=False)
    assert again.step == 4


def test_kv_cache_follows_autocast(tiny_flow):
    """Under (CPU) bf16 autocast the exact inverse keeps its KV cache in bf16, like the keys the layers produce,
    and stays close to the float32 decoding."""
    z, y = torch.randn(3, 1, 4, 4), torch.tensor([0, 1, 2])
    ref = tiny_flow.inverse(z, y, 1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = tiny_flow.inverse(z, y, 1.0)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, atol=0.1, rtol=0.05)


def test_cuda_graph_sampler_refuses_a_cpu_flow(tiny_flow):
    from biflow.sampling import CudaGraphInverse

    with pytest.raises(UserError, match="CUDA device"):
        CudaGraphInverse(tiny_flow, 2)


# ---------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
@pytest.mark.parametrize("kind", ["forward", "reverse"])
def test_bf16_autocast_training_step(kind, make_flow, tmp_path):
    """One optimiser step of either stage under bf16 autocast with fused AdamW: finite, fp32 master weights."""
    from biflow.config import ReverseConfig, ReverseLossConfig
    from biflow.models import ReverseModel
    from biflow.objectives.reverse import reverse_step

    flow = make_flow().cuda()
    cfg = TrainConfig(steps=2, batch_size=8, amp=True, device="cuda")
    if kind == "forward":
        model, step = make_flow(randomize=False).train(), forward_step(flow.cfg)
    else:
        frozen = flow.eval().requires_grad_(False)
        model = ReverseModel(ReverseConfig.for_flow(flow.cfg, size="tiny"))
        step = lambda m, x, y: reverse_step(frozen, m, x, y, ReverseLossConfig())  # noqa: E731
    trainer = Trainer(model, cfg, tmp_path / "t.pt", {})
    assert trainer.opt.defaults["fused"]  # fused AdamW on CUDA
    before = [p.detach().clone() for p in trainer.net.parameters()]
    x, y = next(digits_batches("cuda")(0))
    out = trainer.train_step(step, x, y)
    assert abs(out["loss"]) < 1e6  # finite (train_step raises on NaN/Inf)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.net.parameters()))
    assert all(p.dtype == torch.float32 for p in trainer.net.parameters())  # bf16 activations, fp32 master weights


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
@pytest.mark.parametrize("guidance", [0.0, 1.5])
def test_kv_cache_sampler_on_cuda_equals_cpu(make_flow, guidance):
    """The exact inverse with its preallocated KV cache gives the same x on CUDA as on CPU (float32)."""
    flow = make_flow()
    z, y = torch.randn(5, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1])
    ref = flow.inverse(z, y, guidance)
    got = flow.cuda().inverse(z.cuda(), y.cuda(), guidance).cpu()
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
@pytest.mark.parametrize("amp", [False, True])
def test_cuda_graph_inverse_equals_eager(make_flow, amp):
    """The graph-captured inverse replays the eager decoding: same x for fresh z and labels, guided or not."""
    from biflow.sampling import CudaGraphInverse, sample_exact

    flow = make_flow(image_size=8).cuda()
    dtype = torch.bfloat16 if amp else None
    for guidance in (0.0, 1.0):
        graph = CudaGraphInverse(flow, 4, guidance, amp_dtype=dtype)
        for seed in range(2):
            g = torch.Generator("cuda").manual_seed(seed)
            z = torch.randn(4, 1, 8, 8, device="cuda", generator=g)
            y = torch.randint(0, 3, (4,), device="cuda", generator=g)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                want = flow.inverse(z, y, guidance)
            torch.testing.assert_close(graph(z, y), want, atol=1e-5 if not amp else 2e-2, rtol=1e-5 if not amp else 2e-2)
        x = sample_exact(flow, 4, 1, guidance, denoise=True, generator=torch.Generator("cuda").manual_seed(0), graph=graph)
        assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
def test_compile_path_on_cuda(make_flow, tmp_path):
    """fit with compile=True (inductor) and bf16 autocast on CUDA: finite loss, bare checkpoint."""
    flow = make_flow(randomize=False).train()
    cfg = TrainConfig(steps=3, batch_size=8, lr=1e-3, warmup_steps=1, log_every=1, ckpt_every=3, compile=True, device="cuda")
    trainer = fit(flow, forward_step(flow.cfg), digits_batches("cuda"), cfg, tmp_path / "f.pt", progress=False)
    assert type(trainer.model).__name__ == "OptimizedModule"
    assert math.isfinite(trainer.metrics["loss"])
    assert torch.load(tmp_path / "f.pt", weights_only=True)["model"].keys() == flow.state_dict().keys()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
def test_flop_counter_on_cuda_includes_attention():
    """On CUDA torch's FlopCounterMode also counts SDPA: it equals flops_per_sample with attention."""
    from torch.utils.flop_counter import FlopCounterMode

    from biflow.config import ReverseConfig
    from biflow.models import ReverseModel

    reverse = ReverseModel(ReverseConfig(size="tiny", in_channels=4, image_size=8, num_classes=3)).cuda().eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        reverse(torch.randn(2, 4, 8, 8, device="cuda"), None, 1.0)
    assert counter.get_total_flops() == 2 * reverse.flops_per_sample()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
def test_latent_codec_on_cuda_bf16_channels_last(tmp_path):
    """The VAE on CUDA in bf16 with channels_last gives the CPU float32 latents to bf16 precision."""
    pytest.importorskip("diffusers", reason="diffusers is not installed (optional extra: pip install -e '.[latent]')")
    from biflow.config import LatentConfig
    from biflow.latent import LatentCodec, tiny_vae

    tiny_vae().save_pretrained(tmp_path / "vae")
    cpu = LatentCodec.load(str(tmp_path / "vae"))
    gpu = LatentCodec.load(LatentConfig(vae=str(tmp_path / "vae"), dtype="bfloat16"), "cuda")
    assert gpu.channels_last and not cpu.channels_last
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        ref, got = cpu.encode(x), gpu.encode(x).cpu()
        assert gpu.decode(got.cuda()).shape == (2, 3, 32, 32)
    torch.testing.assert_close(got, ref, atol=0.02 * ref.abs().max().item(), rtol=0.02)  # bf16: ~3 significant digits


def perceptual_latent_step(device: str, amp: bool, tmp_path) -> tuple[dict, Trainer]:
    """One stage-2 optimiser step on 4x4x4 latents with the perceptual loss through a tiny VAE's decoder."""
    from biflow.config import LatentConfig, ReverseConfig, ReverseLossConfig
    from biflow.latent import LatentCodec, tiny_vae
    from biflow.models import ForwardFlow, ReverseModel
    from biflow.objectives.perceptual import build_perceptual
    from biflow.objectives.reverse import reverse_step

    tiny_vae().save_pretrained(tmp_path / "vae")
    codec = LatentCodec.load(LatentConfig(vae=str(tmp_path / "vae"), dtype="bfloat16" if amp else "float32"), device)
    torch.manual_seed(0)
    flow = ForwardFlow("tiny", image_size=4, patch_size=2, in_channels=4, num_classes=3, noise_std=0.3)
    flow = flow.to(device).eval().requires_grad_(False)
    loss_cfg = ReverseLossConfig(perceptual=0.5)
    pnet = build_perceptual(loss_cfg).to(device)
    trainer = Trainer(ReverseModel(ReverseConfig.for_flow(flow.cfg, size="tiny")),
                      TrainConfig(steps=2, batch_size=8, amp=amp, device=device), tmp_path / "t.pt", {})
    x, y = torch.randn(8, 4, 4, 4, device=device), torch.randint(0, 3, (8,), device=device)
    out = trainer.train_step(lambda m, xb, yb: reverse_step(flow, m, xb, yb, loss_cfg, pnet, decoder=codec.decode), x, y)
    assert all(p.grad is None for p in codec.parameters())  # the VAE stays frozen
    return out, trainer


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
def test_bf16_stage_2_step_with_the_perceptual_loss_through_the_vae_decoder(tmp_path):
    """Latent-space stage 2 as the paper-scale pipeline runs it: bf16 autocast, a bf16 channels_last VAE decoder."""
    pytest.importorskip("diffusers", reason="diffusers is not installed (optional extra: pip install -e '.[latent]')")
    out, trainer = perceptual_latent_step("cuda", True, tmp_path)
    assert out["perceptual"] > 0 and abs(out["loss"]) < 1e6
    assert all(p.dtype == torch.float32 for p in trainer.net.parameters())
