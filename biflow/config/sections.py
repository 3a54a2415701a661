"""The configuration sections: pydantic models with defaults, constraints and a description per field.

    ExperimentConfig = data, forward, train_forward, reverse, reverse_loss, train_reverse (+ LatentConfig for a VAE)

Named sizes (`size: digits`, `B`, ...) fill the architecture fields not given explicitly. The geometry of the
reverse model (FLOW_GEOMETRY) is always the forward flow's.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from biflow.config.perceptual import PerceptualCropConfig, PerceptualNetName, PerceptualTermConfig
from biflow.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration problem, reported as one line."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


# ----------------------------------------------------------------------------- data
class DataConfig(Section):
    name: Literal["digits", "patches", "imagefolder", "shards"] = Field("digits", description="built-in dataset or user data")
    source: str | None = Field(None, description="imagefolder: class-per-folder root; shards: a prepared shard directory")
    image_size: int = Field(16, ge=4, le=1024, description="patches/imagefolder: output side (digits are always 8)")
    patches_per_image: int = Field(400, ge=1, description="patches: random crops per bundled photo")
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="held-out fraction (stratified split, seeded by `seed`)")
    rows_per_shard: int = Field(4096, ge=1, description="Parquet shard size")
    seed: int = Field(0, description="split and crop seed")
    workers: int = Field(0, ge=0, description="image decoding processes for imagefolder; 0 = os.cpu_count()")


# ------------------------------------------------------------------ forward flow
FORWARD_SIZES: dict[str, dict[str, Any]] = {
    # name: architecture (geometry comes from the data). Parameter counts are in tests.
    "tiny": dict(width=32, layers_per_block=1, num_blocks=2, heads=2),  # unit tests
    "digits": dict(width=64, layers_per_block=2, num_blocks=4, heads=4),  # CPU demo, minutes
    "S": dict(width=256, layers_per_block=2, num_blocks=4, heads=4),
    "cpu-paper": dict(width=128, layers_per_block=1, num_blocks=8, heads=4),  # paper geometry, CPU width
    "B": dict(width=768, layers_per_block=2, num_blocks=8, heads=12),  # iTARFlow-B/2 ~ 120M at 256x16 tokens
    "XL": dict(width=1152, layers_per_block=5, num_blocks=8, heads=16),  # iTARFlow-XL/2 ~ 690M
}


def _apply_size(data: Any, sizes: dict[str, dict[str, Any]]) -> Any:
    """`size: NAME` fills the architecture fields not given explicitly."""
    if isinstance(data, dict) and data.get("size") is not None:
        name = data["size"]
        if not isinstance(name, str) or name not in sizes:
            raise ValueError(f"unknown size {name!r}; choose one of {sorted(sizes)}")
        data = {**sizes[name], **data}
    return data


class TokenModel(Section):
    """Shared by both networks: the patch-token geometry, the transformer width, and the named sizes."""

    SIZES: ClassVar[dict[str, dict[str, Any]]] = {}
    in_channels: int = Field(1, ge=1, description="image channels (set from the dataset / the forward flow)")
    image_size: int = Field(8, ge=1, description="image side (set from the dataset / the forward flow)")
    patch_size: int = Field(2, ge=1, description="p: tokens are p x p x C patches")
    width: int = Field(64, ge=8, description="transformer width")
    heads: int = Field(4, ge=1, description="attention heads")

    @model_validator(mode="before")
    @classmethod
    def _size_defaults(cls, data: Any) -> Any:
        return _apply_size(data, cls.SIZES)

    @model_validator(mode="after")
    def _check_geometry(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        return self

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def token_dim(self) -> int:
        return self.in_channels * self.patch_size**2


class ForwardConfig(TokenModel):
    SIZES: ClassVar[dict[str, dict[str, Any]]] = FORWARD_SIZES
    size: str | None = Field("digits", description="named size from FORWARD_SIZES; explicit fields override it")
    layers_per_block: int = Field(2, ge=1, description="causal transformer layers per flow block")
    num_blocks: int = Field(4, ge=1, description="B: flow blocks, alternating token order")
    mlp_ratio: float = Field(4.0, gt=0, description="MLP hidden = mlp_ratio * width")
    num_classes: int = Field(10, ge=0, description="0: unconditional; else a null label is added for guidance")
    label_drop: float = Field(0.1, ge=0.0, le=1.0, description="p_drop for classifier-free guidance")
    noise_std: float = Field(0.05, ge=0.0, description="sigma of noise augmentation x~ = x + sigma*eps (data in [-1,1])")
    clip: float | None = Field(4.0, gt=0, description="norm control: a <- c*tanh(a/c); None disables it")
    clip_shift: bool = Field(False, description="also soft-clip the shift b (same c)")
    final_norm: bool = Field(True, description="LayerNorm before each block's output projection (ml-tarflow: none)")
    gelu: Literal["tanh", "exact"] = Field("tanh", description="MLP activation: tanh-approximated or exact (erf) GELU")
    null_label: Literal["learned", "mean"] = Field(
        "learned", description="unconditional label: a learned extra embedding row, or the mean of the class rows (ml-tarflow)")


# ------------------------------------------------------------------ reverse model
FLOW_GEOMETRY = ("in_channels", "image_size", "patch_size", "num_blocks", "num_classes")  # G always copies these from F
REVERSE_SIZES: dict[str, dict[str, Any]] = {
    # name: architecture; num_blocks matches the forward size of the same name (geometry comes from the flow).
    "tiny": dict(width=32, depth=3, heads=2, num_blocks=2),  # unit tests
    "digits": dict(width=64, depth=6, heads=4, num_blocks=4),  # CPU demo
    "S": dict(width=384, depth=12, heads=6, num_blocks=4),  # DiT-S trunk
    "cpu-paper": dict(width=128, depth=9, heads=4, num_blocks=8),  # paper geometry, CPU width
    "B": dict(width=768, depth=12, heads=12, num_blocks=8),  # BiFlow-B/2: ~129M at 256x16 tokens (paper: 133M)
    "L": dict(width=1024, depth=24, heads=16, num_blocks=8),  # DiT-L trunk
    "XL": dict(width=1152, depth=28, heads=16, num_blocks=8),  # DiT-XL trunk
}


class ReverseConfig(TokenModel):
    SIZES: ClassVar[dict[str, dict[str, Any]]] = REVERSE_SIZES
    size: str | None = Field("digits", description="named size from REVERSE_SIZES; explicit fields override it")
    depth: int = Field(6, ge=1, description="total transformer layers over all segments")
    mlp_ratio: float = Field(4.0, gt=0, description="MLP hidden = mlp_ratio * width")
    num_blocks: int = Field(4, ge=1, description="B of the forward flow: B flow segments + 1 denoising segment")
    segment_layers: list[int] | None = Field(
        None, description="layers per segment (B + 1 entries, sum = depth); None = even split")
    attention: Literal["bidirectional", "causal"] = Field("bidirectional", description="causal (raster order) is an ablation")
    head_feedback: bool = Field(
        False, description="False: hidden alignment (heads only read); True: hidden distillation (heads replace the stream)")
    num_classes: int = Field(10, ge=0, description="0: unconditional; else a null label at index num_classes")
    w_max: float = Field(3.0, ge=0, description="training-time CFG: w ~ U[0, w_max]; 0 disables guidance training")

    @model_validator(mode="after")
    def _check_segments(self) -> "ReverseConfig":
        parts = self.num_blocks + 1
        if self.segment_layers is None:
            if self.depth < parts:
                raise ValueError(f"depth {self.depth} < {parts} segments (num_blocks + 1); every segment needs a layer")
        elif len(self.segment_layers) != parts or sum(self.segment_layers) != self.depth or min(self.segment_layers) < 1:
            raise ValueError(
                f"segment_layers {self.segment_layers} must have num_blocks + 1 = {parts} entries >= 1 summing to depth {self.depth}"
            )
        return self

    @classmethod
    def for_flow(cls, forward: ForwardConfig, **fields: Any) -> "ReverseConfig":
        """A reverse config whose geometry, block count and classes match the forward flow's."""
        return cls(**{**{key: getattr(forward, key) for key in FLOW_GEOMETRY}, **fields})

    @property
    def segments(self) -> list[int]:
        """Layers per segment: B flow segments (forward blocks in reverse order), then the denoising segment.

        The default split is as even as possible; the earlier (noisier) segments get the extra layers.
        """
        if self.segment_layers is not None:
            return list(self.segment_layers)
        parts = self.num_blocks + 1
        return [self.depth // parts + (i < self.depth % parts) for i in range(parts)]


class ReverseLossConfig(Section):
    strategy: Literal["hidden_alignment", "naive_distillation", "hidden_distillation"] = Field(
        "hidden_alignment", description="paper's ablation")
    denoising: Literal["learned", "none", "score"] = Field(
        "learned", description="final target: clean x | noisy x~ | x~ + Tweedie step at sampling")
    normalize: bool = Field(
        True, description="reverse-side norm control: divide prediction and target by the target's per-sample RMS")
    distance: Literal["mse"] = Field("mse", description="distance D on trajectory states and the final output")
    align: float = Field(1.0, ge=0, description="static weight of the hidden-alignment sum (one term per forward state)")
    recon: float = Field(1.0, ge=0, description="static weight of the final-output term")
    perceptual: float = Field(
        0.0, ge=0, description="shorthand for one perceptual term on the final output: its static weight (0: off)")
    adaptive_p: float = Field(1.0, ge=0, description="adaptive weighting sg((D + c)^-p) * D; 0 = plain D")
    adaptive_c: float = Field(1e-2, gt=0, description="c of the adaptive weighting")
    label_drop: float = Field(
        0.1, ge=0.0, le=1.0, description="label dropout; dropped samples train the unconditional G with w = 0")
    cfg_uncond_grad: bool = Field(
        False, description="[ours] backprop through the unconditional CFG pass (default: stop-gradient)")
    perceptual_net: PerceptualNetName = Field(
        "random_conv", description="shorthand for one term: its net (random_conv: offline, NOT the paper's nets)")
    perceptual_weights: str | None = Field(
        None, description="shorthand for one term: local state-dict file of a pretrained net (nothing is downloaded)")
    perceptual_terms: list[PerceptualTermConfig] = Field(
        [], description="perceptual terms on the final output, each adaptively weighted and logged apart "
                        "(perceptual/<net>); replaces the perceptual/perceptual_net/perceptual_weights shorthand")
    perceptual_crop: PerceptualCropConfig | None = Field(
        None, description="paired random-resized crop before the perceptual nets ({} = pMF's: 224, scale (0.08, 1), "
                          "ratio (3/4, 4/3)); a number = min area of square crops; None = off")

    @model_validator(mode="after")
    def _one_perceptual_form(self) -> "ReverseLossConfig":
        if self.perceptual_terms and self.perceptual > 0:
            raise ValueError("give the perceptual loss either as perceptual_terms or as the perceptual / perceptual_net / "
                             "perceptual_weights shorthand, not both")
        if not self.perceptual_terms and self.perceptual > 0:
            PerceptualTermConfig(net=self.perceptual_net, weight=self.perceptual, weights=self.perceptual_weights)  # checks
        return self

    def perceptual_list(self) -> list[PerceptualTermConfig]:
        """The active perceptual terms (weight > 0): perceptual_terms, or the shorthand as a one-term list."""
        if self.perceptual_terms:
            return [t for t in self.perceptual_terms if t.weight > 0]
        if self.perceptual > 0:
            return [PerceptualTermConfig(net=self.perceptual_net, weight=self.perceptual, weights=self.perceptual_weights)]
        return []


# ---------------------------------------------------------------------- training
class TrainConfig(Section):
    steps: int = Field(1500, ge=1, description="optimiser steps (defaults: the CPU digits demo, ~5 min on 2 cores)")
    batch_size: int = Field(64, ge=1, description="global batch (split over Ray workers)")
    lr: float = Field(2e-3, gt=0, description="peak learning rate (TARFlow used 1e-4 at ImageNet scale)")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW decoupled weight decay")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2 (TARFlow recipe)")
    warmup_steps: int = Field(100, ge=0, description="linear warm-up, then cosine to min_lr_ratio * lr")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="floor of the cosine schedule")
    grad_clip: float | None = Field(1.0, gt=0, description="global grad-norm clip; None disables")
    ema_decay: float = Field(0.99, ge=0, lt=1, description="EMA of weights (used for sampling/eval); 0.9999 at ImageNet scale")
    log_every: int = Field(50, ge=1, description="steps between log lines / metrics")
    ckpt_every: int = Field(500, ge=1, description="steps between atomic checkpoints")
    seed: int = Field(0, description="torch seed")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    amp: bool = Field(True, description="bf16 autocast on CUDA (ignored on CPU)")
    num_workers: int = Field(0, ge=0, description="Ray Train workers; 0 = in-process")
    compile: bool = Field(
        False, description="torch.compile the model for training (GPU: fewer, fused kernels; the first steps compile)")


