"""Safe checkpoint files: tensors in safetensors, everything else in JSON. Nothing is unpickled.

A file that is corrupt, truncated or not ours raises CheckpointError with one line saying so. Files are read only
if they are regular files (not a FIFO, a device or a link to one) of bounded size (``MAX_WEIGHTS_BYTES``,
``MAX_CARD_BYTES``; environment variables of the same names with the prefix ``ASLA_`` change them), and a JSON card
only if it is nested at most ``asla.schema.MAX_DEPTH`` levels: an agent file is untrusted input.
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import numpy as np
import torch

from asla import schema
from asla.errors import CheckpointError
from asla.storage import atomic_write_bytes, write_json

FORMAT = "asla-agent"
# The shipped agents' weights are 0.45 MB and their cards 4 kB; a trainer checkpoint (optimizer moments, replay
# buffer, evaluation cache) is a few MB. The limits leave room for far larger networks and runs.
MAX_WEIGHTS_BYTES = int(os.environ.get("ASLA_MAX_WEIGHTS_BYTES", 1 << 30))  # a .safetensors file, and a trainer.json
MAX_CARD_BYTES = int(os.environ.get("ASLA_MAX_CARD_BYTES", 1 << 20))  # an agent's .json card


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


def read_regular_file(path: Path, limit: int, limit_name: str) -> bytes:
    """The bytes of `path` if it is a regular file (links followed) of at most `limit` bytes, else CheckpointError.

    The file is opened without blocking and checked on the open descriptor, so a FIFO, a device such as /dev/zero
    (or a link to one) or a file swapped in between is refused instead of hanging or filling memory."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # before opening: opening a device may itself act
            raise CheckpointError(f"{path} is not a regular file (a FIFO, device or folder, or a link to one)")
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} does not exist (an agent is a .safetensors + .json pair)") \
            from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise CheckpointError(f"{path} is not a regular file (a FIFO, device or folder, or a link to one)")
        if info.st_size > limit:
            raise CheckpointError(f"{path} is {info.st_size:,} bytes, above the limit of {limit:,} "
                                  f"(environment variable ASLA_{limit_name})")
        data = f.read(limit + 1)
    if len(data) > limit:  # grew while being read
        raise CheckpointError(f"{path} is above the limit of {limit:,} bytes (environment variable ASLA_{limit_name})")
    return data


def read_json_card(path: Path, limit: int, limit_name: str, bounded: bool = True) -> object:
    """A JSON file read as untrusted input: bounded size, valid UTF-8 JSON and, if `bounded`, nesting and number of
    values bounded as in a recipe (`asla.schema.check_size`; a trainer checkpoint holds more values than that)."""
    data = read_regular_file(path, limit, limit_name)
    try:
        meta = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, an integer of > 4300 digits, bad bytes
        raise CheckpointError(f"{path} is not valid JSON ({exc.__class__.__name__}): corrupt or foreign file") \
            from None
    except RecursionError:
        raise CheckpointError(f"{path} is nested deeper than {schema.MAX_DEPTH} levels") from None
    if bounded:
        schema.check_size(meta, str(path), lambda name, message: CheckpointError(f"{name} {message}"))
    return meta


def load_tensors(path: str | Path, expect_format: str = FORMAT) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and the JSON card of a pair, both read as untrusted input (`read_regular_file`); the card must
    carry ``format: expect_format``. An agent card may hold ``MAX_CARD_BYTES``, any other (a trainer checkpoint's,
    with the replay buffer and the evaluation cache) ``MAX_WEIGHTS_BYTES``."""
    from safetensors import SafetensorError
    from safetensors.torch import load
    base = base_path(path)
    wfile, jfile = base.with_suffix(".safetensors"), base.with_suffix(".json")
    for f in (wfile, jfile):
        if not f.exists() and not f.is_symlink():
            raise CheckpointError(f"checkpoint file {f} does not exist (an agent is a .safetensors + .json pair)")
    if expect_format == FORMAT:
        meta = read_json_card(jfile, MAX_CARD_BYTES, "MAX_CARD_BYTES")
    else:
        meta = read_json_card(jfile, MAX_WEIGHTS_BYTES, "MAX_WEIGHTS_BYTES", bounded=False)
    if not isinstance(meta, dict) or meta.get("format") != expect_format:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"{jfile} is not an {expect_format} card (format={str(found)[:60]!r})")
    data = read_regular_file(wfile, MAX_WEIGHTS_BYTES, "MAX_WEIGHTS_BYTES")
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError, TypeError) as exc:
        raise CheckpointError(f"{wfile} is not a readable safetensors file: {str(exc).splitlines()[0][:120]}") from None
    return tensors, meta


def check_weights(path: Path, tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> None:
    """Refuse weights that are not what the card's network implies: the same names and shapes, floating point,
    finite (an all-NaN or integer file would otherwise build garbage without a word)."""
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        what = f"lacks {', '.join(missing[:3])}" if missing else f"has unexpected {', '.join(extra[:3])}"
        raise CheckpointError(f"{path}: the weights do not match the card's network: it {what}"
                              + (" ..." if len(missing or extra) > 3 else ""))
    for name, shape in expected.items():
        t = tensors[name]
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{path}: {name} has shape {tuple(t.shape)}, the card's network needs {tuple(shape)}")
        if not t.dtype.is_floating_point:
            raise CheckpointError(f"{path}: {name} is {str(t.dtype).replace('torch.', '')}; weights must be floating "
                                  "point numbers")
        if not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{path}: {name} holds non-finite values (NaN or infinity)")


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
