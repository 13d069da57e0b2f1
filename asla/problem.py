"""Build problems: periodic cell, fixed template, bag of atoms, build region, grid, rules, calculator.

A problem is loaded from YAML (a shipped short name such as ``pd100-oxide-3x3`` or a path) and
validated up front, so a typo fails in one line naming the field rather than hours into a run.
"""
from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from ase import Atoms
from ase.data import atomic_numbers, covalent_radii

from .errors import ProblemError
from .grid import Grid, SymmetryGroup, symmetry_group

TOP_KEYS = {"name", "description", "cell", "pbc", "template", "bag", "sequence", "region", "grid",
            "rules", "calculator", "reference", "relax", "faults", "observation", "cache"}
SURFACES = ("fcc100", "fcc110", "fcc111", "bcc100", "bcc110", "bcc111", "hcp0001")


@dataclass(frozen=True)
class Rules:
    """Placement rules in units of the sum of covalent radii (periodic images included)."""

    c_min: float = 0.75
    c_max: float = 1.4


@dataclass(frozen=True)
class Relaxation:
    """Optional local relaxation before the reward, with the real calculator (steps are counted)."""

    steps: int = 0
    fmax: float = 0.05
    # LBFGS keeps every step of a few-step relaxation (memory 100), so it takes the same steps as BFGS (measured:
    # energies equal to 4e-14 eV on Pd oxide builds) without BFGS's eigendecomposition of the 3N x 3N Hessian
    # every step: 10 steps on pd100-oxide-5x5 took 67 ms instead of 264 ms.
    optimizer: str = "LBFGS"


@dataclass(frozen=True)
class Faults:
    """What a failed evaluation becomes: ``worst`` (flagged, worst reward) or ``raise``."""

    on_error: str = "worst"
    timeout: float | None = None
    retries: int = 0
    retry_settings: dict = field(default_factory=dict)


@dataclass
class Problem:
    name: str
    description: str
    cell: np.ndarray
    pbc: tuple[bool, bool, bool]
    template: Atoms
    species: list[str]
    bag: dict[str, int]
    sequence: list[str] | None
    grid: Grid
    rules: Rules
    calculator: dict
    reference: dict
    relax: Relaxation
    faults: Faults
    observation: dict
    source: dict = field(repr=False, default_factory=dict)

    # -- derived quantities -------------------------------------------------------------
    @property
    def n_atoms(self) -> int:
        return sum(self.bag.values())

    @property
    def n_species(self) -> int:
        return len(self.species)

    @property
    def species_numbers(self) -> np.ndarray:
        return np.array([atomic_numbers[s] for s in self.species])

    @property
    def reference_energy(self) -> float | None:
        e = self.reference.get("energy")
        return None if e is None else float(e)

    @functools.cached_property
    def symmetry(self) -> SymmetryGroup:
        return symmetry_group(self.grid, self.template.numbers, self.template.positions)

    @property
    def smear(self) -> float:
        """Width (A) of the Gaussian each atom is drawn with in the observation; 0 = one-hot pixel."""
        return float(self.observation.get("smear", 0.0))

    @functools.cached_property
    def template_layers(self) -> list[float]:
        """Heights of the template's atomic planes nearest the build region (observation channels)."""
        n = int(self.observation.get("template_channels", 2))
        if len(self.template) == 0 or n == 0:
            return []
        zs = np.sort(self.template.positions[:, 2])[::-1]
        planes: list[float] = []
        for z in zs:
            if not planes or abs(planes[-1] - z) > 0.3:
                planes.append(float(z))
        return planes[:n]

    def empty_atoms(self) -> Atoms:
        atoms = self.template.copy()
        atoms.set_cell(self.cell)
        atoms.set_pbc(self.pbc)
        return atoms

    def to_dict(self) -> dict:
        return copy.deepcopy(self.source)


# -- loading ---------------------------------------------------------------------------------

def shipped_problem_dir() -> Path:
    return Path(str(resources.files("asla.configs"))) / "problems"


def list_problems() -> list[str]:
    return sorted(p.stem for p in shipped_problem_dir().glob("*.yaml"))


