"""Safe checkpoint files: tensors in safetensors, everything else in JSON. Nothing is unpickled.

A file that is corrupt, truncated or not ours raises CheckpointError with one line saying so.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from asla.errors import CheckpointError
from asla.storage import atomic_write_bytes, write_json

FORMAT = "asla-agent"


def base_path(path: str | Path) -> Path:
    """'x/agent', 'x/agent.json' and 'x/agent.safetensors' all name the pair x/agent.{json,safetensors}."""
    p = Path(path)
    return p.with_suffix("") if p.suffix in (".json", ".safetensors") else p


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    from safetensors.torch import save
    base = base_path(path)
    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    atomic_write_bytes(base.with_suffix(".safetensors"), data)
    write_json(base.with_suffix(".json"), metadata)


def load_tensors(path: str | Path, expect_format: str = FORMAT) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import SafetensorError
    from safetensors.torch import load
    base = base_path(path)
    wfile, jfile = base.with_suffix(".safetensors"), base.with_suffix(".json")
    for f in (wfile, jfile):
        if not f.exists():
            raise CheckpointError(f"checkpoint file {f} does not exist (an agent is a .safetensors + .json pair)")
    try:
        meta = json.loads(jfile.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{jfile} is not valid JSON ({exc.__class__.__name__}): corrupt or foreign file") from None
    if not isinstance(meta, dict) or meta.get("format") != expect_format:
        raise CheckpointError(f"{jfile} is not an {expect_format} card (format={meta.get('format') if isinstance(meta, dict) else None!r})")
    try:
        tensors = load(wfile.read_bytes())
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{wfile} is not a readable safetensors file: {str(exc).splitlines()[0][:120]}") from None
    return tensors, meta
