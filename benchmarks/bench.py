"""Speed benchmarks: training throughput of both stages, and exact vs 1-NFE sampling, side by side.

    python benchmarks/bench.py --out benchmarks/results.json [--quick] [--device cuda] [--settings paper-B]

Settings: `digits` (the demo geometry: 8x8x1, patch 2 -> 16 tokens of dim 4), `paper` (the paper's token
geometry: a 32x32x4 latent, patch 2 -> 256 tokens of dim 16, 8 forward blocks, at CPU-sized widths) and
`paper-B` (the same geometry at the paper's B/2 sizes: forward 'B' ~121M, reverse 'B' ~129M parameters,
1000 classes; run by default on CUDA only, on CPU when asked: it is slow there). Untrained weights: speed
does not depend on their values. Each sampler is timed on the same models, batch and machine in one run,
so the ratios are comparable.

Per batch the JSON reports: stage-1 and stage-2 training images/s; every sampler's ms/image (1-NFE with
and without guidance; exact without guidance, with denoising, and with guidance + denoising); their ratios;
and the 1-NFE pass's achieved FLOP/s against the device's measured matmul peak (a large bf16 matmul on
CUDA, float32 on CPU). FLOPs are counted analytically (`flops_per_sample`: every Linear plus attention's
T x T products; equal to torch's FlopCounterMode on the matmuls, see tests/test_paper_scale.py).

GPU switches (recorded in the JSON): bf16 autocast for training and sampling (`--no-amp` to turn off),
the exact sampler as one CUDA graph per (batch, guidance) (`--no-cuda-graph`), and `--compile`
(torch.compile of the training models and of the 1-NFE model).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from biflow.config import ForwardConfig, ReverseConfig, ReverseLossConfig, TrainConfig
from biflow.metrics.speed import sampler_nfe, time_sampler
from biflow.models import ForwardFlow, ReverseModel
from biflow.objectives.reverse import reverse_step
from biflow.sampling import CudaGraphInverse, sample_1nfe, sample_exact
from biflow.training.forward import forward_step
from biflow.training.loop import make_optimizer

LATENT_256 = dict(in_channels=4, image_size=32, patch_size=2)  # SD-VAE latent of a 256x256 image, patch 2
SETTINGS = {
    "digits": dict(forward=dict(size="digits", in_channels=1, image_size=8, patch_size=2, num_classes=10),
                   reverse=dict(size="digits")),
    "paper": dict(forward=dict(size="cpu-paper", **LATENT_256, num_classes=10), reverse=dict(size="cpu-paper")),
    "paper-B": dict(forward=dict(size="B", **LATENT_256, num_classes=1000), reverse=dict(size="B"), cuda_only=True),
}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, repeats: int = 10) -> dict:
    """The device's measured matmul peak: bf16 8192^3 on CUDA, float32 2048^3 on CPU; the best of `repeats`
    (a peak, not a typical rate: on a shared CPU the median drifts with other load)."""
    cuda = device.type == "cuda"
    n, dtype = (8192, torch.bfloat16) if cuda else (2048, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats if cuda else max(3, repeats // 2)):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"tflops": 2 * n**3 / min(times) / 1e12, "median_tflops": 2 * n**3 / statistics.median(times) / 1e12,
            "n": n, "dtype": str(dtype).removeprefix("torch.")}


def autocast(device: torch.device, amp: bool):
    return torch.autocast("cuda", dtype=torch.bfloat16) if amp and device.type == "cuda" else nullcontext()


def bench_train(flow: ForwardFlow, batch: int, repeats: int, device: torch.device, amp: bool, compile: bool) -> dict:
    """Images/s of one stage-1 optimiser step (forward, backward, AdamW: fused on CUDA)."""
    opt = make_optimizer(flow, TrainConfig(lr=1e-4), device)
    step, model = forward_step(flow.cfg), torch.compile(flow) if compile else flow
    y = torch.arange(batch, device=device) % max(flow.cfg.num_classes, 1)
    x = torch.rand(batch, *flow.image_shape(), device=device) * 2 - 1

    def train_once(_: int) -> None:
        opt.zero_grad(set_to_none=True)
        with autocast(device, amp):
            loss = step(model, x, y)["loss"]
        loss.backward()
        opt.step()

    return time_sampler(train_once, batch, repeats=repeats, warmup=2, device=device)


def bench_train_reverse(flow: ForwardFlow, reverse: ReverseModel, batch: int, repeats: int, device: torch.device,
                        amp: bool, compile: bool) -> dict:
    """Images/s of one stage-2 optimiser step: F(x~) without gradient, G with training-time CFG, MSE terms."""
    opt = make_optimizer(reverse, TrainConfig(lr=1e-4), device)
    model, loss_cfg = torch.compile(reverse) if compile else reverse, ReverseLossConfig()
    y = torch.arange(batch, device=device) % max(flow.cfg.num_classes, 1)
    x = torch.rand(batch, *flow.image_shape(), device=device) * 2 - 1

    def train_once(_: int) -> None:
        opt.zero_grad(set_to_none=True)
        with autocast(device, amp):
            loss = reverse_step(flow, model, x, y, loss_cfg)["loss"]
        loss.backward()
        opt.step()

    reverse.train()
    try:
        return time_sampler(train_once, batch, repeats=repeats, warmup=2, device=device)
    finally:
        reverse.eval()


def bench_sampling(flow: ForwardFlow, reverse: ReverseModel, batch: int, repeats: int, device: torch.device,
                   amp: bool, cuda_graph: bool, compile: bool) -> list[dict]:
    """ms/image of every sampler at this batch: 1-NFE and exact, without and with guidance (+ denoising)."""
    labels = torch.arange(batch, device=device) % flow.cfg.num_classes
    cases = [("1nfe", 0.0, False, False), ("1nfe", 1.0, False, False),
             ("exact", 0.0, False, cuda_graph), ("exact", 0.0, True, cuda_graph), ("exact", 1.0, True, cuda_graph)]
    if cuda_graph:  # the headline case once more without the graph: what the graph saves
        cases.append(("exact", 1.0, True, False))
    onenfe_model = torch.compile(reverse) if compile else reverse
    graphs: dict[float, CudaGraphInverse | None] = {}
    rows = []
    for sampler, g, denoise, use_graph in cases:
        extra = {}
        if sampler == "1nfe":
            fn = lambda b, g=g: sample_1nfe(onenfe_model, b, labels[:b], g)  # noqa: E731
        else:
            if use_graph and g not in graphs:
                t0 = time.perf_counter()
                try:
                    graphs[g] = CudaGraphInverse(flow, batch, g, amp_dtype=torch.bfloat16 if amp else None)
                    extra["graph_capture_s"] = time.perf_counter() - t0
                except Exception as err:  # an unattended GPU run records the failure and times the eager path
                    graphs[g] = None
                    extra["graph_error"] = f"{type(err).__name__}: {err}".splitlines()[0]
            graph = graphs.get(g) if use_graph else None
            extra["impl"] = "cuda_graph" if graph is not None else "eager"
            fn = lambda b, g=g, d=denoise, gr=graph: sample_exact(flow, b, labels[:b], g, d, graph=gr)  # noqa: E731

        def run(b: int, fn=fn) -> None:
            with autocast(device, amp):
                fn(b)

        timing = time_sampler(run, batch, repeats=repeats, warmup=1, device=device)
        nfe = sampler_nfe(sampler, num_blocks=flow.cfg.num_blocks, num_tokens=flow.cfg.num_tokens,
                          guidance=g, conditional=True, denoise=denoise)
        rows.append({"sampler": sampler, "guidance": g, "denoise": denoise, "nfe": nfe, **extra, **timing})
    graphs.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def ratios(rows: list[dict]) -> dict[str, float]:
    """exact / 1-NFE time per image: like for like, and the paper's headline (exact with guidance + denoising).

    The exact sampler's first row of a case is its fastest implementation (the CUDA graph where one was built).
    """
    get = lambda s, g, d: next(r["ms_per_image"] for r in rows if (r["sampler"], r["guidance"], r["denoise"]) == (s, g, d))  # noqa: E731
    out = {
        "exact_over_1nfe_unguided": get("exact", 0.0, False) / get("1nfe", 0.0, False),
        "exact_denoise_over_1nfe": get("exact", 0.0, True) / get("1nfe", 0.0, False),
        "exact_guided_denoise_over_1nfe_guided": get("exact", 1.0, True) / get("1nfe", 1.0, False),
    }
    headline = [r for r in rows if (r["sampler"], r["guidance"], r["denoise"]) == ("exact", 1.0, True)]
    if len(headline) == 2 and headline[0].get("impl") == "cuda_graph":
        out["cuda_graph_speedup_exact_guided_denoise"] = headline[1]["ms_per_image"] / headline[0]["ms_per_image"]
    return out


def tflops(flops_per_image: float, ms_per_image: float) -> float:
    return flops_per_image / (ms_per_image / 1000.0) / 1e12


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results.json"), help="JSON output")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--settings", nargs="+", default=None, choices=list(SETTINGS),
                        help="default: digits and paper, plus paper-B on CUDA")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per case (median reported)")
    parser.add_argument("--quick", action="store_true", help="one repeat, batch 1 and 8 (smoke test)")
    parser.add_argument("--no-amp", dest="amp", action="store_false", help="CUDA: no bf16 autocast (float32)")
    parser.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false", help="CUDA: exact sampler eagerly")
    parser.add_argument("--compile", action="store_true", help="torch.compile the training models and the 1-NFE model")
    parser.add_argument("--skip-train", action="store_true", help="sampling only")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.batches = 1, [1, 8]
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    settings = args.settings or [s for s, v in SETTINGS.items() if cuda or not v.get("cuda_only")]
    flags = {"amp_bf16": args.amp and cuda, "cuda_graph": args.cuda_graph and cuda, "compile": args.compile,
             "fused_adamw": cuda}
    torch.manual_seed(0)
    peak = matmul_peak(device)
    print(f"[{device}] matmul peak {peak['tflops']:.2f} TFLOP/s ({peak['dtype']} {peak['n']}^3) | flags {flags}", flush=True)
    machine = {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
               "threads": torch.get_num_threads(), "device": str(device), "matmul_peak": peak}
    if cuda:
        machine["gpu"] = torch.cuda.get_device_name(device)
    report = {"machine": machine, "flags": flags, "settings": {}}
    for name in settings:
        fcfg = ForwardConfig(**SETTINGS[name]["forward"])
        flow = ForwardFlow(fcfg).to(device)
        reverse = ReverseModel(ReverseConfig.for_flow(fcfg, **SETTINGS[name]["reverse"])).to(device).eval()
        fwd_flops, rev_flops = flow.flops_per_sample(), reverse.flops_per_sample()
        entry = {"tokens": fcfg.num_tokens, "token_dim": fcfg.token_dim, "forward_blocks": fcfg.num_blocks,
                 "forward_params": n_params(flow), "reverse_params": n_params(reverse),
                 "forward_flops_per_image": fwd_flops, "onenfe_flops_per_image": rev_flops, "batches": {}}
        for batch in args.batches:
            out: dict = {}
            if not args.skip_train:
                train = bench_train(flow.train(), batch, args.repeats, device, flags["amp_bf16"], args.compile)
                flow.eval().requires_grad_(False)
                train_rev = bench_train_reverse(flow, reverse, batch, args.repeats, device, flags["amp_bf16"], args.compile)
                flow.requires_grad_(True)
                # stage 1: forward + backward ~ 3x forward; stage 2: F forward + G forward/backward + G's unconditional pass
                out.update(train_images_per_s=train["images_per_s"], train_reverse_images_per_s=train_rev["images_per_s"],
                           train_tflops=3 * fwd_flops * train["images_per_s"] / 1e12,
                           train_reverse_tflops=(fwd_flops + 4 * rev_flops) * train_rev["images_per_s"] / 1e12)
            flow.eval()
            rows = bench_sampling(flow, reverse, batch, args.repeats, device, flags["amp_bf16"], flags["cuda_graph"], args.compile)
            one = next(r for r in rows if r["sampler"] == "1nfe" and r["guidance"] == 0.0)
            achieved = tflops(rev_flops, one["ms_per_image"])
            out.update(sampling=rows, ratios=ratios(rows),
                       onenfe={"flops_per_image": rev_flops, "achieved_tflops": achieved, "peak_tflops": peak["tflops"],
                               "fraction_of_peak": achieved / peak["tflops"]})
            entry["batches"][str(batch)] = out
            r = out["ratios"]
            train_txt = (f"train F {out['train_images_per_s']:.1f} img/s, G {out['train_reverse_images_per_s']:.1f} img/s | "
                         if "train_images_per_s" in out else "")
            print(f"[{name} batch {batch}] {train_txt}"
                  + " | ".join(f"{x['sampler']} g={x['guidance']:g}{' +dn' if x['denoise'] else ''}"
                               f"{' (' + x['impl'] + ')' if 'impl' in x and flags['cuda_graph'] else ''}: {x['ms_per_image']:.3f} ms/img"
                               for x in rows)
                  + f" | exact/1nfe {r['exact_over_1nfe_unguided']:.1f}x, guided+denoise {r['exact_guided_denoise_over_1nfe_guided']:.1f}x"
                  + f" | 1-NFE {achieved:.3g} TFLOP/s = {achieved / peak['tflops']:.1%} of peak", flush=True)
        report["settings"][name] = entry
        del flow, reverse
    again = matmul_peak(device)  # once more at the end: the peak is the better of the two
    if again["tflops"] > peak["tflops"]:
        peak.update(again)
        for entry in report["settings"].values():
            for out in entry["batches"].values():
                one = out["onenfe"]
                one.update(peak_tflops=peak["tflops"], fraction_of_peak=one["achieved_tflops"] / peak["tflops"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
