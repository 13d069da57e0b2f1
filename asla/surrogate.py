"""Surrogate models of a problem's energy, and relaxation of finished builds in them (PRB 102, 075427, 2020).

A real evaluation (DFT: a minute to an hour) is what a search pays for; a model fitted on the run's own real
evaluations costs milliseconds. Each finished grid build can be relaxed in the model (template fixed, placed atoms
kept in the build region) before one real single point of the relaxed structure is spent on it.

Every backend sits behind one interface, `Surrogate` (fit/update on real evaluations, predict energy and its
uncertainty sigma, an ASE calculator view for ASE optimisers), as a search method is one small module behind one
interface in AGOX. The models are AGOX's own, not rewritten here:

- ``gpr``: AGOX's global GPR as GOFEE builds it (``agox.algorithms.factory.model_factory``: fingerprint descriptor,
  the two-RBF kernel with amplitude and noise, repulsive prior), trained on energies only (AGOX's global GPR has
  no force training). The default: in docs/surrogate-probe.md it fits 2-8x faster than the force-trained sparse
  GPR, which gained at most 0.19 eV (median) at 100 points and diverged in 18-20 of 20 relaxations when trained
  on the pretrained agent's builds.
- ``sgpr``: AGOX's sparse GPR, on the global fingerprint or the local SOAP descriptor (dscribe), optionally
  trained on forces as well (the only AGOX GP that takes force data).
- ``delta-gpr``: the global GPR with a physics model as its prior (AGOX's ``CalculatorModel``), so it learns only
  the difference between that model and the real calculator.
- ``calculator``: any ASE calculator as a fixed pre-relaxer (a universal ML potential such as CHGNet or SevenNet
  when the real calculator is DFT); it does not learn, and has no uncertainty (sigma 0).

`surrogate_relax` relaxes one build in a model and falls back to the unrelaxed build, saying why, when the model
has too little data or the relaxation diverges. `SurrogateConfig` is the recipe's ``surrogate:`` block
(`Recipe.surrogate`); the training loop uses all of this through `asla.surrogate_eval`.
"""
from __future__ import annotations

import contextlib
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms
from ase.data import covalent_radii
from ase.geometry import get_distances

from . import schema
from .errors import ConfigError
from .problem import Problem
from .reward import KeepInRegion
from .schema import option

MODELS = ("gpr", "sgpr", "delta-gpr", "calculator")
DESCRIPTORS = ("fingerprint", "soap")
FALLBACKS = ("build", "last_good")
OPTIMIZERS = ("BFGS", "LBFGS", "FIRE")


# -- the recipe block --------------------------------------------------------------------------------------------

