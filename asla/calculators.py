"""Energy calculators by name: any ASE calculator, built from a problem's ``calculator`` section.

Shipped names: ``emt`` (default), ``tersoff`` (Tersoff 1989 carbon), ``lj``, ``brenner`` (asap3),
``tblite`` (GFN1/GFN2-xTB), ``gpaw`` (LCAO DFT), the universal machine-learned potentials ``chgnet`` and
``sevennet`` (pretrained weights inside their wheels: they run offline), and ``sleep`` (a stand-in that takes a
fixed time); or an import path ``package.module:Class`` (or ``package.module.Class``) with keyword arguments.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from ase.calculators.calculator import Calculator, all_changes

from .errors import ProblemError

EMT_ELEMENTS = {"H", "C", "N", "O", "Al", "Ni", "Cu", "Pd", "Ag", "Pt", "Au"}

# Tersoff, Phys. Rev. B 39, 5566 (1989): carbon. Order as ase's TersoffParameters:
# m, gamma, lambda3, c, d, h, n, beta, lambda2, B, R, D, lambda1, A
TERSOFF_1989_CARBON = [3.0, 1.0, 0.0, 38049.0, 4.3484, -0.57058, 0.72751, 1.5724e-7, 2.2119, 346.74,
                       1.95, 0.15, 3.4879, 1393.6]

GPAW_DEFAULTS: dict[str, Any] = {"mode": "lcao", "basis": "dzp", "xc": "PBE", "kpts": (1, 1, 1),
                                 "symmetry": "off", "txt": None, "spinpol": False}


def make_safe_tersoff(parameters: dict | None = None, **kwargs: Any) -> Calculator:
    """ASE's Tersoff with the one-neighbour case fixed.

    ASE 3.29 evaluates d(b_ij)/d(zeta) = ... * zeta**(n-1) even when zeta = 0 (atom i has no
    neighbour besides j: dimers, chain ends) and raises ZeroDivisionError. With zeta = 0 there is
    no third atom k, so the derivative multiplies nothing; returning 0 gives the exact result.
    """
    from ase.calculators.tersoff import Tersoff, TersoffParameters

    class SafeTersoff(Tersoff):
        def _calc_bij_d(self, zeta: float, beta: float, n: float) -> float:
            if zeta <= 0.0:
                return 0.0
            return super()._calc_bij_d(zeta, beta, n)

    if parameters is None:
        parameters = {("C", "C", "C"): TersoffParameters(*TERSOFF_1989_CARBON)}
    return SafeTersoff(parameters=parameters, **kwargs)


class SleepCalculator(Calculator):
    """Stand-in for an expensive code: a pair energy plus a fixed wall-clock delay (for scaling tests)."""

    implemented_properties = ["energy", "forces"]

    def __init__(self, seconds: float = 1.0, inner: str = "emt", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seconds = float(seconds)
        self.inner = make_calculator({"name": inner})

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        time.sleep(self.seconds)
        a = self.atoms.copy()
        a.calc = self.inner
        self.results = {"energy": a.get_potential_energy(), "forces": a.get_forces()}


def _emt(**kw: Any) -> Calculator:
    """ASE's EMT, vectorised (asla.emt.EMT): the same numbers as ase.calculators.emt.EMT, several times
    faster (docs/emt-speed.md). ASE's own class stays reachable as name ``ase.calculators.emt:EMT``."""
    from .emt import EMT
    return EMT(**kw)


def _lj(**kw: Any) -> Calculator:
    from ase.calculators.lj import LennardJones
    kw.setdefault("smooth", True)
    return LennardJones(**kw)


def _brenner(**kw: Any) -> Calculator:
    try:
        from asap3 import BrennerPotential
    except ImportError:
        raise ProblemError("calculator.name", "'brenner' needs asap3: pip install 'asla[fast]'") from None
    return BrennerPotential(**kw)


def _tblite(**kw: Any) -> Calculator:
    """GFN1-xTB by default (GFN2-xTB: method: GFN2-xTB). Run with OMP_NUM_THREADS=1: threads hurt on
    small cells; the wheel's bundled BLAS is slow, and LD_PRELOAD of the system OpenBLAS
    (/usr/lib/x86_64-linux-gnu/libopenblas.so.0) made a 42-atom Pd slab 3.4x faster here."""
    try:
        from tblite.ase import TBLite
    except ImportError:
        raise ProblemError("calculator.name", "'tblite' needs tblite: pip install 'asla[xtb]'") from None
    kw.setdefault("method", "GFN1-xTB")
    kw.setdefault("verbosity", 0)
    return TBLite(**kw)


