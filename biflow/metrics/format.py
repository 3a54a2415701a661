"""How metric values are written in tables and reports (the CLI, the pipeline report, sweep tables)."""
from __future__ import annotations

import math
from typing import Any


def fmt(value: Any, digits: int = 4, missing: str = "n/a") -> str:
    """A number to `digits` significant digits ('nan' for NaN); `missing` for None; anything else as str."""
    if value is None:
        return missing
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}g}"
    return str(value)
