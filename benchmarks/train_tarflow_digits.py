"""Train apple/ml-tarflow's own TARFlow on the built-in digits, to import as a biflow forward flow.

    python benchmarks/train_tarflow_digits.py --out runs/tarflow_digits.pth [--steps 300]
    biflow run pipelines/digits.yaml --set pipeline.forward_checkpoint.path=runs/tarflow_digits.pth

The reference Model (8x8x1 digits, patch 2, width 64, 4 blocks x 2 layers, 10 classes, nvp) is trained with its
own loss (`get_loss`) on x + sigma*eps, labels dropped to -1 (its null label: the mean class embedding) with
p = 0.1, AdamW; the state dict is saved the way a training script saves one ({"model": ..., "step": ...}).
This stands in for a checkpoint a user trained with ml-tarflow: stage 1 done elsewhere, stage 2 with biflow.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tarflow_ref import reference_dir, reference_module  # noqa: E402,F401  (reference_dir: for callers)


def digits_tensors(data_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits train split in [-1, 1], prepared by biflow (nothing downloaded)."""
    from biflow.config import DataConfig
    from biflow.data import prepare
    from biflow.data.model_space import TrainingData

    return TrainingData.open(prepare(DataConfig(name="digits"), data_dir)).tensors("train")


def train_reference(out: Path, steps: int = 300, width: int = 64, blocks: int = 4, layers: int = 2,
                    batch: int = 64, lr: float = 2e-3, noise_std: float = 0.05, label_drop: float = 0.1,
                    seed: int = 0, data_dir: Path | None = None, log_every: int = 50) -> Path:
    tf = reference_module()
    x_all, y_all = digits_tensors(data_dir or out.parent / "tarflow_digits_data")
    torch.manual_seed(seed)
    model = tf.Model(1, 8, 2, width, blocks, layers, nvp=True, num_classes=10)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10)))
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(len(x_all), (batch,), generator=gen)
        x, y = x_all[idx], y_all[idx].clone()
        y[torch.rand(batch, generator=gen) < label_drop] = -1  # ml-tarflow's null label
        z, _, logdets = model(x + noise_std * torch.randn(x.shape, generator=gen), y)
        loss = model.get_loss(z, logdets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}: loss {loss.item():.4f} ({time.perf_counter() - t0:.1f}s)", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "step": steps, "args": {"noise_std": noise_std, "channels": width}}, out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="checkpoint to write (.pth)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--width", type=int, default=64, help="ml-tarflow 'channels' (a multiple of its head dim 64)")
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--noise-std", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    path = train_reference(a.out, a.steps, a.width, a.blocks, a.layers, a.batch, a.lr, a.noise_std, seed=a.seed)
    print(f"ml-tarflow digits model, {a.steps} steps -> {path}")


if __name__ == "__main__":
    main()