def _gpaw(**kw: Any) -> Calculator:
    """GPAW LCAO (dzp, PBE, Gamma point, spin off) by default; any GPAW keyword overrides.

    symmetry='off' because atoms move between evaluations (GPAW raises SymmetryBrokenError
    otherwise); for Pd, setups={'Pd': '10'} is 5x faster than the default setup.
    """
    try:
        from gpaw import GPAW
    except ImportError:
        raise ProblemError("calculator.name", "'gpaw' needs GPAW: see README (extra 'dft')") from None
    settings = {**GPAW_DEFAULTS, **kw}
    if isinstance(settings.get("kpts"), list):
        settings["kpts"] = tuple(settings["kpts"])
    if isinstance(settings.get("mixer"), dict):  # YAML gives a mapping; GPAW wants a Mixer
        from gpaw import Mixer
        settings["mixer"] = Mixer(**settings["mixer"])
    if settings["mode"] == "lcao":
        from gpaw import LCAO
        settings["mode"] = LCAO()
    return GPAW(**settings)


# The universal ML potentials: only models whose weights ship inside the PyPI wheel, so nothing is downloaded at run
# time (SevenNet fetches its other models from the network; its multi-fidelity model needs a ``modal`` as well).
MLIP_MODELS: dict[str, dict[str, str]] = {
    "chgnet": {"0.3.0": "0.3.0", "0.2.0": "0.2.0", "r2scan": "r2scan"},
    "sevennet": {"7net-0": "SevenNet_0__11Jul2024/checkpoint_sevennet_0.pth",
                 "7net-0_22may2024": "SevenNet_0__22May2024/checkpoint_sevennet_0.pth",
                 "7net-l3i5": "SevenNet_l3i5/checkpoint_l3i5.pth"},
}
MLIP_DEFAULT_MODEL = {"chgnet": "0.3.0", "sevennet": "7net-0"}
MLIP_KEYS = ("model", "device")
DEVICES = ("auto", "cpu", "cuda")


def _torch_device(device: str) -> str:
    """``auto``: CUDA when torch sees a GPU, else the CPU; ``cuda`` without a GPU is refused in one line."""
    import torch
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ProblemError("calculator.device", "cuda requested but torch sees no CUDA device; use cpu or auto")
    return device


def _chgnet(model: str = "0.3.0", device: str = "auto") -> Calculator:
    """CHGNet (Deng et al., Nat. Mach. Intell. 2023), energy and forces only.

    CHGNet's calculator predicts stress and magnetic moments too unless told otherwise; a reward needs energy and
    forces, and leaving the stress out halved the time of an evaluation here (42-atom Pd/O slab: 0.16 s, not 0.33 s).
    """
    try:
        from chgnet.model import CHGNet
        from chgnet.model.dynamics import CHGNetCalculator
    except ImportError:
        raise ProblemError("calculator.name", "'chgnet' needs chgnet: pip install 'asla[chgnet]'") from None

    class EnergyForcesCHGNet(CHGNetCalculator):
        implemented_properties = ("energy", "forces", "free_energy")

        def calculate(self, atoms=None, properties=None, system_changes=None, task: str = "ef") -> None:
            # Two warnings CHGNet 0.4.2 raises in every run, neither about the result: pymatgen drops constraints
            # other than FixAtoms (ASE applies them to the forces anyway), and CHGNet's own volume tensor.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "Only FixAtoms and FixCartesian", UserWarning)
                warnings.filterwarnings("ignore", "Converting a tensor with requires_grad", UserWarning)
                super().calculate(atoms, properties, system_changes, task=task)

    torch_device = _torch_device(device)
    with contextlib.redirect_stdout(io.StringIO()):  # both print a line per load ("CHGNet will run on cpu")
        net = CHGNet.load(model_name=MLIP_MODELS["chgnet"][model], use_device=torch_device, verbose=False)
        return EnergyForcesCHGNet(model=net, use_device=torch_device)


def _sevennet(model: str = "7net-0", device: str = "auto") -> Calculator:
    """SevenNet (Park et al., J. Chem. Theory Comput. 2024) from the checkpoint inside the wheel.

    The path is resolved here rather than by name in SevenNet, which downloads a checkpoint it does not find.
    """
    try:
        from sevenn import _const
        from sevenn.calculator import SevenNetCalculator
    except ImportError:
        raise ProblemError("calculator.name", "'sevennet' needs sevenn: pip install 'asla[sevennet]'") from None
    from pathlib import Path
    path = Path(_const._prefix) / MLIP_MODELS["sevennet"][model]
    if not path.exists():
        raise ProblemError("calculator.model", f"{model}: checkpoint {path} is missing from the sevenn install")
    with warnings.catch_warnings():  # "no tensor product accelerator": the CPU has none to offer
        warnings.simplefilter("ignore", UserWarning)
        return SevenNetCalculator(model=str(path), device=_torch_device(device))


