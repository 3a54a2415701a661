"""Stage-2 objective: train the reverse model G on pairs (x, F(x~)) from the frozen forward flow F (BIFLOW.md §5).

Terms (each per-sample adaptively weighted, then averaged over the batch):
- align: sum over i = 0..B-1 of D(hidden[i], trajectory[i]), G's head predictions against F's states
  (strategies hidden_alignment and hidden_distillation; naive_distillation has no hidden terms);
- recon: D(x_pred, target) on the final output, target = clean x (denoising 'learned') or x~ =
  trajectory[0] ('none' / 'score'; with 'score' the sampler adds TARFlow's Tweedie step, see sample_1nfe);
- perceptual/<net>: each perceptual term (reverse_loss.perceptual_terms, or the one-net shorthand; none by default),
  a perceptual distance between the same two images, adaptively weighted on its own; 'perceptual' is their sum with
  the static weights. In latent space both images are first decoded to pixels by the frozen VAE decoder
  (`decoder`), G's output with gradient.

With align = recon = 1 the total is the paper's sum over the extended trajectory [x, x^0, ..., x^{B-1}]:
one equally weighted term per state. D is MSE per sample, optionally divided by the target's RMS^2.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from biflow.config import FLOW_GEOMETRY, ConfigError, ForwardConfig, ReverseConfig, ReverseLossConfig
from biflow.models.forward_flow import ForwardFlow
from biflow.models.layers import patchify, unpatchify
from biflow.models.reverse import ReverseModel
from biflow.objectives.guidance import draw_guidance, recover_conditional
from biflow.objectives.perceptual import PerceptualLoss
from biflow.objectives.weighting import adaptive_weight

STRATEGY_FEEDBACK = {"hidden_alignment": False, "hidden_distillation": True}  # head_feedback each strategy needs


def distance(pred: torch.Tensor, target: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Per-sample MSE (N,); `normalize` divides prediction and target by the target's RMS (stop-gradient)."""
    err = (pred.float() - target.float()).flatten(1).pow(2).mean(1)  # (N,)
    if normalize:
        err = err / (target.detach().float().flatten(1).pow(2).mean(1) + 1e-8)  # / RMS^2
    return err