@dataclass
class SurrogateConfig:
    """The ``surrogate:`` block of a recipe: which model, when it is trusted, how builds are relaxed in it.

    Declared in the recipe schema's style (`asla.schema`: type, range, default, one-line doc per field), so the
    recipe checks it field by field; `validate` adds the checks between fields (a model and what it needs).
    """

    enabled: bool = option(False, "relax each finished build in a model fitted on the run's real evaluations, then "
                           "one real single point of it is the reward; the problem's real relaxation steps are off "
                           "while enabled (docs/surrogate.md)", "bool")
    model: str = option("gpr", "gpr (AGOX's global GPR, energies), sgpr (sparse GPR, optional forces), delta-gpr "
                        "(GPR on a physics prior), calculator (a fixed ASE calculator as pre-relaxer)", "choice",
                        choices=MODELS)
    descriptor: str = option("fingerprint", "sgpr only: fingerprint (global, GOFEE's) or soap (local, dscribe)",
                             "choice", choices=DESCRIPTORS)
    forces: bool = option(False, "sgpr only: train on the real forces as well as energies", "bool")
    calculator: dict | None = option(None, "delta-gpr and calculator: the physics model, as a problem's calculator "
                                     "section ({name: emt} or an import path)", "mapping", nullable=True)
    min_points: int = option(20, "real evaluations the model needs before builds are relaxed in it (before: plain "
                             "single points)", "int", minimum=0, maximum=10**9)
    steps: int = option(100, "most optimiser steps of one relaxation in the model (AGOX's GOFEE relaxer: 100)",
                        "int", minimum=1, maximum=10**6)
    fmax: float = option(0.05, "force convergence of the relaxation in the model (eV/A)", "number", minimum=0.0,
                         exclusive_minimum=True)
    optimizer: str = option("BFGS", "ASE optimiser of the relaxation in the model", "choice", choices=OPTIMIZERS)
    refit_every: int = option(10, "new real evaluations between hyperparameter optimisations (in between the GP is "
                              "conditioned on new points at fixed hyperparameters)", "int", minimum=1, maximum=10**9)
    kappa: float = option(2.0, "weight of sigma in the acquisition E - kappa*sigma (GOFEE: 2)", "number",
                          minimum=0.0)
    relax_in_acquisition: bool = option(False, "relax in E - kappa*sigma (GOFEE) instead of the predicted energy E",
                                        "bool")
    screen_candidates: int = option(1, "builds proposed and relaxed in the model per real evaluation round (1: no "
                                    "screening)", "int", minimum=1, maximum=4096)
    screen_k: int = option(1, "of those, the best k by the acquisition get a real evaluation", "int", minimum=1,
                           maximum=4096)
    train_on_screened: bool = option(False, "screened-out builds train the agent on their model energies (marked "
                                     "surrogate in the replay buffer and evaluations.db); false: dropped", "bool")
    fallback: str = option("build", "when a relaxation in the model diverges: build (real single point of the "
                           "unrelaxed build) or last_good (of the last step that passed the checks)", "choice",
                           choices=FALLBACKS)
    min_distance: float = option(0.6, "divergence: two atoms closer than this fraction of their covalent radii",
                                 "number", minimum=0.0, exclusive_minimum=True)
    floor_per_atom: float = option(2.0, "divergence: model energy below the lowest real energy minus this many eV "
                                   "per placed atom", "number", minimum=0.0, exclusive_minimum=True)

    @classmethod
    def from_dict(cls, data: dict | None) -> SurrogateConfig:
        """The block from a recipe mapping (missing keys take their defaults), validated."""
        cfg = schema.from_mapping(cls, {} if data is None else data, "surrogate.", ConfigError)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        return schema.to_mapping(self)

    def relax_kwargs(self) -> dict:
        """What this block sets of `surrogate_relax`: ``surrogate_relax(p, a, s, **cfg.relax_kwargs())``."""
        return {"steps": self.steps, "fmax": self.fmax, "min_points": self.min_points, "optimizer": self.optimizer,
                "kappa": self.kappa if self.relax_in_acquisition else 0.0, "fallback": self.fallback,
                "min_distance": self.min_distance, "floor_per_atom": self.floor_per_atom}

    def validate(self) -> None:
        """Raise ConfigError naming ``surrogate.<field>`` and what is allowed, on the first bad field."""
        _choice("model", self.model, MODELS)
        _choice("descriptor", self.descriptor, DESCRIPTORS)
        _choice("fallback", self.fallback, FALLBACKS)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        for name in ("enabled", "forces", "relax_in_acquisition"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"surrogate.{name}", f"must be true or false, got {getattr(self, name)!r}")
        _integer("min_points", self.min_points, 0)
        _integer("steps", self.steps, 1)
        _integer("refit_every", self.refit_every, 1)
        _integer("screen_candidates", self.screen_candidates, 1)
        _integer("screen_k", self.screen_k, 1)
        if self.screen_k > self.screen_candidates:
            raise ConfigError("surrogate.screen_k", f"must be at most surrogate.screen_candidates "
                              f"({self.screen_candidates}), got {self.screen_k}")
        _positive("fmax", self.fmax)
        _positive("min_distance", self.min_distance)
        _positive("floor_per_atom", self.floor_per_atom)
        if not _is_number(self.kappa) or self.kappa < 0:
            raise ConfigError("surrogate.kappa", f"must be a number >= 0, got {self.kappa!r}")
        if self.model in ("delta-gpr", "calculator"):
            if not isinstance(self.calculator, dict) or not isinstance(self.calculator.get("name"), str):
                raise ConfigError("surrogate.calculator", f"model {self.model} needs a calculator mapping with a "
                                  "name, e.g. {name: emt} or {name: package.module:Class}")
        elif self.calculator is not None:
            raise ConfigError("surrogate.calculator", f"is used by models delta-gpr and calculator only, "
                              f"not {self.model}")
        if self.forces and self.model != "sgpr":
            raise ConfigError("surrogate.forces", f"force training needs model sgpr (AGOX's sparse GPR); "
                              f"{self.model} trains on energies only")
        if self.descriptor != "fingerprint" and self.model != "sgpr":
            raise ConfigError("surrogate.descriptor", f"{self.model} uses the fingerprint; soap needs model sgpr")


