"""torch version as a comparable tuple, for honest `supports()` reasons."""
from __future__ import annotations

import re

import torch


def _parse(v: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", v)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


TORCH = _parse(torch.__version__)