def reverse_losses(
    x_pred: torch.Tensor,
    hidden: torch.Tensor,
    trajectory: torch.Tensor,
    x_clean: torch.Tensor,
    cfg: ReverseLossConfig,
    perceptual_net: PerceptualLoss | None = None,
    generator: torch.Generator | None = None,
    decoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Loss terms of one batch. x_pred, x_clean (N, C, H, W); hidden (B, N, T, D); trajectory (B+1, N, T, D).

    decoder: model space -> images in [-1, 1] (a frozen VAE's `LatentCodec.decode`), applied before the perceptual
    net; G's output is decoded with gradient (it reaches G through the frozen decoder), the target without.

    perceptual_net: the frozen nets of the active perceptual terms (`build_perceptual(cfg)`).

    Returns 'loss' (the weighted total, with gradient) and, detached for logging: each term's adaptively
    weighted batch mean ('recon', 'align', 'perceptual/<net>' per perceptual term) with 'perceptual' = the sum of
    the perceptual terms times their static weights, and the raw distances before the adaptive weights
    ('raw/recon', 'raw/x{i}' per trajectory state, 'raw/perceptual/<net>').
    """
    channels = x_clean.shape[1]
    p = round((trajectory.shape[-1] / channels) ** 0.5)  # patch size from the token dim D = C * p^2
    target = patchify(x_clean, p) if cfg.denoising == "learned" else trajectory[0]  # (N, T, D)
    weigh = lambda d: adaptive_weight(d, cfg.adaptive_p, cfg.adaptive_c).mean()  # noqa: E731

    d = distance(patchify(x_pred, p), target, cfg.normalize)
    terms, raw = {"recon": weigh(d)}, {"raw/recon": d.mean()}
    loss = cfg.recon * terms["recon"]
    if cfg.strategy != "naive_distillation":
        ds = [distance(hidden[i], trajectory[i], cfg.normalize) for i in range(hidden.shape[0])]  # hidden[i] ~ x^i
        terms["align"] = sum(weigh(d) for d in ds)
        raw.update({f"raw/x{i}": d.mean() for i, d in enumerate(ds)})
        loss = loss + cfg.align * terms["align"]
    if cfg.perceptual_list():
        if perceptual_net is None:
            raise ConfigError("reverse loss: a perceptual term needs its nets (see objectives.perceptual.build_perceptual)")
        image_pred, image_target = x_pred, unpatchify(target, p, channels)
        if decoder is not None:
            image_pred = decoder(x_pred)
            with torch.no_grad():
                image_target = decoder(image_target)
        total = 0.0
        for (label, d), weight in zip(perceptual_net(image_pred, image_target, generator).items(), perceptual_net.weights):
            terms[f"perceptual/{label}"], raw[f"raw/perceptual/{label}"] = weigh(d), d.mean()
            total = total + weight * terms[f"perceptual/{label}"]
        terms["perceptual"] = total
        loss = loss + total
    return {"loss": loss, **{k: v.detach() for k, v in {**terms, **raw}.items()}}


def check_pair(flow_cfg: ForwardConfig, reverse_cfg: ReverseConfig, loss_cfg: ReverseLossConfig) -> None:
    """The reverse model must mirror the flow's geometry, blocks and classes, and suit the strategy."""
    for key in FLOW_GEOMETRY:
        f, r = getattr(flow_cfg, key), getattr(reverse_cfg, key)
        if f != r:
            raise ConfigError(f"reverse.{key} = {r} does not match the forward flow's {f}")
    need = STRATEGY_FEEDBACK.get(loss_cfg.strategy)
    if need is not None and reverse_cfg.head_feedback != need:
        raise ConfigError(f"strategy {loss_cfg.strategy!r} needs reverse.head_feedback = {need}")


def reverse_objective(
    flow: ForwardFlow,
    reverse_cfg: ReverseConfig,
    loss_cfg: ReverseLossConfig,
    perceptual_net: PerceptualLoss | None = None,
    decoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Callable[[nn.Module, torch.Tensor, torch.Tensor | None], dict[str, torch.Tensor]]:
    """The stage-2 step function `step(model, x, y) -> reverse_losses(...)` with every config bound.

    The pair is checked once, here; `model` is only called, so it may be wrapped (DDP, torch.compile).
    """
    check_pair(flow.cfg, reverse_cfg, loss_cfg)

    def step(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None) -> dict[str, torch.Tensor]:
        return _batch_losses(flow, model, reverse_cfg, x, y, loss_cfg, perceptual_net, None, decoder)

    return step


def reverse_step(
    flow: ForwardFlow,
    reverse: ReverseModel,
    x_clean: torch.Tensor,
    y: torch.Tensor | None,
    loss_cfg: ReverseLossConfig,
    perceptual_net: PerceptualLoss | None = None,
    generator: torch.Generator | None = None,
    decoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """One stage-2 batch for a bare ReverseModel: x (N, C, H, W), labels y (N,) or None -> reverse_losses(...).

    x~ = x + sigma*eps (sigma = flow.cfg.noise_std); labels dropped (loss_cfg.label_drop) and w ~ U[0, w_max]
    (reverse.cfg.w_max; 0 where dropped); F encodes x~ under the same labels G sees, without gradient;
    G runs on z (plus the unconditional pass for CFG) and the conditional prediction is supervised.
    decoder: latent -> pixels for the perceptual term (see reverse_losses); None in pixel space.
    Training binds the configs once instead (`reverse_objective`).
    """
    check_pair(flow.cfg, reverse.cfg, loss_cfg)
    return _batch_losses(flow, reverse, reverse.cfg, x_clean, y, loss_cfg, perceptual_net, generator, decoder)


def _batch_losses(flow: ForwardFlow, reverse: nn.Module, reverse_cfg: ReverseConfig, x_clean: torch.Tensor,
                  y: torch.Tensor | None, loss_cfg: ReverseLossConfig, perceptual_net: PerceptualLoss | None,
                  generator: torch.Generator | None, decoder: Callable[[torch.Tensor], torch.Tensor] | None):
    n, device = x_clean.shape[0], x_clean.device
    x_noisy = x_clean + flow.cfg.noise_std * torch.randn(x_clean.shape, generator=generator, device=device, dtype=x_clean.dtype)
    y, w = draw_guidance(y, reverse_cfg.num_classes, loss_cfg.label_drop, reverse_cfg.w_max, n, device, generator)
    with torch.no_grad():
        z, trajectory, _ = flow(x_noisy, y)  # dropped labels -> F(x~ | null): G(. | null) learns the unconditional inverse
    x_pred, hidden = recover_conditional(reverse, z, y, w, loss_cfg.cfg_uncond_grad)
    return reverse_losses(x_pred, hidden, trajectory, x_clean, loss_cfg, perceptual_net, generator, decoder)
