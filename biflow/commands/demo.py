"""biflow demo: both BiFlow stages on the built-in digits, in-process: bits/dim, speed and sample grids."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from biflow.config import ExperimentConfig, load_yaml

HELP = "train both stages on the built-in digits data (minutes on a CPU) and write sample grids and metrics"


def add_arguments(p) -> None:
    p.add_argument("--config", type=Path, help="experiment YAML (default: built-in digits settings)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set train_forward.steps=300")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="run directory")


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run(args) -> int:
    from biflow.checkpoint import load_checkpoint
    from biflow.commands.train import print_log
    from biflow.data import load_split, save_grid, to_model, to_uint8
    from biflow.sampling import tweedie_denoise
    from biflow.training.forward import evaluate_bpd, train_forward
    from biflow.training.reverse import train_reverse

    cfg = load_yaml(args.config, ExperimentConfig, args.overrides)
    fwd, fwd_ckpt = train_forward(cfg, args.out, on_log=print_log)
    data_dir = fwd.meta["data_dir"]
    _, rev_ckpt = train_reverse(cfg, args.out, fwd_ckpt, data_dir, on_log=print_log)
    flow, reverse = load_checkpoint(fwd_ckpt), load_checkpoint(rev_ckpt)
    test = load_split(data_dir, "test")
    x_test, y_test = to_model(test.images), torch.as_tensor(test.labels)
    report = {"test_bits_per_dim": {"untrained": evaluate_bpd(type(flow)(flow.cfg).eval(), x_test, y_test),
                                    "trained": evaluate_bpd(flow, x_test, y_test)}, "samplers": {}}
    n = 100
    labels = torch.arange(n) % flow.cfg.num_classes if flow.cfg.num_classes else None
    z = torch.randn(n, *flow.image_shape(), generator=torch.Generator().manual_seed(0))
    for g in (0.0, 1.0):  # the same noise through both samplers: G(z) should look like F^-1(z)
        with torch.no_grad():
            exact, t_exact = timed(lambda: tweedie_denoise(flow, flow.inverse(z, labels, guidance=g), labels))
            one, t_one = timed(lambda: reverse(z, labels, g)[0])
        save_grid(to_uint8(torch.cat([exact, one], dim=3)), args.out / f"samples_exact_vs_1nfe_g{g:g}.png", nrow=10)
        report["samplers"][f"g={g:g}"] = {"exact_ms_per_image": 1000 * t_exact / n, "1nfe_ms_per_image": 1000 * t_one / n,
                                         "speedup": t_exact / t_one}
    (args.out / "demo.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(f"grids: {args.out}/samples_exact_vs_1nfe_g*.png (each cell: exact inverse | 1-NFE, same noise)")
    return 0
