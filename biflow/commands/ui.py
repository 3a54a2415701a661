"""biflow ui: the MLflow UI on 127.0.0.1 against the tracking store the pipelines write to."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from biflow.cli import add_overrides

HELP = "serve the MLflow UI (127.0.0.1) for the pipelines' tracking store"


def add_arguments(p) -> None:
    p.add_argument("pipeline", type=Path, nargs="?", default=None,
                   help="pipeline file whose store to show (default: the default store, runs/pipeline/mlflow.db, "
                        "or $MLFLOW_TRACKING_URI)")
    add_overrides(p, "as `biflow run --set`")
    p.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1")


def run(args) -> int:
    from biflow.config import load_yaml
    from biflow.pipeline.spec import PipelineConfig, load_pipeline, resolve_tracking_uri
    from biflow.pipeline.tracking import check_reachable

    cfg = load_pipeline(args.pipeline, args.overrides) if args.pipeline else load_yaml(None, PipelineConfig, args.overrides)
    uri = resolve_tracking_uri(cfg)
    check_reachable(uri)
    if uri.startswith(("http://", "https://")):
        print(f"the tracking store is an MLflow server already: open {uri}")
        return 0
    print(f"MLflow UI for {uri} on http://127.0.0.1:{args.port} (Ctrl-C stops it)", flush=True)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(args.port)]
    try:
        return subprocess.call(cmd, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    except KeyboardInterrupt:
        return 0
