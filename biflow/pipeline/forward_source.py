"""Stage 1 from a file: the `train_forward` step's output when `pipeline.forward_checkpoint` names one.

An apple/ml-tarflow checkpoint is imported (biflow/importers/tarflow.py), a biflow forward-flow checkpoint is
taken as it is; either way the flow must model the pipeline's data (geometry and classes), and the checkpoint
records that data as a trained one would. The step's key holds the source file's sha256 (`source_identity`), so
a changed file reruns the step and everything downstream, and a moved one does not.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from biflow.pipeline.context import StepContext
from biflow.pipeline.spec import PipelineConfig


def source_identity(cfg: PipelineConfig) -> dict[str, Any] | None:
    """What an imported stage 1 depends on: the file's content hash and the import settings (None: no import)."""
    from biflow.importers.tarflow import file_sha256

    source = cfg.pipeline.forward_checkpoint
    if source is None:
        return None
    return {"forward_checkpoint": {**source.model_dump(exclude={"path"}), "sha256": file_sha256(source.path)}}


def import_forward(ctx: StepContext, job) -> tuple[Path, dict[str, Any]]:
    """Write the forward flow named by pipeline.forward_checkpoint into the step's outputs: (checkpoint, summary)."""
    from biflow.checkpoint import load_checkpoint, read_checkpoint
    from biflow.errors import CheckpointError
    from biflow.importers.tarflow import check_fits_data, file_sha256, import_tarflow

    source = ctx.cfg.pipeline.forward_checkpoint
    out = ctx.out / job.ckpt_name
    if source.format == "tarflow":
        meta = {"data": job.cfg.data.model_dump(), **job.data.record()}
        import_tarflow(source.path, out, meta=meta, patch_size=source.patch_size, in_channels=source.in_channels,
                       head_dim=source.head_dim, noise_std=source.noise_std, label_drop=job.cfg.forward.label_drop)
    else:
        if read_checkpoint(source.path)["kind"] != "forward":
            raise CheckpointError(f"{source.path}: pipeline.forward_checkpoint must be a forward-flow checkpoint")
        shutil.copyfile(source.path, out)  # a copy: the cached output must not change with the source file
    flow = load_checkpoint(out)
    check_fits_data(flow.cfg, job.data.meta, source.path)
    ctx.log(f"imported the {source.format} forward flow {source.path} ({flow.cfg.num_blocks} blocks x "
            f"{flow.cfg.layers_per_block} layers, width {flow.cfg.width}) instead of training stage 1")
    if ctx.run is not None:
        ctx.run.log_artifact(out, "checkpoints")
    summary = {"steps": 0, "resumed_from_step": 0, "final": {},
               "imported": {"from": source.format, "source": source.path, "sha256": file_sha256(source.path)}}
    return out, summary
