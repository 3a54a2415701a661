"""The frozen feature networks of the perceptual terms (objectives.perceptual): each maps images in [-1, 1] to features
and defines its own per-sample distance.

- `vgg_lpips`: VGG16 conv features tapped at relu1_2 .. relu5_3, like LPIPS [paper's first perceptual loss].
- `convnext`: ConvNeXt-V2 stage outputs, compared LPIPS-style (stage-wise).
- `convnext_pooled`: ConvNeXt-V2 final-stage global average pool -> final LayerNorm, squared L2 [pMF's ConvNeXt loss].
- `random_conv`: a fixed, seeded, randomly initialised multi-scale conv net (the offline default).

Pretrained nets read a LOCAL state-dict file (`torch.load(weights_only=True)`), nothing is downloaded: torchvision's
`vgg16` state dict (`features.{i}.*` keys), an official ConvNeXt-V2 checkpoint (any size; nested under "model" or
not), and optionally the LPIPS channel weights in the lpips package's own file (its `weights/v0.1/vgg.pth`).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from biflow.checkpoint import load_tensor_file
from biflow.config import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PerceptualNet(nn.Module):
    """Frozen feature extractor: features(x (N, 3, H, W) in [-1, 1]) -> list of (N, C_l, H_l, W_l)."""

    min_size = 32  # images with a smaller side are upsampled to this
    pretrained = True  # reads a weights file (a crop then defaults to 224 px)

    def __init__(self):
        super().__init__()
        self.lin = nn.ParameterList()  # optional per-channel weights, one (C_l,) vector per layer

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    @property
    def num_layers(self) -> int:
        """Feature maps returned by `features`."""
        return len(self.stages)

    def freeze(self) -> "PerceptualNet":
        self.eval()
        self.requires_grad_(False)
        return self

    def load_weights(self, sd: dict[str, torch.Tensor]) -> "PerceptualNet":
        """Load every parameter from sd (extra keys, e.g. a classifier, are ignored) and any LPIPS lin weights in it."""
        missing = [k for k in self.state_dict() if k not in sd]
        if missing:
            raise KeyError(f"missing {missing[0]} and {len(missing) - 1} more")
        self.load_state_dict({k: sd[k] for k in self.state_dict()})
        return self.load_lin(sd, required=False)

    def load_lin(self, sd: dict[str, torch.Tensor], required: bool = True) -> "PerceptualNet":
        """Per-channel LPIPS weights, one per feature layer, in either format: ours (`lin.{l}`, shape (C_l,)) or the
        lpips package's own (`lin{l}.model.1.weight`, shape (1, C_l, 1, 1), as in its vgg.pth)."""
        lin = []
        for key in ("lin.{}", "lin{}.model.1.weight"):
            while key.format(len(lin)) in sd:
                lin.append(sd[key.format(len(lin))].flatten().float())
            if lin:
                break
        if not lin:
            if required:
                raise KeyError("no lin.{l} or lin{l}.model.1.weight keys (LPIPS channel weights)")
            return self
        if len(lin) != self.num_layers:
            raise KeyError(f"{len(lin)} lin weights for {self.num_layers} feature layers")
        if self.num_layers:
            widths = [p.numel() for p in lin]
            expected = self.layer_widths()
            if widths != expected:
                raise KeyError(f"lin weights for {widths} channels, the net's layers have {expected}")
        self.lin = nn.ParameterList(nn.Parameter(p) for p in lin)
        return self

    def layer_widths(self) -> list[int]:
        """Channels of each feature layer (probed on a zero image)."""
        with torch.no_grad():
            return [f.shape[1] for f in self.features(torch.zeros(1, 3, self.min_size, self.min_size))]

    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """LPIPS-style (N,): mean over layers l of mean_{h,w} sum_c lin_c (u_l - v_l)^2 of channel-unit features.

        (LPIPS sums over its 5 layers; the mean is LPIPS / 5, a constant factor.)"""
        per_layer = []
        for k, (u, v) in enumerate(zip(self.features(a), self.features(b))):
            d = (F.normalize(u, dim=1) - F.normalize(v, dim=1)) ** 2  # (N, C_l, H_l, W_l), unit features per position
            if len(self.lin):
                d = d * self.lin[k].view(1, -1, 1, 1)
            per_layer.append(d.sum(1).mean(dim=(1, 2)))
        return torch.stack(per_layer).mean(0)