def load_problem(name_or_path: str | Path | dict | Problem, **overrides: Any) -> Problem:
    """Load a shipped problem by short name, a YAML path, or a dict; validate it."""
    if isinstance(name_or_path, Problem):
        return name_or_path
    if isinstance(name_or_path, dict):
        data = copy.deepcopy(name_or_path)
    else:
        path = Path(name_or_path)
        if not path.suffix and not path.exists():
            path = shipped_problem_dir() / f"{name_or_path}.yaml"
            if not path.exists():
                raise ProblemError("problem", f"unknown problem {str(name_or_path)!r}; shipped problems: "
                                   f"{', '.join(list_problems())} (or give a YAML path)")
        if not path.exists():
            raise ProblemError("problem", f"file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ProblemError("problem", f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ProblemError("problem", f"{path} must hold a mapping of problem fields")
        data.setdefault("name", path.stem)
    for key, value in overrides.items():
        _set_dotted(data, key, value)
    return problem_from_dict(data)


def _set_dotted(data: dict, key: str, value: Any) -> None:
    """Set a (dotted) field; a mapping is merged into the section it overrides, so {rules: {c_min: 0.8}} keeps c_max."""
    parts = key.split(".")
    for part in parts[:-1]:
        data = data.setdefault(part, {})
    data[parts[-1]] = _merged(data.get(parts[-1]), value)


def _merged(old: Any, new: Any) -> Any:
    if isinstance(old, dict) and isinstance(new, dict):
        return {**old, **{k: _merged(old.get(k), v) for k, v in new.items()}}
    return new


def _check_keys(section: str, data: dict, allowed: set[str]) -> None:
    if not isinstance(data, dict):
        raise ProblemError(section, f"must be a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ProblemError(f"{section}.{unknown[0]}" if section else unknown[0],
                           f"unknown key; allowed: {', '.join(sorted(allowed))}")


def _element(symbol: Any, field_name: str) -> str:
    if not isinstance(symbol, str) or symbol not in atomic_numbers or symbol == "X":
        raise ProblemError(field_name, f"unknown element {symbol!r}; use a chemical symbol such as H, C, O, Pd")
    return symbol


def _number(value: Any, field_name: str, positive: bool = False) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ProblemError(field_name, f"must be a number, got {value!r}") from None
    if not math.isfinite(x) or (positive and x <= 0):
        raise ProblemError(field_name, f"must be a {'positive ' if positive else ''}finite number, got {value!r}")
    return x


def _build_cell(spec: Any) -> np.ndarray:
    if isinstance(spec, dict):
        _check_keys("cell", spec, {"a", "b", "c", "gamma"})
        a = _number(spec.get("a"), "cell.a", positive=True)
        b = _number(spec.get("b", a), "cell.b", positive=True)
        c = _number(spec.get("c"), "cell.c", positive=True)
        gamma = _number(spec.get("gamma", 90.0), "cell.gamma")
        if not 0 < gamma < 180:
            raise ProblemError("cell.gamma", f"must lie strictly between 0 and 180 degrees, got {gamma}")
        g = math.radians(gamma)
        return np.array([[a, 0, 0], [b * math.cos(g), b * math.sin(g), 0], [0, 0, c]])
    try:
        cell = np.array(spec, dtype=float)
    except (TypeError, ValueError):
        raise ProblemError("cell", "must be {a, b, c, gamma} or a 3x3 matrix of numbers") from None
    if cell.shape == (3,):
        cell = np.diag(cell)
    if cell.shape != (3, 3) or not np.all(np.isfinite(cell)):
        raise ProblemError("cell", f"must be {{a, b, c, gamma}} or a 3x3 matrix, got shape {cell.shape}")
    if abs(np.linalg.det(cell)) < 1e-6:
        raise ProblemError("cell", "cell vectors are linearly dependent (zero volume)")
    return cell


def _build_template(spec: Any) -> Atoms:
    from ase import build
    if spec is None:
        return Atoms()
    _check_keys("template", spec, {"surface", "symbol", "size", "a", "vacuum", "file", "atoms", "fix"})
    if "file" in spec:
        from ase.io import read
        try:
            return read(spec["file"])
        except Exception as exc:  # noqa: BLE001 - any ase.io failure is a config error here
            raise ProblemError("template.file", f"cannot read {spec['file']!r}: {exc}") from None
    if "atoms" in spec:
        symbols, positions = [], []
        for n, row in enumerate(spec["atoms"]):
            symbols.append(_element(row[0], f"template.atoms[{n}]"))
            positions.append([_number(x, f"template.atoms[{n}]") for x in row[1:4]])
        return Atoms(symbols, positions=positions)
    surface = spec.get("surface")
    if surface not in SURFACES:
        raise ProblemError("template.surface", f"unknown surface {surface!r}; allowed: {', '.join(SURFACES)}")
    symbol = _element(spec.get("symbol"), "template.symbol")
    size = spec.get("size", [1, 1, 3])
    if not (isinstance(size, list) and len(size) == 3 and all(isinstance(s, int) and s > 0 for s in size)):
        raise ProblemError("template.size", f"must be three positive integers, got {size!r}")
    kwargs = {"vacuum": _number(spec.get("vacuum", 8.0), "template.vacuum", positive=True)}
    if "a" in spec:
        kwargs["a"] = _number(spec["a"], "template.a", positive=True)
    try:
        return getattr(build, surface)(symbol, tuple(size), **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise ProblemError("template", f"ase.build.{surface} failed: {exc}") from None


def problem_from_dict(data: dict) -> Problem:
    source = copy.deepcopy(data)
    _check_keys("", data, TOP_KEYS)
    name = str(data.get("name", "problem"))

    # bag and species
    bag_spec = data.get("bag")
    if not isinstance(bag_spec, dict) or not bag_spec:
        raise ProblemError("bag", "must map element symbols to counts, e.g. {Pd: 9, O: 6}")
    bag: dict[str, int] = {}
    for sym, count in bag_spec.items():
        _element(sym, f"bag.{sym}")
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ProblemError(f"bag.{sym}", f"count must be a positive integer, got {count!r}")
        bag[sym] = count
    species = list(bag)

    sequence = data.get("sequence")
    if sequence is not None:
        if not isinstance(sequence, list):
            raise ProblemError("sequence", "must be a list of element symbols, one per atom of the bag")
        for n, sym in enumerate(sequence):
            if sym not in bag:
                raise ProblemError(f"sequence[{n}]", f"element {sym!r} is not in the bag; allowed: {', '.join(species)}")
        counts = {s: sequence.count(s) for s in species}
        if counts != bag:
            raise ProblemError("sequence", f"must use each bag atom once: bag {bag}, sequence has {counts}")

    template = _build_template(data.get("template"))
    if "cell" in data:
        cell = _build_cell(data["cell"])
    elif len(template):
        cell = np.array(template.cell)
    else:
        raise ProblemError("cell", "is required when there is no template")
    if len(template) and (template.cell.rank == 0):
        template.set_cell(cell)
    pbc = tuple(bool(x) for x in data.get("pbc", [True, True, False]))
    if len(pbc) != 3 or pbc[0] != pbc[1] or pbc[2] and not pbc[0]:
        raise ProblemError("pbc", "allowed: [true, true, false] (surface or sheet), [true, true, true] or "
                           f"[false, false, false] (a molecule built in a plane in vacuum); got {data.get('pbc')}")
    template.set_cell(cell)
    template.set_pbc(pbc)
    template.info = {}  # ase.build's adsorbate_info cannot go into extxyz/ase.db

    # build region: heights of the layers
    region = data.get("region", {})
    _check_keys("region", region, {"layers", "above_template", "z"})
    if "z" in region and "above_template" in region:
        raise ProblemError("region", "give either z (absolute heights) or above_template (heights above the top template atom)")
    if "above_template" in region:
        if not len(template):
            raise ProblemError("region.above_template", "needs a template; use region.z for problems without one")
        top = float(template.positions[:, 2].max())
        heights = region["above_template"]
        heights = heights if isinstance(heights, list) else [heights]
        layer_z = [top + _number(h, "region.above_template", positive=True) for h in heights]
    else:
        heights = region.get("z", cell[2, 2] / 2)
        heights = heights if isinstance(heights, list) else [heights]
        layer_z = [_number(h, "region.z") for h in heights]
    if not layer_z or any(not 0 <= z <= cell[2, 2] for z in layer_z):
        raise ProblemError("region", f"layer heights {layer_z} must lie inside the cell (0 to {cell[2, 2]:.2f} A)")

    # grid
    grid_spec = data.get("grid", {})
    _check_keys("grid", grid_spec, {"spacing", "divisions", "shape"})
    if "shape" in grid_spec:
        shape = grid_spec["shape"]
        if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(s, int) and s > 1 for s in shape)):
            raise ProblemError("grid.shape", f"must be two integers > 1, got {shape!r}")
    else:
        spacing = _number(grid_spec.get("spacing", 0.2), "grid.spacing", positive=True)
        div = grid_spec.get("divisions", [1, 1])
        if not (isinstance(div, list) and len(div) == 2 and all(isinstance(d, int) and d > 0 for d in div)):
            raise ProblemError("grid.divisions", f"must be two positive integers, got {div!r}")
        lengths = np.linalg.norm(cell[:2, :2], axis=1)
        shape = [int(d * max(1, round(L / d / spacing))) for L, d in zip(lengths, div)]
    grid = Grid(cell, tuple(shape), layer_z, periodic=pbc[0])

    rules_spec = data.get("rules", {})
    _check_keys("rules", rules_spec, {"c_min", "c_max"})
    rules = Rules(c_min=_number(rules_spec.get("c_min", 0.75), "rules.c_min", positive=True),
                  c_max=_number(rules_spec.get("c_max", 1.4), "rules.c_max", positive=True))
    if rules.c_max <= rules.c_min:
        raise ProblemError("rules.c_max", f"must exceed rules.c_min ({rules.c_min}), got {rules.c_max}")

    calc_spec = data.get("calculator", {"name": "emt"})
    if isinstance(calc_spec, str):
        calc_spec = {"name": calc_spec}
    from .calculators import validate_calculator_spec
    calc_spec = validate_calculator_spec(calc_spec, species + sorted(set(template.get_chemical_symbols())))

    ref = data.get("reference", {}) or {}
    _check_keys("reference", ref, {"energy", "method", "relaxed", "structure", "note"})
    if "energy" in ref and ref["energy"] is not None:
        _number(ref["energy"], "reference.energy")

    relax_spec = data.get("relax", {}) or {}
    _check_keys("relax", relax_spec, {"steps", "fmax", "optimizer"})
    relax = Relaxation(steps=int(relax_spec.get("steps", 0)), fmax=_number(relax_spec.get("fmax", 0.05), "relax.fmax", True),
                       optimizer=str(relax_spec.get("optimizer", Relaxation.optimizer)))
    if relax.optimizer not in ("BFGS", "FIRE", "LBFGS"):
        raise ProblemError("relax.optimizer", f"unknown optimizer {relax.optimizer!r}; allowed: BFGS, FIRE, LBFGS")

    fault_spec = data.get("faults", {}) or {}
    _check_keys("faults", fault_spec, {"on_error", "timeout", "retries", "retry_settings"})
    faults = Faults(on_error=str(fault_spec.get("on_error", "worst")),
                    timeout=None if fault_spec.get("timeout") is None else _number(fault_spec["timeout"], "faults.timeout", True),
                    retries=int(fault_spec.get("retries", 0)),
                    retry_settings=dict(fault_spec.get("retry_settings", {}) or {}))
    if faults.on_error not in ("worst", "raise"):
        raise ProblemError("faults.on_error", f"unknown policy {faults.on_error!r}; allowed: worst, raise")

    obs = data.get("observation", {}) or {}
    _check_keys("observation", obs, {"template_channels", "smear"})
    if "smear" in obs:
        obs = {**obs, "smear": _number(obs["smear"], "observation.smear")}
        if obs["smear"] < 0:
            raise ProblemError("observation.smear", f"must be 0 (one-hot pixels) or a width in A, got {obs['smear']}")

    problem = Problem(name=name, description=str(data.get("description", "")), cell=cell, pbc=pbc,
                      template=template, species=species, bag=bag, sequence=sequence, grid=grid, rules=rules,
                      calculator=calc_spec, reference=dict(ref), relax=relax, faults=faults,
                      observation=dict(obs), source=source)
    _check_fits(problem)
    return problem