# ------------------------------------------------------------------- latent space
class LatentConfig(Section):
    """A frozen VAE between images and the flow's space (biflow.latent; docs/PAPER_SCALE.md)."""

    vae: str = Field(
        description="local directory of a diffusers AutoencoderKL (config.json + weights), or a hub id already in the HF cache")
    subfolder: str | None = Field(None, description='e.g. "vae" inside a whole Stable Diffusion repository')
    mode: Literal["mean", "sample"] = Field(
        "mean", description="posterior mean (deterministic), or one sample seeded by the image's bytes")
    seed: int = Field(0, description='seed of mode "sample"')
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="VAE compute dtype (SD-VAE overflows in float16: bf16 on GPU)")
    storage: Literal["float16", "float32"] = Field("float16", description="element type of the latent shards")
    scaling_factor: float | None = Field(
        None, gt=0, description="None: the VAE config's (SD-VAE: 0.18215, unit-variance latents)")
    shift_factor: float | None = Field(None, description="None: the VAE config's, or 0 (SD3/FLUX VAEs have one)")
    local_files_only: bool = Field(True, description="never download (hub ids must already be in the local cache)")


class ExperimentConfig(Section):
    data: DataConfig = Field(DataConfig(), description="dataset and shards")
    forward: ForwardConfig = Field(ForwardConfig(), description="stage-1 model F")
    train_forward: TrainConfig = Field(TrainConfig(), description="stage-1 optimisation")
    reverse: ReverseConfig = Field(ReverseConfig(), description="stage-2 model G (geometry is copied from F)")
    reverse_loss: ReverseLossConfig = Field(ReverseLossConfig(), description="stage-2 objective")
    train_reverse: TrainConfig = Field(TrainConfig(), description="stage-2 optimisation")
