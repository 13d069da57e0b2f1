"""Build problems: periodic cell, fixed template, bag of atoms, build region, grid, rules, calculator.

A problem is loaded from YAML (a shipped short name such as ``pd100-oxide-3x3`` or a path) and
validated up front, so a typo fails in one line naming the field rather than hours into a run.
Every field is declared once in :class:`ProblemSpec` and its sections (type, range, default, doc; see
asla/schema.py); the checks that relate fields (the cell against the heights, the bag's area against the region,
the grid's size) follow in :func:`problem_from_dict`. This module does not import the builder: the random-build
fit check is ``asla.builder.check_fits``.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.data import atomic_numbers, covalent_radii

from . import schema
from .errors import ProblemError
from .grid import Grid, SymmetryGroup, symmetry_group
from .schema import option

SURFACES = ("fcc100", "fcc110", "fcc111", "bcc100", "bcc110", "bcc111", "hcp0001")
OPTIMIZERS = ("BFGS", "FIRE", "LBFGS")
LAYOUTS = ("planes", "volume")  # observation.layout: stacked 2D images (pseudo-3D) or a voxel volume (ASLA-3D)
# Size guards, refused up front with the estimate rather than found by running out of memory. The grid bound is
# about 70x the largest shipped grid (pd100-oxide-5x5: 30x30 x 3 layers); the template's distance table alone is
# points x template atoms x 9 images x 8 bytes. ASLA_MAX_GRID_POINTS raises it.
MAX_GRID_POINTS = int(os.environ.get("ASLA_MAX_GRID_POINTS", 200_000))
MAX_DISTANCE_PAIRS = 20_000_000  # grid points x template atoms: the template-distance table, ~80 bytes a pair at peak
MAX_TEMPLATE_ATOMS = 20_000
MAX_BAG_COUNT = 10_000
MAX_LAYERS = 64


def _element(symbol: Any, field_name: str) -> str:
    if not isinstance(symbol, str) or symbol not in atomic_numbers or symbol == "X":
        raise ProblemError(field_name, f"unknown element {_short(symbol)}; use a chemical symbol such as H, C, O, Pd")
    return symbol


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _int_list(n: int, low: int, high: int) -> Callable[[Any, str], Any]:
    def check(value: Any, name: str) -> list[int]:
        if not (isinstance(value, list) and len(value) == n
                and all(isinstance(v, int) and not isinstance(v, bool) and low <= v <= high for v in value)):
            raise ProblemError(name, f"must be {n} integers from {low} to {high}, got {_short(value)}")
        return value
    return check


def _heights(positive: bool) -> Callable[[Any, str], Any]:
    def check(value: Any, name: str) -> list[float]:
        values = value if isinstance(value, list) else [value]
        if not 1 <= len(values) <= MAX_LAYERS:
            raise ProblemError(name, f"must be a height in A or a list of 1 to {MAX_LAYERS} heights, got "
                               f"{_short(value)}")
        opt = schema.Option("", "number", minimum=0.0 if positive else None, exclusive_minimum=positive)
        return [schema.check_value(opt, v, name, ProblemError) for v in values]
    return check


def _pbc(value: Any, name: str) -> tuple[bool, bool, bool]:
    if isinstance(value, bool):
        return (value, value, value)
    if isinstance(value, list) and len(value) == 3 and all(isinstance(v, bool) for v in value):
        return tuple(value)
    raise ProblemError(name, f"must be true, false or three of them such as [true, true, false], got {_short(value)}")


def _bag(value: Any, name: str) -> dict[str, int]:
    if not isinstance(value, dict) or not value:
        raise ProblemError(name, "must map element symbols to counts, e.g. {Pd: 9, O: 6}")
    for sym, count in value.items():
        _element(sym, f"{name}.{sym}")
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_BAG_COUNT:
            raise ProblemError(f"{name}.{sym}", f"count must be an integer from 1 to {MAX_BAG_COUNT}, got "
                               f"{_short(count)}")
    return dict(value)


def _symbols(value: Any, name: str) -> list[str]:
    for n, sym in enumerate(value):
        if not isinstance(sym, str):
            raise ProblemError(f"{name}[{n}]", f"must be an element symbol, got {_short(sym)}")
    return value


def _symbol(value: Any, name: str) -> str:
    return _element(value, name)


# -- the schema: every problem field once, with its type, range, default and doc ----------------------------

@dataclass(frozen=True)
class TemplateSpec:
    """The fixed atoms under the build region: an ase.build surface, a file, or a list of atoms."""

    surface: str | None = option(None, "ase.build surface", "choice", choices=SURFACES, nullable=True)
    symbol: str | None = option(None, "element of the surface", "any", nullable=True, check=_symbol)
    size: list = option([1, 1, 3], "repeats along a, b and layers", "list", check=_int_list(3, 1, 1000))
    a: float | None = option(None, "lattice constant in A (default: ASE's)", "number", nullable=True,
                             minimum=0.0, exclusive_minimum=True)
    vacuum: float = option(8.0, "vacuum above and below the slab in A", "number", minimum=0.0, exclusive_minimum=True)
    file: str | None = option(None, "a structure file ase.io.read can read (instead of surface)", "str",
                              nullable=True)
    atoms: list | None = option(None, "[[symbol, x, y, z], ...] in A (instead of surface)", "list", nullable=True)
    fix: Any = option(None, "kept for older files; the template is always fixed", "any")


@dataclass(frozen=True)
class RegionSpec:
    """The heights of the build layers."""

    above_template: list | None = option(None, "heights in A above the top template atom (one per layer)", "any",
                                         nullable=True, check=_heights(True))
    z: list | None = option(None, "absolute heights in A (default: half the cell height)", "any", nullable=True,
                            check=_heights(False))
    layers: int | None = option(None, "number of build layers; if given, must equal the number of heights", "int",
                                nullable=True, minimum=1, maximum=MAX_LAYERS)
    z_spacing: float | None = option(None, "voxel grid: build levels every z_spacing A from the first height to the "
                                     "last (give exactly two heights, bottom and top); null: the heights are the "
                                     "layers", "number", nullable=True, minimum=0.0, exclusive_minimum=True)


@dataclass(frozen=True)
class GridSpec:
    """The pixel grid: a spacing (rounded to fit the cell) or an explicit shape."""

    spacing: float = option(0.2, "pixel size in A, rounded so that the grid fits the cell", "number",
                            minimum=0.0, exclusive_minimum=True)
    divisions: list = option([1, 1], "the grid's points along a and b are multiples of these", "list",
                             check=_int_list(2, 1, 10_000))
    shape: list | None = option(None, "[na, nb] points along a and b (instead of spacing)", "list", nullable=True,
                                check=_int_list(2, 2, 100_000))


@dataclass(frozen=True)
class CellSpec:
    """The periodic cell given by lengths and angle (or as a 3x3 matrix instead)."""

    a: float = option(None, "length of a in A", "number", minimum=0.0, exclusive_minimum=True)
    b: float | None = option(None, "length of b in A (default: a)", "number", nullable=True, minimum=0.0,
                             exclusive_minimum=True)
    c: float = option(None, "height of the cell in A", "number", minimum=0.0, exclusive_minimum=True)
    gamma: float = option(90.0, "angle between a and b in degrees", "number", minimum=0.0, exclusive_minimum=True,
                          maximum=180.0)


@dataclass(frozen=True)
class Rules:
    """Placement rules in units of the sum of covalent radii (periodic images included)."""

    c_min: float = option(0.75, "no two atoms closer than c_min x the sum of their covalent radii", "number",
                          minimum=0.0, exclusive_minimum=True, maximum=10.0)
    c_max: float = option(1.4, "each new atom within c_max x the sum of radii of an atom (or the template)",
                          "number", minimum=0.0, exclusive_minimum=True, maximum=10.0)


@dataclass(frozen=True)
class Relaxation:
    """Optional local relaxation before the reward, with the real calculator (steps are counted)."""

    steps: int = option(0, "optimizer steps before the reward (0: single point)", "int", minimum=0, maximum=100_000)
    fmax: float = option(0.05, "force threshold in eV/A that ends the relaxation", "number", minimum=0.0,
                         exclusive_minimum=True)
    # LBFGS keeps every step of a few-step relaxation (memory 100), so it takes the same steps as BFGS (measured:
    # energies equal to 4e-14 eV on Pd oxide builds) without BFGS's eigendecomposition of the 3N x 3N Hessian
    # every step: 10 steps on pd100-oxide-5x5 took 67 ms instead of 264 ms.
    optimizer: str = option("LBFGS", "ase.optimize class", "choice", choices=OPTIMIZERS)


@dataclass(frozen=True)
class Faults:
    """What a failed evaluation becomes: ``worst`` (flagged, worst reward) or ``raise``."""

    on_error: str = option("worst", "worst: flagged, worst reward, the run goes on; raise: the run stops", "choice",
                           choices=("worst", "raise"))
    timeout: float | None = option(None, "seconds before an evaluation counts as failed (null: no limit)", "number",
                                   nullable=True, minimum=0.0, exclusive_minimum=True)
    retries: int = option(0, "retries of a failed evaluation, with retry_settings", "int", minimum=0, maximum=100)
    retry_settings: dict = option({}, "calculator keywords changed for the retries", "mapping")
    min_distance: float = option(0.6, "after the problem's relaxation steps, two atoms closer than this fraction of "
                                 "the sum of their covalent radii make the evaluation a failure (a hole of the "
                                 "potential, which an ML potential may reward; no retry); 0: off", "number",
                                 minimum=0.0, maximum=1.0)


@dataclass(frozen=True)
class ObservationSpec:
    """How the structure is drawn for the network."""

    template_channels: int = option(2, "template planes nearest the build region drawn as channels", "int",
                                    minimum=0, maximum=16)
    smear: float = option(0.0, "0: one-hot pixels; a width in A draws each atom as a Gaussian", "number",
                          minimum=0.0, maximum=5.0)
    layout: str = option("planes", "planes: one image channel per (species, layer), for the 2D network; volume: "
                         "one channel per species over (z level, a, b), for the 3D network (docs/asla-3d.md)",
                         "choice", choices=LAYOUTS)


@dataclass(frozen=True)
class ReferenceSpec:
    """The best known structure, for reporting (not used by the search)."""

    energy: float | None = option(None, "total energy in eV", "number", nullable=True)
    method: str | None = option(None, "how it was found", "str", nullable=True)
    relaxed: bool | None = option(None, "whether it is a relaxed energy (else on-grid)", "bool", nullable=True)
    structure: str | None = option(None, "file of the structure", "str", nullable=True)
    note: str | None = option(None, "free text", "str", nullable=True)


@dataclass(frozen=True)
class ProblemSpec:
    """A build problem as written in YAML (configs/problems/*.yaml); sections may be left out for their defaults."""

    name: str | None = option(None, "short name (default: the file name)", "str", nullable=True)
    description: str = option("", "one line for listings", "str")
    cell: Any = option(None, "{a, b, c, gamma} or a 3x3 matrix in A (default: the template's cell)", "any")
    pbc: Any = option([True, True, False], "[true, true, false] (surface or sheet), [true, true, true], or "
                      "[false, false, false] (a molecule in a plane)", "any", check=_pbc)
    template: TemplateSpec | None = schema.section(TemplateSpec, "fixed atoms under the build region (null: none)",
                                                   nullable=True)
    bag: dict = option(None, "element symbols to counts, e.g. {Pd: 9, O: 6} (required)", "any", check=_bag)
    sequence: list | None = option(None, "forced build order, one symbol per bag atom (default: the agent chooses)",
                                   "list", nullable=True, check=_symbols)
    region: RegionSpec = schema.section(RegionSpec, "build layers")
    grid: GridSpec = schema.section(GridSpec, "pixel grid")
    rules: Rules = schema.section(Rules, "placement rules")
    calculator: Any = option({"name": "emt"}, "emt | tersoff | lj | tblite | gpaw | brenner | chgnet | sevennet | "
                             "sleep | package.module:Class, plus keyword arguments", "any")
    reference: ReferenceSpec = schema.section(ReferenceSpec, "best known structure")
    relax: Relaxation = schema.section(Relaxation, "relaxation before the reward")
    faults: Faults = schema.section(Faults, "failed evaluations")
    observation: ObservationSpec = schema.section(ObservationSpec, "the network's picture")
    cache: Any = option(None, "kept for older files; ignored", "any")


TOP_KEYS = {f.name for f in dataclasses.fields(ProblemSpec)}


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

    @property
    def volume(self) -> bool:
        """Observed as a voxel volume (channels, z level, a, b) for the 3D network, not as stacked planes."""
        return self.observation.get("layout", "planes") == "volume"

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
    """Load a shipped problem by short name, a YAML path, or a dict; validate it.

    Only cheap checks run here (types, ranges, sizes, the bag's area against the build region): loading does no
    random builds. ``asla.builder.check_fits(problem)`` also tries random legal builds (``asla check`` does)."""
    if isinstance(name_or_path, Problem):
        return name_or_path
    if isinstance(name_or_path, dict):
        schema.check_size(name_or_path, "problem", ProblemError)
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
        data = schema.load_yaml_file(path, "problem", ProblemError)
        if not isinstance(data, dict):
            raise ProblemError("problem", f"{path} must hold a mapping of problem fields")
        data.setdefault("name", path.stem)
    for key, value in overrides.items():
        _set_dotted(data, key, value)
    return problem_from_dict(data)


def _set_dotted(data: dict, key: str, value: Any) -> None:
    """Set a (dotted) field; a mapping is merged into the section it overrides, so {rules: {c_min: 0.8}} keeps c_max."""
    parts = key.split(".")
    for n, part in enumerate(parts[:-1]):
        if data.get(part) is None:
            data[part] = {}
        data = data[part]
        if not isinstance(data, dict):
            raise ProblemError(".".join(parts[:n + 1]), f"must be a mapping to set {key}, got {_short(data)}")
    data[parts[-1]] = _merged(data.get(parts[-1]), value)


def _merged(old: Any, new: Any) -> Any:
    if isinstance(old, dict) and isinstance(new, dict):
        return {**old, **{k: _merged(old.get(k), v) for k, v in new.items()}}
    return new


def _number(value: Any, field_name: str, positive: bool = False) -> float:
    opt = schema.Option("", "number", minimum=0.0 if positive else None, exclusive_minimum=positive)
    return float(schema.check_value(opt, value, field_name, ProblemError))


def _build_cell(spec: Any) -> np.ndarray:
    if isinstance(spec, dict):
        cs = schema.from_mapping(CellSpec, spec, "cell.", ProblemError)
        for key in ("a", "c"):
            if getattr(cs, key) is None:
                raise ProblemError(f"cell.{key}", "is required: a positive length in A")
        a, c, gamma = float(cs.a), float(cs.c), float(cs.gamma)
        b = a if cs.b is None else float(cs.b)
        if not 0 < gamma < 180:
            raise ProblemError("cell.gamma", f"must lie strictly between 0 and 180 degrees, got {gamma}")
        g = math.radians(gamma)
        return np.array([[a, 0, 0], [b * math.cos(g), b * math.sin(g), 0], [0, 0, c]])
    try:
        cell = np.array(spec, dtype=float)
    except (TypeError, ValueError, OverflowError):
        raise ProblemError("cell", "must be {a, b, c, gamma} or a 3x3 matrix of numbers") from None
    if cell.shape == (3,):
        cell = np.diag(cell)
    if cell.shape != (3, 3) or not np.all(np.isfinite(cell)):
        raise ProblemError("cell", f"must be {{a, b, c, gamma}} or a 3x3 matrix of finite numbers, got shape "
                           f"{cell.shape}")
    if abs(np.linalg.det(cell)) < 1e-6:
        raise ProblemError("cell", "cell vectors are linearly dependent (zero volume)")
    return cell


def _build_template(spec: TemplateSpec | None) -> Atoms:
    from ase import build
    if spec is None:
        return Atoms()
    if spec.file is not None:
        from ase.io import read
        try:
            atoms = read(spec.file)
        except Exception as exc:  # noqa: BLE001 - any ase.io failure is a config error here
            raise ProblemError("template.file", f"cannot read {spec.file!r}: {exc}") from None
        if len(atoms) > MAX_TEMPLATE_ATOMS:
            raise ProblemError("template.file", f"holds {len(atoms)} atoms; at most {MAX_TEMPLATE_ATOMS}")
        return atoms
    if spec.atoms is not None:
        if len(spec.atoms) > MAX_TEMPLATE_ATOMS:
            raise ProblemError("template.atoms", f"lists {len(spec.atoms)} atoms; at most {MAX_TEMPLATE_ATOMS}")
        symbols, positions = [], []
        for n, row in enumerate(spec.atoms):
            if not isinstance(row, list) or len(row) != 4:
                raise ProblemError(f"template.atoms[{n}]", f"must be [symbol, x, y, z], got {_short(row)}")
            symbols.append(_element(row[0], f"template.atoms[{n}]"))
            positions.append([_number(x, f"template.atoms[{n}]") for x in row[1:4]])
        return Atoms(symbols, positions=positions)
    if spec.surface is None:
        raise ProblemError("template.surface", f"is required (or file, or atoms); allowed: {', '.join(SURFACES)}")
    if spec.symbol is None:
        raise ProblemError("template.symbol", "is required with template.surface: an element such as Pd")
    size = spec.size
    if math.prod(size) > MAX_TEMPLATE_ATOMS:
        raise ProblemError("template.size", f"{size} gives {math.prod(size)} or more atoms; at most "
                           f"{MAX_TEMPLATE_ATOMS}")
    kwargs = {"vacuum": float(spec.vacuum)}
    if spec.a is not None:
        kwargs["a"] = float(spec.a)
    try:
        return getattr(build, spec.surface)(spec.symbol, tuple(size), **kwargs)
    except Exception as exc:  # noqa: BLE001 - ase.build raises many types for impossible surfaces
        raise ProblemError("template", f"ase.build.{spec.surface} failed: {exc}") from None


def _layer_heights(region: RegionSpec, template: Atoms, cell: np.ndarray) -> list[float]:
    if region.z is not None and region.above_template is not None:
        raise ProblemError("region", "give either z (absolute heights) or above_template (heights above the top "
                           "template atom)")
    if region.above_template is not None:
        if not len(template):
            raise ProblemError("region.above_template", "needs a template; use region.z for problems without one")
        top = float(template.positions[:, 2].max())
        layer_z = [top + h for h in region.above_template]
    else:
        layer_z = [float(z) for z in (region.z if region.z is not None else [cell[2, 2] / 2])]
    if region.z_spacing is not None:
        layer_z = _voxel_levels(layer_z, float(region.z_spacing), "region.z" if region.z is not None else
                                "region.above_template")
    if any(not 0 <= z <= cell[2, 2] for z in layer_z):
        raise ProblemError("region", f"layer heights {layer_z} must lie inside the cell (0 to {cell[2, 2]:.2f} A)")
    if region.layers is not None and region.layers != len(layer_z):
        raise ProblemError("region.layers", f"is {region.layers} but {len(layer_z)} height(s) are given")
    return layer_z


def _voxel_levels(bounds: list[float], dz: float, where: str) -> list[float]:
    """The z levels of a voxel grid: bottom, bottom + dz, ... up to the top (within 1e-6 A), at most MAX_LAYERS."""
    if len(bounds) != 2 or not bounds[0] < bounds[1]:
        raise ProblemError(where, f"with region.z_spacing must be two heights [bottom, top], bottom below top, got "
                           f"{bounds}")
    n = int(math.floor((bounds[1] - bounds[0]) / dz + 1e-6)) + 1
    if n > MAX_LAYERS:
        raise ProblemError("region.z_spacing", f"{dz} A gives {n} levels from {bounds[0]} to {bounds[1]} A; at most "
                           f"{MAX_LAYERS}: use a coarser spacing")
    return [bounds[0] + k * dz for k in range(n)]


def _grid_shape(spec: GridSpec, cell: np.ndarray, n_layers: int) -> tuple[int, int]:
    """The grid's shape, refused up front if it would exceed MAX_GRID_POINTS (before anything is allocated)."""
    if spec.shape is not None:
        shape, where = tuple(spec.shape), "grid.shape"
    else:
        lengths = np.linalg.norm(cell[:2, :2], axis=1)
        div = spec.divisions
        shape = tuple(int(d * max(1, round(L / d / spec.spacing))) for L, d in zip(lengths, div, strict=True))
        where = "grid.spacing" if spec.spacing * 100 < max(lengths) else "grid.divisions"
    points = shape[0] * shape[1] * n_layers
    if points > MAX_GRID_POINTS:
        raise ProblemError(where, f"gives a {shape[0]}x{shape[1]} grid x {n_layers} layer(s) = {points:,} points, "
                           f"above the limit of {MAX_GRID_POINTS:,} (environment variable ASLA_MAX_GRID_POINTS); "
                           "use a coarser spacing")
    return shape


def problem_from_dict(data: dict) -> Problem:
    source = copy.deepcopy(data)
    if data.get("name") is not None and not isinstance(data["name"], str):
        data = {**data, "name": str(data["name"])}
    spec: ProblemSpec = schema.from_mapping(ProblemSpec, data, "", ProblemError)
    name = spec.name or "problem"

    # bag and species
    if spec.bag is None:
        raise ProblemError("bag", "must map element symbols to counts, e.g. {Pd: 9, O: 6}")
    bag = spec.bag
    species = list(bag)
    sequence = spec.sequence
    if sequence is not None:
        for n, sym in enumerate(sequence):
            if sym not in bag:
                raise ProblemError(f"sequence[{n}]",
                                   f"element {sym!r} is not in the bag; allowed: {', '.join(species)}")
        counts = {s: sequence.count(s) for s in species}
        if counts != bag:
            raise ProblemError("sequence", f"must use each bag atom once: bag {bag}, sequence has {counts}")

    template = _build_template(spec.template)
    if spec.cell is not None:
        cell = _build_cell(spec.cell)
    elif len(template):
        cell = np.array(template.cell)
    else:
        raise ProblemError("cell", "is required when there is no template")
    pbc = spec.pbc if isinstance(spec.pbc, tuple) else _pbc(spec.pbc, "pbc")
    if pbc[0] != pbc[1] or pbc[2] and not pbc[0]:
        raise ProblemError("pbc", "allowed: [true, true, false] (surface or sheet), [true, true, true] or "
                           f"[false, false, false] (a molecule built in a plane in vacuum); got {data.get('pbc')}")
    template.set_cell(cell)
    template.set_pbc(pbc)
    template.info = {}  # ase.build's adsorbate_info cannot go into extxyz/ase.db

    layer_z = _layer_heights(spec.region, template, cell)
    shape = _grid_shape(spec.grid, cell, len(layer_z))
    pairs = shape[0] * shape[1] * len(layer_z) * len(template)
    if pairs > MAX_DISTANCE_PAIRS:
        raise ProblemError("grid", f"{shape[0]}x{shape[1]} points x {len(layer_z)} layer(s) x {len(template)} template "
                           f"atoms = {pairs:,} distances (about {pairs * 80 / 1e9:.1f} GB), above the limit of "
                           f"{MAX_DISTANCE_PAIRS:,}; use a coarser grid or a smaller template")
    grid = Grid(cell, shape, layer_z, periodic=pbc[0])

    rules = Rules(c_min=float(spec.rules.c_min), c_max=float(spec.rules.c_max))
    relax = dataclasses.replace(spec.relax, fmax=float(spec.relax.fmax))
    faults = spec.faults if spec.faults.timeout is None else dataclasses.replace(spec.faults,
                                                                                timeout=float(spec.faults.timeout))
    if rules.c_max <= rules.c_min:
        raise ProblemError("rules.c_max", f"must exceed rules.c_min ({rules.c_min}), got {rules.c_max}")

    calc_spec = spec.calculator
    if isinstance(calc_spec, str):
        calc_spec = {"name": calc_spec}
    from .calculators import validate_calculator_spec
    calc_spec = validate_calculator_spec(calc_spec, species + sorted(set(template.get_chemical_symbols())))

    ref = data.get("reference", {}) or {}   # the fields given, as before (checked by ReferenceSpec above)
    obs = data.get("observation", {}) or {}
    obs = {k: (float(v) if k == "smear" else v) for k, v in obs.items()}

    problem = Problem(name=name, description=spec.description, cell=cell, pbc=pbc,
                      template=template, species=species, bag=dict(bag), sequence=sequence, grid=grid, rules=rules,
                      calculator=calc_spec, reference=dict(ref), relax=relax, faults=faults,
                      observation=dict(obs), source=source)
    check_area(problem)
    return problem


def covalent_radius(symbol: str) -> float:
    return float(covalent_radii[atomic_numbers[symbol]])


def check_area(problem: Problem) -> None:
    """Refuse a bag whose atoms' exclusion discs (c_min x covalent radius) exceed the build region's area.

    Cheap, so every load runs it; the search for a legal completion is asla.builder.check_fits."""
    area = abs(np.linalg.det(problem.cell[:2, :2])) * problem.grid.n_layers
    need = sum(n * math.pi * (problem.rules.c_min * covalent_radius(s)) ** 2 for s, n in problem.bag.items())
    if need > area:
        raise ProblemError("bag", f"{problem.bag} cannot fit the build region ({area:.1f} A^2 over "
                           f"{problem.grid.n_layers} layer(s)) under rules.c_min={problem.rules.c_min}")
