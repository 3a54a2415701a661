"""biflow's forward flow against apple/ml-tarflow's TARFlow, side by side on the same weights.

    python benchmarks/vs_tarflow.py --out benchmarks/vs_tarflow.json      # full run (minutes on 2 CPU threads)
    python benchmarks/vs_tarflow.py --quick                               # one tiny geometry: proves it runs

For each geometry a reference `Model` gets random weights with re-drawn output projections (its zero-initialised
ones make every block the identity) and is imported into biflow (biflow.importers.tarflow_flow): the same network,
checked equal on one batch before anything is timed. Timed, per batch size:
  exact sampling, unguided and guided (annealed guidance on a and b, g = 1): reference `Model.reverse` vs our
    `ForwardFlow.inverse` (on CPU what `biflow sample --sampler exact` runs, without denoising), under no_grad;
  a training step: noise, forward, the NLL loss with 10% label dropout (each model's own way), backward, AdamW.
Each case alternates which implementation runs first over `--repeats` pairs after a warm-up pair; a pair's ratio
is reference time / ours (> 1: ours is faster), and the JSON gives the median of the paired ratios, the median
times, and the load average before and after (the machine may be shared: read the ratios with the load).
The reference is imported from $ML_TARFLOW or ../shared/reference/ml-tarflow (benchmarks/tarflow_ref.py).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tarflow_ref import reference_dir, reference_module  # noqa: E402

from biflow.importers import tarflow_flow  # noqa: E402
from biflow.training.forward import forward_step  # noqa: E402

# name: (in_channels, image_size, patch_size, width, num_blocks, layers_per_block, num_classes)
GEOMETRIES = {
    "28x28x1-p4-w128-4x4": (1, 28, 4, 128, 4, 4, 10),
    "32x32x3-p2-w256-4x2": (3, 32, 2, 256, 4, 2, 10),
    "8x8x1-p2-w64-4x2": (1, 8, 2, 64, 4, 2, 10),
}
FULL = {  # geometry: (sampling batches, training batches)
    "28x28x1-p4-w128-4x4": ([1, 8, 64], [64]),
    "32x32x3-p2-w256-4x2": ([1, 8], [16]),
    "8x8x1-p2-w64-4x2": ([1, 8, 64], [64]),
}
QUICK = {"8x8x1-p2-w64-4x2": ([1, 2], [4])}
TARGETS = {"sample_unguided": 2.0, "sample_guided": 3.0, "train_step": 1.3}


def build(tf, name: str, seed: int = 0):
    """(reference Model, our imported ForwardFlow), the same random weights."""
    channels, size, patch, width, blocks, layers, classes = GEOMETRIES[name]
    torch.manual_seed(seed)
    ref = tf.Model(channels, size, patch, width, blocks, layers, nvp=True, num_classes=classes)
    for block in ref.blocks:
        torch.nn.init.normal_(block.proj_out.weight, std=0.01)
        torch.nn.init.normal_(block.class_embed, std=0.3)
    return ref, tarflow_flow(ref.state_dict())


def check_equal(ref, ours, name: str) -> float:
    """Max relative difference of z on one batch (the two must compute the same function before timing)."""
    channels, size, *_, classes = GEOMETRIES[name]
    x, y = torch.randn(4, channels, size, size), torch.arange(4) % classes
    with torch.no_grad():
        z_ref = ref.unpatchify(ref(x, y)[0])
        z = ours(x, y)[0]
    err = ((z - z_ref).abs().max() / z_ref.abs().max()).item()
    if not err < 1e-4:
        raise SystemExit(f"{name}: the imported flow differs from the reference (relative {err:.3g}); not timing")
    return err


def paired(ref_fn: Callable[[], object], ours_fn: Callable[[], object], repeats: int) -> dict:
    """Alternating pairs after one warm-up pair: median of the paired ratios reference / ours."""
    ref_fn(), ours_fn()
    t_ref, t_ours = [], []
    for r in range(repeats):
        order = [(t_ref, ref_fn), (t_ours, ours_fn)]
        for times, fn in (order if r % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    ratios = [a / b for a, b in zip(t_ref, t_ours)]
    return {"ref_ms": 1e3 * statistics.median(t_ref), "ours_ms": 1e3 * statistics.median(t_ours),
            "ratio": statistics.median(ratios), "ratios": [round(v, 4) for v in ratios]}


def sampling_case(ref, ours, name: str, batch: int, guidance: float, repeats: int) -> dict:
    channels, size, *_, classes = GEOMETRIES[name]
    gen = torch.Generator().manual_seed(batch)
    z = torch.randn(batch, channels, size, size, generator=gen)
    y = torch.arange(batch) % classes
    z_tokens = ref.patchify(z)

    def run_ref():
        with torch.no_grad():  # the reference writes into what it is given: a fresh copy each time
            return ref.reverse(z_tokens.clone(), y, guidance=guidance, guide_what="ab", annealed_guidance=True)

    def run_ours():
        with torch.no_grad():
            return ours.inverse(z, y, guidance=guidance)

    return paired(run_ref, run_ours, repeats)


def training_case(ref, ours, name: str, batch: int, repeats: int, noise_std: float = 0.05, drop: float = 0.1) -> dict:
    channels, size, *_, classes = GEOMETRIES[name]
    gen = torch.Generator().manual_seed(batch)
    x, y = torch.rand(batch, channels, size, size, generator=gen) * 2 - 1, torch.arange(batch) % classes
    ref.train(), ours.train()
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-5, betas=(0.9, 0.95))
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-5, betas=(0.9, 0.95))
    step = forward_step(ours.cfg.model_copy(update={"noise_std": noise_std, "label_drop": drop}))

    def run_ref():
        labels = y.clone()
        labels[torch.rand(batch) < drop] = -1  # ml-tarflow's null label
        z, _, logdets = ref(x + noise_std * torch.randn_like(x), labels)
        loss = ref.get_loss(z, logdets)
        opt_ref.zero_grad(set_to_none=True)
        loss.backward()
        opt_ref.step()

    def run_ours():
        loss = step(ours, x, y)["loss"]
        opt_ours.zero_grad(set_to_none=True)
        loss.backward()
        opt_ours.step()

    out = paired(run_ref, run_ours, repeats)
    ref.eval(), ours.eval()
    return out


def run(plan: dict, repeats: int, threads: int, log=print) -> dict:
    tf = reference_module()
    torch.set_num_threads(threads)
    load_before = os.getloadavg()
    rows, checks = [], {}
    for name, (sample_batches, train_batches) in plan.items():
        ref, ours = build(tf, name)
        checks[name] = check_equal(ref, ours, name)
        cases = [("sample_unguided", b, lambda b=b: sampling_case(ref, ours, name, b, 0.0, repeats)) for b in sample_batches]
        cases += [("sample_guided", b, lambda b=b: sampling_case(ref, ours, name, b, 1.0, repeats)) for b in sample_batches]
        cases += [("train_step", b, lambda b=b: training_case(ref, ours, name, b, repeats)) for b in train_batches]
        for case, batch, fn in cases:
            res = fn()
            row = {"geometry": name, "case": case, "batch": batch, **res, "target": TARGETS[case],
                   "meets_target": res["ratio"] >= TARGETS[case]}
            rows.append(row)
            log(f"{name:22s} {case:16s} b{batch:<3d} reference {res['ref_ms']:9.1f} ms  ours {res['ours_ms']:9.1f} ms  "
                f"ratio {res['ratio']:.2f}x (target {TARGETS[case]}x)")
    return {"machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                        "threads": threads, "cpu_count": os.cpu_count(), "loadavg_before": load_before,
                        "loadavg_after": os.getloadavg()},
            "reference": str(reference_dir()), "repeats": repeats, "targets": TARGETS,
            "ratio": "reference time / ours, median of alternating pairs (> 1: ours is faster)",
            "max_rel_diff_z": checks, "rows": rows}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/vs_tarflow.json"), help="JSON results")
    p.add_argument("--quick", action="store_true", help="one tiny geometry, one pair per case: a smoke test")
    p.add_argument("--repeats", type=int, default=None, help="timed pairs per case (default 5; --quick: 1)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (the issue's machine kind: 2)")
    p.add_argument("--geometries", nargs="*", choices=sorted(GEOMETRIES), default=None, help="subset of the full plan")
    a = p.parse_args(argv)
    plan = QUICK if a.quick else {k: v for k, v in FULL.items() if a.geometries is None or k in a.geometries}
    result = run(plan, a.repeats or (1 if a.quick else 5), a.threads)
    result["quick"] = a.quick
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {a.out} (load average {result['machine']['loadavg_before']} before, {result['machine']['loadavg_after']} after)")


if __name__ == "__main__":
    main()
