"""Small helpers: atomic writes (never leave a half-written file behind), perplexity."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write to a temp file in the same directory, then rename over ``path`` (with the permissions
    a plain ``open(path, "w")`` would give, not mkstemp's 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def perplexity(loss: float) -> float:
    """exp(loss), inf instead of an OverflowError for diverged runs."""
    return math.exp(loss) if loss < 700 else float("inf")


def plain(cfg: Any) -> Any:
    """OmegaConf nodes -> plain containers, resolved (hparams and checkpoints hold no OmegaConf objects)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg


def png_bytes(fig, dpi: int | None = None) -> bytes:
    """A matplotlib figure as PNG bytes (to write atomically); the figure is closed."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", **({"dpi": dpi} if dpi else {}))
    plt.close(fig)
    return buf.getvalue()