def covalent_radius(symbol: str) -> float:
    return float(covalent_radii[atomic_numbers[symbol]])


def _check_fits(problem: Problem) -> None:
    """Refuse a bag that cannot be placed: first by area, then by trying random legal builds."""
    from .builder import BuildState
    area = abs(np.linalg.det(problem.cell[:2, :2])) * problem.grid.n_layers
    need = sum(n * math.pi * (problem.rules.c_min * covalent_radius(s)) ** 2 for s, n in problem.bag.items())
    if need > area:
        raise ProblemError("bag", f"{problem.bag} cannot fit the build region ({area:.1f} A^2 over "
                           f"{problem.grid.n_layers} layer(s)) under rules.c_min={problem.rules.c_min}")
    rng = np.random.default_rng(0)
    for _ in range(50):
        state = BuildState(problem)
        while not state.done:
            legal = np.flatnonzero(state.action_mask())
            if len(legal) == 0:
                break
            state.place(int(rng.choice(legal)))
        if state.done:
            return
    raise ProblemError("bag", f"{problem.bag} cannot fit the build region: no legal completion in 50 random builds "
                       f"on a {problem.grid.shape} grid x {problem.grid.n_layers} layer(s) with "
                       f"rules c_min={problem.rules.c_min}, c_max={problem.rules.c_max}")