def _choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"surrogate.{name}", f"unknown value {value!r}; allowed: {', '.join(allowed)}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"surrogate.{name}", f"must be an integer >= {minimum}, got {value!r}")


def _positive(name: str, value: Any) -> None:
    if not _is_number(value) or value <= 0:
        raise ConfigError(f"surrogate.{name}", f"must be a positive number, got {value!r}")


# -- the interface -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Prediction:
    """The model's energy (eV) of one structure and its uncertainty sigma (eV; 0 for a model without one)."""

    energy: float
    sigma: float

    def acquisition(self, kappa: float) -> float:
        """Lower confidence bound E - kappa*sigma: low where the model expects low energies or does not know."""
        return self.energy - kappa * self.sigma


class Surrogate(ABC):
    """A cheap model of a problem's real energy, trained on the run's real evaluations.

    Real evaluations are ase.Atoms whose calculator holds the energy and, where the real calculator gave them,
    the forces (an ``EnergyEvaluator`` result, or any SinglePointCalculator).
    """

    name: str = "surrogate"
    trains_on_forces: bool = False
    learns: bool = True  # False: a fixed model, ready without data

    def __init__(self, refit_every: int = 10) -> None:
        self.refit_every = int(refit_every)
        self.points: list[Atoms] = []
        self._since_optimize = 0
        self._fitted = False

    # -- data ------------------------------------------------------------------------------------------------
    @property
    def n_points(self) -> int:
        """Real evaluations the model has been given."""
        return len(self.points)

    @property
    def lowest_energy(self) -> float | None:
        """Lowest energy of the real evaluations on the model's own energy scale (None without data)."""
        if not self.points:
            return None
        return float(min(a.get_potential_energy() for a in self.points))

    def is_ready(self, min_points: int) -> bool:
        """True when the model may relax builds: trained on at least min_points evaluations (a fixed model: always)."""
        return not self.learns or (self._fitted and self.n_points >= min_points)

    def update(self, evaluations: Sequence[Atoms] | Atoms) -> None:
        """Add real evaluations and refit; hyperparameters are re-optimised every `refit_every` new points."""
        if isinstance(evaluations, Atoms):
            evaluations = [evaluations]
        new = [_training_copy(a) for a in evaluations]
        new = [a for a in new if a is not None]
        if not new:
            return
        self.points.extend(new)
        self._since_optimize += len(new)
        optimize = not self._fitted or self._since_optimize >= self.refit_every
        self.fit(optimize=optimize)

    def fit(self, optimize: bool = True) -> None:
        """(Re)train on every point; `optimize` re-optimises hyperparameters, else they stay fixed."""
        if self.learns and self.points:
            self._fit(optimize)
            self._fitted = True
            if optimize:
                self._since_optimize = 0

    # -- what backends implement -----------------------------------------------------------------------------
    @abstractmethod
    def _fit(self, optimize: bool) -> None: ...

    @abstractmethod
    def predict(self, atoms: Atoms) -> Prediction:
        """Energy and sigma of one structure."""

    @abstractmethod
    def calculator(self, kappa: float = 0.0) -> Calculator:
        """ASE calculator view for ASE optimisers: energy E - kappa*sigma and its forces (kappa 0: the model)."""

    # -- persistence: plain lists and numbers (JSON- or safetensors-ready), never pickles ---------------------
    def state_dict(self) -> dict:
        return {"name": self.name, "points": [_point_to_dict(a) for a in self.points],
                "since_optimize": self._since_optimize, "fitted": self._fitted, "hyper": self._hyper_state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore data and hyperparameters; the model is refitted at those hyperparameters (same predictions)."""
        if state.get("name") != self.name:
            raise ValueError(f"surrogate state is for {state.get('name')!r}, not {self.name!r}")
        self.points = [_point_from_dict(p) for p in state["points"]]
        self._since_optimize = int(state["since_optimize"])
        self._load_hyper_state(state.get("hyper"))
        self._fitted = False
        if state.get("fitted") and self.points:
            self._fit(optimize=False)
            self._fitted = True

    def _hyper_state(self) -> dict | None:
        return None

    def _load_hyper_state(self, hyper: dict | None) -> None:
        return None


def _training_copy(atoms: Atoms) -> Atoms | None:
    """A constraint-free copy holding the real energy (and forces where present); None if it has no finite energy.

    Constraints are dropped: ASE would zero the fixed template atoms' forces, which are real data for a model.
    """
    calc = atoms.calc
    results = getattr(calc, "results", {}) if calc is not None else {}
    energy = results.get("energy")
    if energy is None or not math.isfinite(float(energy)):
        return None
    copy = Atoms(atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    forces = results.get("forces")
    forces = None if forces is None or not np.all(np.isfinite(forces)) else np.array(forces, dtype=float)
    copy.calc = SinglePointCalculator(copy, energy=float(energy), forces=forces)
    return copy


def _point_to_dict(a: Atoms) -> dict:
    forces = a.calc.results.get("forces")
    return {"numbers": a.numbers.tolist(), "positions": a.positions.tolist(), "cell": np.asarray(a.cell).tolist(),
            "pbc": [bool(x) for x in a.pbc], "energy": float(a.calc.results["energy"]),
            "forces": None if forces is None else np.asarray(forces).tolist()}


def _point_from_dict(p: dict) -> Atoms:
    a = Atoms(p["numbers"], positions=p["positions"], cell=p["cell"], pbc=p["pbc"])
    forces = None if p.get("forces") is None else np.array(p["forces"], dtype=float)
    a.calc = SinglePointCalculator(a, energy=float(p["energy"]), forces=forces)
    return a


# -- AGOX backends -----------------------------------------------------------------------------------------------

class _AgoxEnvironment:
    """What AGOX's descriptors read of an ``agox.environments.Environment``: the full structure and its species.

    AGOX's Environment module imports ``IndexedConstraint`` from ``ase.constraints``, which ASE 3.29 no longer
    re-exports (asla.bench.agox.patch_ase_for_agox patches ASE for it); the descriptors need only these two methods.
    """

    def __init__(self, problem: Problem) -> None:
        atoms = problem.empty_atoms()
        for symbol, count in problem.bag.items():
            for _ in range(count):
                atoms.append(symbol)
        self._atoms = atoms

    def get_atoms(self) -> Atoms:
        return self._atoms.copy()

    def get_species(self) -> list[str]:
        return sorted(set(self._atoms.get_chemical_symbols()))


@contextlib.contextmanager
def _without_ray_pool() -> Iterator[None]:
    """Construct an AGOX GPR with ``use_ray=False`` without starting Ray.

    ``RayPoolUser.__init__`` starts Ray and a pool of actors (about a minute here) whatever ``use_ray`` says, only
    to read the CPU count, which ``use_ray=False`` never uses. The stand-in answers one CPU during construction.
    """
    import agox.utils.ray.pool_user as pool_user
    original = pool_user.get_ray_pool
    pool_user.get_ray_pool = lambda *args, **kwargs: (None, {"CPU": 1})
    try:
        yield
    finally:
        pool_user.get_ray_pool = original


def _agox_classes() -> tuple[type, type]:
    """AGOX's GPR (its log marginal likelihood returned as a scalar) and SparseGPR.

    AGOX 3.11.1's ``GPR._log_marginal_likelihood_gradient`` returns the likelihood as a length-1 array, which its
    optimiser passes to float(); numpy >= 2.4 refuses that. The same fix as asla.bench.agox.patch_agox, made
    in subclasses here rather than on AGOX's classes, so importing asla changes nothing in AGOX.
    """
    from agox.models.GPR import GPR, SparseGPR

    class ScalarLikelihoodGPR(GPR):
        def _log_marginal_likelihood_gradient(self, theta):  # AGOX's signature
            log_p, grad = super()._log_marginal_likelihood_gradient(theta)
            return np.sum(log_p), grad

    return ScalarLikelihoodGPR, SparseGPR  # the sparse GPR (fixed hyperparameters here) never calls the gradient


def _gofee_kernel():  # an AGOX kernel
    """GOFEE's kernel exactly as AGOX's model factory builds it for ``GlobalGPRConfig``."""
    from agox.models.GPR.kernels import RBF, Constant, Noise
    beta = 0.01
    k0 = Constant(beta, (beta, beta)) * RBF()
    k1 = Constant(1 - beta, (1 - beta, 1 - beta)) * RBF()
    return Constant(5000, (1, 1e5)) * (k0 + k1) + Noise(0.01, (0.01, 0.01))


class _AgoxSurrogate(Surrogate):
    """Common part of the AGOX GP backends: the model is an ASE calculator; LCB via AGOX's LCB calculator."""

    def __init__(self, model: Any, refit_every: int = 10) -> None:  # an AGOX model
        from agox.writer import Writer
        super().__init__(refit_every)
        model.writer = Writer(verbosity=-1)  # AGOX prints a model report on every fit; a search logs its own
        self.model = model

    def _fit(self, optimize: bool) -> None:
        n_optimize = self.model.n_optimize
        self.model.n_optimize = n_optimize if optimize else 0
        try:
            self.model.train(self.points)
        finally:
            self.model.n_optimize = n_optimize

    def predict(self, atoms: Atoms) -> Prediction:
        return Prediction(float(self.model.predict_energy(atoms)), float(self.model.predict_uncertainty(atoms)))

    def calculator(self, kappa: float = 0.0) -> Calculator:
        if kappa == 0.0:
            return self.model
        from agox.acquisitors.LCB import LowerConfidenceBoundCalculator
        return LowerConfidenceBoundCalculator(self.model, lambda e, s: e - kappa * s,
                                              lambda e, f, s, sf: f - kappa * sf)

    def _hyper_state(self) -> dict:
        return {"theta": np.asarray(self.model.kernel.theta, dtype=float).tolist()}

    def _load_hyper_state(self, hyper: dict | None) -> None:
        if hyper and hyper.get("theta") is not None:
            self.model.kernel.theta = np.asarray(hyper["theta"], dtype=float)


class GPRSurrogate(_AgoxSurrogate):
    """AGOX's global GPR as in GOFEE: fingerprint descriptor, GOFEE's kernel, a prior; energies only.

    The prior is AGOX's repulsive prior (keeps atoms apart where there is no data) or, given a calculator, that
    physics model (AGOX's CalculatorModel): then the GP learns only the difference to the real energies.
    One hyperparameter optimisation per refit, from the current hyperparameters, so a seeded run repeats exactly
    (AGOX's random restarts draw from numpy's global generator).
    """

    name = "gpr"

    def __init__(self, problem: Problem, prior_calculator: Calculator | None = None, refit_every: int = 10) -> None:
        from agox.models.descriptors import Fingerprint
        from agox.models.GPR.priors.repulsive import Repulsive
        gpr_class, _ = _agox_classes()
        if prior_calculator is None:
            prior = Repulsive()
        else:
            from agox.models.ase_model import CalculatorModel
            prior = CalculatorModel(calculator=prior_calculator)
            self.name = "delta-gpr"
        with _without_ray_pool():
            model = gpr_class(descriptor=Fingerprint(environment=_AgoxEnvironment(problem)), kernel=_gofee_kernel(),
                              prior=prior, use_ray=False, n_optimize=1)
        super().__init__(model, refit_every)


class SparseGPRSurrogate(_AgoxSurrogate):
    """AGOX's sparse GPR on a global (fingerprint) or local (SOAP) descriptor, with optional force training.

    Hyperparameters stay fixed, as in AGOX's own LocalGPRConfig (its sparse GPR's search draws random trials from
    numpy's global generator): amplitude 5000 and length 20 for the fingerprint (GOFEE's starting amplitude),
    amplitude 1 and length 20 for SOAP (AGOX's LocalGPRConfig). Noise: 0.01 eV per energy as AGOX's default, and
    `force_noise` eV/A per force component (random builds carry forces of ~10 eV/A; AGOX's 0.01 overfits them).
    """

    name = "sgpr"

    def __init__(self, problem: Problem, descriptor: str = "fingerprint", forces: bool = False,
                 force_noise: float = 0.1, refit_every: int = 10) -> None:
        from agox.models.GPR.kernels import RBF, Constant
        from agox.models.GPR.priors.repulsive import Repulsive
        from agox.utils.filters import AllFilter, NoneFilter
        from agox.utils.sparsifiers import CUR
        _, sgpr_class = _agox_classes()
        env = _AgoxEnvironment(problem)
        if descriptor == "soap":
            from agox.models.descriptors import SOAP
            desc = SOAP(environment=env, r_cut=5.0, nmax=3, lmax=2, sigma=1.0, weight=True)
            kernel, sparsifier = Constant(1.0) * RBF(20.0), CUR(1000)
        elif descriptor == "fingerprint":
            from agox.models.descriptors import Fingerprint
            desc = Fingerprint(environment=env)
            kernel, sparsifier = Constant(5000.0) * RBF(20.0), CUR(1000)
        else:
            raise ConfigError("surrogate.descriptor", f"unknown value {descriptor!r}; allowed: "
                              f"{', '.join(DESCRIPTORS)}")
        with _without_ray_pool():
            model = sgpr_class(descriptor=desc, kernel=kernel, prior=Repulsive(), n_optimize=0, sparsifier=sparsifier,
                               sigma=0.01, centralize=True, train_uncertainty=True, use_ray=False,
                               force_data_filter=AllFilter() if forces else NoneFilter())
        model.sigma_F = float(force_noise)  # AGOX 3.11 ignores its sigma_F argument (it reads noise_F)
        self.trains_on_forces = bool(forces)
        self.name = f"sgpr-{descriptor}{'-forces' if forces else ''}"
        super().__init__(model, refit_every)

    def update(self, evaluations: Sequence[Atoms] | Atoms) -> None:
        if self.trains_on_forces:
            batch = [evaluations] if isinstance(evaluations, Atoms) else list(evaluations)
            missing = [i for i, a in enumerate(batch) if a.calc is None or a.calc.results.get("forces") is None]
            if missing:
                raise ValueError(f"{self.name} trains on forces, but evaluation {missing[0]} has none "
                                 "(evaluate with forces, or use surrogate.forces: false)")
        super().update(evaluations)


class CalculatorSurrogate(Surrogate):
    """A fixed ASE calculator as the model (a universal ML potential as a pre-relaxer for a DFT target).

    It does not learn: real evaluations are kept (for the record and a later delta model) but change nothing.
    Its energies are on its own scale (an ML potential's zero is not DFT's, nor EMT's), so the lowest energy it
    reports is its own energy of the real evaluations, the scale the divergence floor is checked on.
    """

    name = "calculator"
    learns = False

    def __init__(self, calculator: Calculator) -> None:
        super().__init__(refit_every=1)
        self.calc = calculator
        self._own_lowest: float | None = None

    @property
    def lowest_energy(self) -> float | None:
        return self._own_lowest

    def update(self, evaluations: Sequence[Atoms] | Atoms) -> None:
        before = len(self.points)
        super().update(evaluations)
        for atoms in self.points[before:]:
            e = self.predict(atoms).energy
            if math.isfinite(e):
                self._own_lowest = e if self._own_lowest is None else min(self._own_lowest, e)

    def _fit(self, optimize: bool) -> None:
        return None

    def _hyper_state(self) -> dict:
        return {"own_lowest": self._own_lowest}

    def _load_hyper_state(self, hyper: dict | None) -> None:
        self._own_lowest = None if not hyper else hyper.get("own_lowest")

    def predict(self, atoms: Atoms) -> Prediction:
        work = atoms.copy()
        work.calc = self.calc
        return Prediction(float(work.get_potential_energy()), 0.0)

    def calculator(self, kappa: float = 0.0) -> Calculator:
        return self.calc


def make_surrogate(config: SurrogateConfig, problem: Problem) -> Surrogate:
    """The backend a validated ``surrogate:`` block names, for this problem."""
    from .calculators import make_calculator
    config.validate()
    if config.model == "gpr":
        return GPRSurrogate(problem, refit_every=config.refit_every)
    if config.model == "delta-gpr":
        return GPRSurrogate(problem, prior_calculator=make_calculator(config.calculator),
                            refit_every=config.refit_every)
    if config.model == "sgpr":
        return SparseGPRSurrogate(problem, descriptor=config.descriptor, forces=config.forces,
                                  refit_every=config.refit_every)
    return CalculatorSurrogate(make_calculator(config.calculator))


# -- relaxation of a finished build in the model ------------------------------------------------------------------

@dataclass
class SurrogateRelaxation:
    """What `surrogate_relax` did to one build. `atoms` is what should get the real single point."""

    atoms: Atoms
    relaxed: bool  # True: atoms is a relaxed structure (possibly the last good step); False: the unrelaxed build
    reason: str | None  # why not relaxed, or why it stopped early (None: a clean relaxation)
    steps: int = 0
    energy_start: float = math.nan  # model energy E of the build
    energy: float = math.nan  # model energy E of the returned structure
    sigma: float = math.nan  # model uncertainty of the returned structure
    seconds: float = 0.0
    diverged: bool = False
    trajectory_energies: list[float] = field(default_factory=list, repr=False)  # what was minimised, per step


def surrogate_relax(problem: Problem, atoms: Atoms, surrogate: Surrogate, steps: int = 100, fmax: float = 0.05, *,
                    min_points: int = 20, kappa: float = 0.0, optimizer: str = "BFGS", fallback: str = "build",
                    min_distance: float = 0.6, floor_per_atom: float = 2.0, margin: float = 1.0) -> SurrogateRelaxation:
    """Relax a finished build in the model, template fixed and placed atoms kept in the build region.

    Placed atoms are clamped to the build layers' heights +- `margin` (as the real relaxation clamps them:
    `asla.reward.KeepInRegion`); in-plane a periodic cell has no edge, a non-periodic one is checked. Every step is
    checked: the relaxation diverges when an energy or position is not finite, two atoms come closer than
    `min_distance` x the sum of their covalent radii, a placed atom leaves the region, or the minimised energy
    falls below the lowest energy of the real evaluations (on the model's scale) minus `floor_per_atom` eV per
    placed atom (a GP's hole far from its data; a real relaxation of a random build can drop 20 eV in one step, so
    the floor is not measured from the start). Then `fallback` ``build`` returns the unrelaxed build,
    ``last_good`` the last step that passed. `kappa` > 0 relaxes in E - kappa*sigma (GOFEE) instead of E. Below
    `min_points` real evaluations (a learning model) nothing is relaxed. Any exception of the model or optimiser
    is a divergence, never a crash.
    """
    t0 = time.perf_counter()
    n_template = len(problem.template)
    build = atoms.copy()
    build.calc = None
    build.set_constraint()
    _choice("fallback", fallback, FALLBACKS)
    _choice("optimizer", optimizer, OPTIMIZERS)
    if not surrogate.is_ready(min_points):
        return SurrogateRelaxation(build, False, f"model has {surrogate.n_points} real evaluations, fewer than "
                                   f"min_points={min_points}", seconds=time.perf_counter() - t0)
    zs = problem.grid.layer_z
    zmin, zmax = min(zs) - margin, max(zs) + margin
    placed = np.arange(n_template, len(build))
    work = build.copy()
    work.set_constraint([FixAtoms(indices=range(n_template)), KeepInRegion(placed, zmin, zmax)])
    checker = _DivergenceCheck(problem, build, placed, zmin, zmax, min_distance)
    energies: list[float] = []
    good = build.positions.copy()
    reason, diverged, n_steps, energy_start = None, False, 0, math.nan
    try:
        work.calc = surrogate.calculator(kappa)  # a model that cannot even give a calculator is a divergence too
        from ase import optimize
        opt = getattr(optimize, optimizer)(work, logfile=None)
        energy_start = surrogate.predict(build).energy
        lowest = surrogate.lowest_energy
        floor = -math.inf if lowest is None else lowest - floor_per_atom * len(placed)
        for _ in opt.irun(fmax=fmax, steps=steps):
            energy = float(work.get_potential_energy())
            problem_found = checker(work.positions, energy, floor)
            if problem_found:
                reason, diverged = problem_found, True
                break
            energies.append(energy)
            good = work.positions.copy()
            n_steps = opt.nsteps
    except Exception as exc:  # noqa: BLE001 - a failing model is a divergence: fall back, never crash the search
        reason, diverged = f"model or optimiser failed: {type(exc).__name__}: {str(exc)[:200]}", True
    if diverged and (fallback == "build" or n_steps == 0):
        result, relaxed = build, False
    else:
        result = build.copy()
        result.positions = good
        relaxed = True
    try:
        pred = surrogate.predict(result)
        energy, sigma = pred.energy, pred.sigma
    except Exception:  # noqa: BLE001 - diagnostics only
        energy, sigma = math.nan, math.nan
    if diverged:
        reason = f"diverged after {n_steps} steps: {reason}"
    return SurrogateRelaxation(result, relaxed, reason, steps=n_steps, energy_start=energy_start, energy=energy,
                               sigma=sigma, seconds=time.perf_counter() - t0, diverged=diverged,
                               trajectory_energies=energies)


class _DivergenceCheck:
    """One step's sanity checks; returns a one-line reason, or None when the step is sane."""

    def __init__(self, problem: Problem, atoms: Atoms, placed: np.ndarray, zmin: float, zmax: float,
                 min_distance: float) -> None:
        self.cell, self.pbc = atoms.cell.copy(), atoms.pbc.copy()
        self.placed = placed
        self.zmin, self.zmax = zmin - 1e-6, zmax + 1e-6
        radii = covalent_radii[atoms.numbers]
        self.dmin = min_distance * (radii[placed][:, None] + radii[None, :])
        self.dmin[np.arange(len(placed)), placed] = 0.0  # an atom and itself
        self.periodic = bool(problem.pbc[0])
        self.inv_ab = np.linalg.inv(problem.cell[:2, :2])
        self.min_distance = min_distance

    def __call__(self, positions: np.ndarray, energy: float, floor: float) -> str | None:
        if not math.isfinite(energy) or not np.all(np.isfinite(positions)):
            return "non-finite energy or positions"
        if energy < floor:
            return f"model energy {energy:.2f} eV fell below the floor {floor:.2f} eV"
        z = positions[self.placed, 2]
        if np.any(z < self.zmin) or np.any(z > self.zmax):
            return "a placed atom left the build region"
        if not self.periodic:
            frac = positions[self.placed, :2] @ self.inv_ab
            if np.any(frac < -1e-6) or np.any(frac > 1 + 1e-6):
                return "a placed atom left the build region"
        _, d = get_distances(positions[self.placed], positions, cell=self.cell, pbc=self.pbc)
        close = d < self.dmin
        if np.any(close):
            i, j = np.argwhere(close)[0]
            return (f"atoms {int(self.placed[i])} and {int(j)} at {d[i, j]:.2f} A, closer than "
                    f"{self.min_distance} x their covalent radii")
        return None


def rank_by_acquisition(predictions: Sequence[Prediction], kappa: float, k: int) -> list[int]:
    """Indices of the k candidates with the lowest E - kappa*sigma (GOFEE's screening), best first; ties by index."""
    values = np.array([p.acquisition(kappa) for p in predictions], dtype=float)
    values = np.where(np.isfinite(values), values, np.inf)
    return [int(i) for i in np.argsort(values, kind="stable")[:k]]