class ImageNetInput(PerceptualNet):
    """Nets trained on ImageNet: [-1, 1] -> ImageNet-normalised input (non-persistent buffers)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return ((x + 1) / 2 - self.mean) / self.std


# ------------------------------------------------------------------------ VGG16
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
VGG16_TAPS = (3, 8, 15, 22, 29)  # indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in `layers`


class VGG16Features(ImageNetInput):
    """VGG16 conv trunk in torchvision's index layout (`features.{i}` keys load as `layers.{i}`)."""

    def __init__(self, base: int = 64):
        super().__init__()
        modules, c = [], 3
        for v in VGG16_LAYOUT:
            if v == "M":
                modules.append(nn.MaxPool2d(2))
            else:
                out = v * base // 64
                modules += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU()]
                c = out
        self.layers = nn.Sequential(*modules)

    @property
    def num_layers(self) -> int:
        return len(VGG16_TAPS)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> "VGG16Features":
        """Width inferred from the first conv (64 = the real VGG16); torchvision's keys are renamed."""
        sd = {k.replace("features.", "layers.", 1): v for k, v in sd.items()}
        return cls(base=sd["layers.0.weight"].shape[0]).load_weights(sd)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, out = self.normalize(x), []
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i in VGG16_TAPS:
                out.append(h)
        return out


