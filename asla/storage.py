"""Files of a run: atomic writes, structures as extxyz or ase.db, JSON summaries.

Everything is written to a temporary file in the same directory and renamed into place, so a
run killed at any moment leaves either the old or the new file, never half of one.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ase import Atoms

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """`data` into `path` through a temporary file in the same folder, renamed into place once on disk. On any
    failure (a full disk: ENOSPC, often only at fsync) the temporary file is removed and the old file stays; the
    OSError raised names `path`, not the temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; a result file should read like any other
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=_jsonable) + "\n")


def _jsonable(x: Any) -> Any:
    import numpy as np
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def fix_template(atoms: Atoms, n_template: int = 0, calculator: str | None = None) -> Atoms:
    """`atoms` as a file should hold it: the template's atoms fixed (``FixAtoms``, as every relaxation in asla
    treats them) and the attached energy labelled with the calculator's name (else ``ase db`` says "unknown")."""
    from ase.constraints import FixAtoms
    if n_template:
        atoms.set_constraint(FixAtoms(indices=range(n_template)))
    if calculator and atoms.calc is not None:
        atoms.calc.name = str(calculator)
    return atoms


def write_structures(path: str | Path, structures: Iterable[Atoms], n_template: int = 0,
                     calculator: str | None = None) -> None:
    """Write structures (with energies attached) atomically as extxyz, or into an ase.db by suffix.

    With `n_template` the first atoms of each structure carry ``FixAtoms`` and with `calculator` the energy names
    its calculator (`fix_template`); the structures passed in are not changed."""
    path = Path(path)
    structures = list(structures)
    if n_template or calculator:
        structures = [fix_template(_copy(a), n_template, calculator) for a in structures]
    if path.suffix == ".db":
        append_db(path, structures)
        return
    from ase.io import write
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp, structures, format="extxyz")
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException as exc:  # a full disk: the old file stays, no temporary file is left
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise


def _copy(atoms: Atoms) -> Atoms:
    """A copy that keeps the attached single-point results (Atoms.copy drops the calculator)."""
    from ase.calculators.singlepoint import SinglePointCalculator
    new = atoms.copy()
    calc = atoms.calc
    if calc is not None:
        new.calc = SinglePointCalculator(new, **{k: v for k, v in getattr(calc, "results", {}).items()})
        new.calc.name = calc.name
    return new


def open_db(path: str | Path):
    """An ase.db connection that a killed writer cannot block.

    ASE guards writes with a lock file beside the database besides SQLite's own locking. SIGKILL
    (or the OOM killer) mid-write leaves that file behind, and every later write, a resumed run's
    first, waits for it forever. SQLite's and the database servers' locks die with the process,
    so the lock file is kept only for JSON databases, where it is the only guard."""
    from ase.db import connect
    name = str(path)
    return connect(name, use_lock_file=name.endswith(".json"))


EPISODE_NUMBERING = "1-based"  # the n-th build of a run is episode n, in the database, summary.json and TensorBoard


def append_db(path: str | Path, structures: Iterable[Atoms], n_template: int = 0, calculator: str | None = None,
              **key_value_pairs: Any) -> None:
    """Add structures to an ASE database (SQLite file or a URL ASE accepts); `n_template`, `calculator`: as in
    `write_structures`. A database that this starts records the episode numbering in its metadata (``episodes:
    1-based``); one without it was written before, with episodes counted from 0 (`episode_base`)."""
    structures = list(structures)
    if n_template or calculator:
        structures = [fix_template(_copy(a), n_template, calculator) for a in structures]
    with open_db(path) as db:
        fresh = db.count() == 0
        for atoms in structures:
            kv = {k: v for k, v in atoms.info.items() if isinstance(v, (int, float, str, bool)) and k.isidentifier()}
            db.write(atoms, key_value_pairs={**kv, **key_value_pairs})
        if fresh:
            with contextlib.suppress(AttributeError, NotImplementedError):  # a backend without metadata
                db.metadata = {**db.metadata, "episodes": EPISODE_NUMBERING}


def episode_base(path: str | Path) -> int:
    """The number of a run's first episode in this database: 1 (``EPISODE_NUMBERING``) for one written now or not
    yet started, 0 for one from before the numbering was recorded (its rows count episodes from 0)."""
    if "://" not in str(path) and not Path(path).exists():
        return 1
    db = open_db(path)
    try:
        if db.count() == 0 or db.metadata.get("episodes") == EPISODE_NUMBERING:
            return 1
    except (AttributeError, NotImplementedError):
        return 1
    return 0
