"""Safe checkpoint files: tensors in safetensors, everything else in JSON. Nothing is unpickled.

A file that is corrupt, truncated or not ours raises CheckpointError with one line saying so.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from asla.errors import CheckpointError
from asla.storage import atomic_write_bytes, write_json

FORMAT = "asla-agent"


def base_path(path: str | Path) -> Path:
    """'x/agent', 'x/agent.json' and 'x/agent.safetensors' all name the pair x/agent.{json,safetensors}."""
    p = Path(path)
    return p.with_suffix("") if p.suffix in (".json", ".safetensors") else p


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any],
                 file_metadata: dict[str, str] | None = None) -> None:
    """`tensors` into path.safetensors (with `file_metadata`, strings, in the file's own header), `metadata` into
    path.json."""
    from safetensors.torch import save
    base = base_path(path)
    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=file_metadata)
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
        raise CheckpointError(f"{jfile} is not valid JSON ({exc.__class__.__name__}): corrupt or foreign file") \
            from None
    if not isinstance(meta, dict) or meta.get("format") != expect_format:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"{jfile} is not an {expect_format} card (format={found!r})")
    try:
        tensors = load(wfile.read_bytes())
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{wfile} is not a readable safetensors file: {str(exc).splitlines()[0][:120]}") from None
    return tensors, meta


# ---- optimizer and random generators: state_dict pairs that split into tensors and JSON --------------------

def optimizer_state_dict(optimizer: torch.optim.Optimizer,
                         prefix: str = "opt.") -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer's ``state_dict()`` as (tensors, JSON): tensors named ``{prefix}{param index}.{name}`` (Adam's
    moments and step), the rest as ``{"param_groups": ..., "scalars": {index: {name: value}}}``."""
    opt = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in opt["state"].items():
        scalars[str(idx)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{prefix}{idx}.{k}"] = v
            else:
                scalars[str(idx)][k] = v
    return tensors, {"param_groups": opt["param_groups"], "scalars": scalars}


def load_optimizer_state_dict(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict,
                              prefix: str = "opt.") -> None:
    """Inverse of `optimizer_state_dict` (tensors not starting with `prefix` are ignored)."""
    state: dict[int, dict[str, Any]] = {int(idx): dict(scalars) for idx, scalars in meta["scalars"].items()}
    for k, v in tensors.items():
        if k.startswith(prefix):
            idx, name = k[len(prefix):].split(".", 1)
            state.setdefault(int(idx), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state_dict(rng: np.random.Generator) -> tuple[dict[str, torch.Tensor], dict]:
    """Torch's global generator (a tensor, ``torch_rng``) and the NumPy generator's bit-generator state (JSON)."""
    return {"torch_rng": torch.get_rng_state()}, rng.bit_generator.state


def load_rng_state_dict(rng: np.random.Generator, tensors: dict[str, torch.Tensor], state: dict) -> None:
    torch.set_rng_state(tensors["torch_rng"])
    rng.bit_generator.state = state
