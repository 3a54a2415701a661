"""Speed benchmarks: forward-flow training throughput, and exact vs 1-NFE sampling, side by side.

    python benchmarks/bench.py --out benchmarks/results.json [--quick] [--device cuda]

Settings: `digits` (the demo geometry: 8x8x1, patch 2 -> 16 tokens of dim 4) and `paper` (the
paper's token geometry: a 32x32x4 latent, patch 2 -> 256 tokens of dim 16, 8 forward blocks) at
CPU-sized widths. Untrained weights: speed does not depend on their values. Each sampler is timed
on the same forward model, batch and machine in one run, so the ratios are comparable.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

from biflow.config import ForwardConfig, ReverseConfig
from biflow.metrics.speed import sampler_nfe, time_sampler
from biflow.models import ForwardFlow, ReverseModel
from biflow.sampling import sample_1nfe, sample_exact
from biflow.training.forward import forward_step

SETTINGS = {
    "digits": dict(forward=dict(size="digits", in_channels=1, image_size=8, patch_size=2, num_classes=10),
                   reverse=dict(size="digits")),
    "paper": dict(forward=dict(size="cpu-paper", in_channels=4, image_size=32, patch_size=2, num_classes=10),
                  reverse=dict(size="cpu-paper")),
}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def bench_train(flow: ForwardFlow, batch: int, repeats: int, device: torch.device) -> dict:
    """Images/s of one stage-1 optimiser step (forward, backward, AdamW)."""
    opt = torch.optim.AdamW(flow.parameters(), lr=1e-4)
    step = forward_step(flow.cfg)
    y = torch.arange(batch, device=device) % max(flow.cfg.num_classes, 1)
    x = torch.rand(batch, *flow.image_shape(), device=device) * 2 - 1

    def train_once(_: int) -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = step(flow, x, y)["loss"]
        loss.backward()
        opt.step()

    return time_sampler(train_once, batch, repeats=repeats, warmup=2, device=device)


def bench_sampling(flow: ForwardFlow, reverse: ReverseModel, batch: int, repeats: int, device: torch.device) -> list[dict]:
    """ms/image of every sampler at this batch: 1-NFE and exact, without and with guidance (+ denoising)."""
    labels = torch.arange(batch, device=device) % flow.cfg.num_classes
    cases = [("1nfe", 0.0, False), ("1nfe", 1.0, False),
             ("exact", 0.0, False), ("exact", 0.0, True), ("exact", 1.0, True)]
    rows = []
    for sampler, g, denoise in cases:
        if sampler == "1nfe":
            fn = lambda b, g=g: sample_1nfe(reverse, b, labels[:b], g)  # noqa: E731
        else:
            fn = lambda b, g=g, d=denoise: sample_exact(flow, b, labels[:b], g, d)  # noqa: E731
        timing = time_sampler(fn, batch, repeats=repeats, warmup=1, device=device)
        nfe = sampler_nfe(sampler, num_blocks=flow.cfg.num_blocks, num_tokens=flow.cfg.num_tokens,
                          guidance=g, conditional=True, denoise=denoise)
        rows.append({"sampler": sampler, "guidance": g, "denoise": denoise, "nfe": nfe, **timing})
    return rows


def ratios(rows: list[dict]) -> dict[str, float]:
    """exact / 1-NFE time per image: like for like, and the paper's headline (exact with guidance + denoising)."""
    get = lambda s, g, d: next(r["ms_per_image"] for r in rows if (r["sampler"], r["guidance"], r["denoise"]) == (s, g, d))  # noqa: E731
    return {
        "exact_over_1nfe_unguided": get("exact", 0.0, False) / get("1nfe", 0.0, False),
        "exact_denoise_over_1nfe": get("exact", 0.0, True) / get("1nfe", 0.0, False),
        "exact_guided_denoise_over_1nfe_guided": get("exact", 1.0, True) / get("1nfe", 1.0, False),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results.json"), help="JSON output")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per case (median reported)")
    parser.add_argument("--quick", action="store_true", help="one repeat, batch 1 and 8 (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.batches = 1, [1, 8]
    device = torch.device(args.device)
    torch.manual_seed(0)
    report = {"machine": {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
                          "threads": torch.get_num_threads(), "device": str(device)}, "settings": {}}
    for name in args.settings:
        fcfg = ForwardConfig(**SETTINGS[name]["forward"])
        flow = ForwardFlow(fcfg).to(device)
        reverse = ReverseModel(ReverseConfig.for_flow(fcfg, **SETTINGS[name]["reverse"])).to(device).eval()
        entry = {"tokens": fcfg.num_tokens, "token_dim": fcfg.token_dim, "forward_blocks": fcfg.num_blocks,
                 "forward_params": n_params(flow), "reverse_params": n_params(reverse), "batches": {}}
        for batch in args.batches:
            train = bench_train(flow.train(), batch, args.repeats, device)
            flow.eval()
            rows = bench_sampling(flow, reverse, batch, args.repeats, device)
            entry["batches"][str(batch)] = {"train_images_per_s": train["images_per_s"], "sampling": rows, "ratios": ratios(rows)}
            r = entry["batches"][str(batch)]["ratios"]
            print(f"[{name} batch {batch}] train {train['images_per_s']:.1f} img/s | "
                  + " | ".join(f"{x['sampler']} g={x['guidance']:g}{' +dn' if x['denoise'] else ''}: {x['ms_per_image']:.3f} ms/img" for x in rows)
                  + f" | exact/1nfe {r['exact_over_1nfe_unguided']:.1f}x, guided+denoise {r['exact_guided_denoise_over_1nfe_guided']:.1f}x",
                  flush=True)
        report["settings"][name] = entry
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