# --------------------------------------------------------------- ConvNeXt-V2
class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of (N, C, H, W)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class GRN(nn.Module):
    """ConvNeXt-V2 global response normalisation on channels-last (N, H, W, C)."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = x.norm(p=2, dim=(1, 2), keepdim=True)  # (N, 1, 1, C)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * nx) + self.beta + x


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.grn = GRN(4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dwconv(x).permute(0, 2, 3, 1)  # (N, H, W, C)
        h = self.pwconv2(self.grn(F.gelu(self.pwconv1(self.norm(h)))))
        return x + h.permute(0, 3, 1, 2)


class ConvNeXtV2Features(ImageNetInput):
    """ConvNeXt-V2 trunk (official key layout; defaults = the 'atto' variant); features = the 4 stage outputs."""

    min_size = 64  # total stride 32: a 64 px input leaves a 2x2 last stage

    def __init__(self, dims: tuple[int, ...] = (40, 80, 160, 320), depths: tuple[int, ...] = (2, 2, 6, 2)):
        super().__init__()
        self.downsample_layers = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4), LayerNorm2d(dims[0], eps=1e-6))]
            + [nn.Sequential(LayerNorm2d(dims[i - 1], eps=1e-6), nn.Conv2d(dims[i - 1], dims[i], 2, stride=2)) for i in range(1, len(dims))]
        )
        self.stages = nn.ModuleList(nn.Sequential(*(ConvNeXtBlock(d) for _ in range(n))) for d, n in zip(dims, depths))

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> "ConvNeXtV2Features":
        """Widths and depths inferred from the keys, so any ConvNeXt-V2 variant loads."""
        sd = sd.get("model", sd)  # official checkpoints nest the state dict under "model"
        stages = sorted({int(k.split(".")[1]) for k in sd if k.startswith("stages.")})
        if not stages:
            raise KeyError("no stages.* keys")
        dims = [sd[f"downsample_layers.{i}.{0 if i == 0 else 1}.weight"].shape[0] for i in stages]
        depths = [1 + max(int(k.split(".")[2]) for k in sd if k.startswith(f"stages.{i}.")) for i in stages]
        return cls(tuple(dims), tuple(depths)).load_weights(sd)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, out = self.normalize(x), []
        for down, stage in zip(self.downsample_layers, self.stages):
            h = stage(down(h))
            out.append(h)
        return out


class ConvNeXtV2Pooled(ConvNeXtV2Features):
    """ConvNeXt-V2 as pMF's perceptual net ("following arXiv 2512.10953"): the final stage's global average pool, then
    the final LayerNorm (`norm.*`; the classifier `head.*` is dropped), compared by squared L2 per sample."""

    def __init__(self, dims: tuple[int, ...] = (40, 80, 160, 320), depths: tuple[int, ...] = (2, 2, 6, 2)):
        super().__init__(dims, depths)
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)

    @property
    def num_layers(self) -> int:
        return 0  # no LPIPS channel weights

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.normalize(x)
        for down, stage in zip(self.downsample_layers, self.stages):
            h = stage(down(h))
        return [self.norm(h.mean(dim=(-2, -1)))]  # (N, C)

    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """||f(a) - f(b)||^2 per sample (N,)."""
        return (self.features(a)[0] - self.features(b)[0]).pow(2).sum(1)


# -------------------------------------------------------------- random features
class RandomConvFeatures(PerceptualNet):
    """A fixed, seeded, randomly initialised multi-scale conv net: a random-feature perceptual distance.

    This is NOT the paper's VGG-LPIPS / ConvNeXt-V2 loss. It is the default because those need
    pretrained weights and nothing can be downloaded here. Untrained conv features still respond to
    local structure (edges, textures) at several scales, so the distance compares images beyond pixel
    MSE; it carries no learned notion of semantics. Pass a weights file to use the paper's backends.
    """

    pretrained = False

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128, 256), seed: int = 0):
        super().__init__()
        stages, c = [], 3
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(nn.Conv2d(c, w, 3, stride=stride, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1), nn.ReLU()))
            c = w
        self.stages = nn.ModuleList(stages)
        gen = torch.Generator().manual_seed(seed)  # independent of the global RNG: the same net everywhere
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    fan_in = m.weight[0].numel()
                    m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * math.sqrt(2 / fan_in))  # He init
                    m.bias.zero_()

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return out


# ------------------------------------------------------------------- factory
BACKENDS = {"vgg_lpips": VGG16Features, "convnext": ConvNeXtV2Features, "convnext_pooled": ConvNeXtV2Pooled}


def _read(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    sd = load_tensor_file(path, what, ConfigError)
    if not isinstance(sd, dict):
        raise ConfigError(f"{path}: {what} must be a state dict, got {type(sd).__name__}")
    return sd


def load_backend(name: str, path: str | Path | None, lin_path: str | Path | None = None) -> PerceptualNet:
    """A pretrained net from local files; a missing file or one of another architecture is a one-line ConfigError."""
    if path is None:
        raise ConfigError(f"perceptual net {name!r} needs weights: a local state-dict file (nothing is downloaded)")
    sd = _read(path, f"perceptual weights for {name!r}")
    try:
        net = BACKENDS[name].from_state_dict(sd)
    except Exception as err:  # a state dict of another architecture
        raise ConfigError(f"{path}: not a {name} state dict ({type(err).__name__}: {err})".splitlines()[0]) from None
    if lin_path is not None:
        try:
            net.load_lin(_read(lin_path, f"LPIPS lin weights for {name!r}"))
        except KeyError as err:
            raise ConfigError(f"{lin_path}: not LPIPS lin weights for {name} ({err})".splitlines()[0]) from None
    return net


def build_net(name: str, weights: str | Path | None = None, lin_weights: str | Path | None = None,
              seed: int = 0) -> PerceptualNet:
    """The frozen net `name`: random_conv (seeded), or a pretrained one from its local files."""
    net = RandomConvFeatures(seed=seed) if name == "random_conv" else load_backend(name, weights, lin_weights)
    return net.freeze()