def _check_mlip(name: str, spec: dict) -> None:
    """The keywords of ``chgnet``/``sevennet``: a model shipped in the wheel and a device, nothing else."""
    for key in spec:
        if key != "name" and key not in MLIP_KEYS:
            raise ProblemError(f"calculator.{key}", f"{name} takes no keyword {key!r}; allowed: {', '.join(MLIP_KEYS)}")
    model = spec.get("model", MLIP_DEFAULT_MODEL[name])
    if not isinstance(model, str) or model not in MLIP_MODELS[name]:
        raise ProblemError("calculator.model", f"unknown {name} model {model!r}; allowed (shipped in the wheel): "
                           f"{', '.join(MLIP_MODELS[name])}")
    device = spec.get("device", "auto")
    if device not in DEVICES:
        raise ProblemError("calculator.device", f"must be one of {', '.join(DEVICES)}, got {device!r}")


def _sleep(**kw: Any) -> Calculator:
    return SleepCalculator(**kw)


BUILDERS: dict[str, Callable[..., Calculator]] = {
    "emt": _emt, "tersoff": make_safe_tersoff, "lj": _lj, "brenner": _brenner,
    "tblite": _tblite, "gpaw": _gpaw, "chgnet": _chgnet, "sevennet": _sevennet, "sleep": _sleep,
}
ELEMENTS: dict[str, set[str] | None] = {"emt": EMT_ELEMENTS, "tersoff": {"C"}, "brenner": {"C", "H"}}


# Keywords each built-in calculator takes (ASE's own Calculator keywords besides), so that a misspelt one is refused
# at load time instead of silently ignored. tblite's come from its class (a light import); GPAW takes too many, and
# its constructor checks them itself, so it is not listed; chgnet/sevennet are checked by _check_mlip.
_ASE_KEYWORDS = {"label", "directory"}
_KEYWORDS: dict[str, Callable[[], set[str]]] = {
    "emt": lambda: {"asap_cutoff", "skin", "allow_carbon"},
    "lj": lambda: {"epsilon", "sigma", "rc", "ro", "smooth"},
    "tersoff": lambda: {"parameters", "skin"},
    "brenner": lambda: set(),
    "sleep": lambda: {"seconds", "inner"},
    "tblite": lambda: _tblite_keywords(),
}


def _tblite_keywords() -> set[str] | None:
    try:
        from tblite.ase import TBLite
    except ImportError:
        return None  # make_calculator says what to install
    return set(TBLite.default_parameters)


def _check_keywords(name: str, spec: dict) -> None:
    allowed = _KEYWORDS[name]() if name in _KEYWORDS else None
    if allowed is None:
        return
    allowed |= _ASE_KEYWORDS
    bad = sorted(k for k in spec if k != "name" and k not in allowed)
    if bad:
        raise ProblemError(f"calculator.{bad[0]}", f"unknown keyword for {name}; allowed: "
                           f"{', '.join(sorted(allowed)) or 'none'}")


def _is_import_path(name: str) -> bool:
    return ":" in name or "." in name


def validate_calculator_spec(spec: Any, elements: list[str]) -> dict:
    """Check a ``calculator`` section without importing heavy codes; return it normalised."""
    if not isinstance(spec, dict) or "name" not in spec:
        raise ProblemError("calculator", f"must be a mapping with a name; allowed names: {', '.join(BUILDERS)} "
                           "or an import path package.module:Class")
    spec = dict(spec)
    name = spec["name"]
    if not isinstance(name, str) or (name not in BUILDERS and not _is_import_path(name)):
        raise ProblemError("calculator.name", f"unknown calculator {name!r}; allowed: {', '.join(BUILDERS)} "
                           "or an import path package.module:Class")
    if name in MLIP_MODELS:
        _check_mlip(name, spec)
    _check_keywords(name, spec)
    allowed = ELEMENTS.get(name)
    if allowed is not None:
        bad = sorted(set(elements) - allowed)
        if bad:
            raise ProblemError("calculator.name", f"{name} has no parameters for {', '.join(bad)}; it supports "
                               f"{', '.join(sorted(allowed))}")
    if name == "emt" and "C" in elements and not spec.pop("allow_carbon", False):
        raise ProblemError("calculator.name", "EMT is wrong for carbon (it prefers dense blobs to graphene); use "
                           "tersoff, brenner or tblite, or set calculator.allow_carbon: true")
    return spec


def make_calculator(spec: dict) -> Calculator:
    """A fresh ASE calculator from a validated spec (name plus keyword arguments)."""
    kwargs = {k: v for k, v in spec.items() if k not in ("name", "allow_carbon")}
    name = spec["name"]
    if name in BUILDERS:
        return BUILDERS[name](**kwargs)
    module_name, _, attr = name.partition(":") if ":" in name else name.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ProblemError("calculator.name", f"cannot import {name!r}: {exc}") from None
    return obj(**kwargs)


def is_finite_energy(e: float) -> bool:
    return e is not None and bool(np.isfinite(e))
