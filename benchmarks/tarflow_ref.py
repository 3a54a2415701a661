"""Where the apple/ml-tarflow reference comes from, for the scripts that run it side by side with biflow.

$ML_TARFLOW (a clone of github.com/apple/ml-tarflow), else ../shared/reference/ml-tarflow next to this repository.
The reference is imported from there by path and run as it is; none of its code is part of biflow.
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def reference_dir() -> Path:
    return Path(os.environ.get("ML_TARFLOW", ROOT.parent / "shared" / "reference" / "ml-tarflow"))


def reference_module() -> ModuleType:
    """ml-tarflow's transformer_flow module; SystemExit with the reason when it cannot be found."""
    where = reference_dir()
    if not (where / "transformer_flow.py").is_file():
        raise SystemExit(f"ml-tarflow reference not found at {where}: set ML_TARFLOW to a clone of apple/ml-tarflow")
    sys.path.insert(0, str(where))
    try:
        return importlib.import_module("transformer_flow")
    finally:
        sys.path.remove(str(where))
