"""Reference global minima, established independently of the RL agent.

Per problem: chemically motivated candidates (graphene: the perfect honeycomb, whose sites are grid
points), then random legal builds each relaxed with the problem's calculator (template fixed), then
basin hopping from the best (move one or two placed atoms to a random legal site, or rattle all
placed atoms, relax, Metropolis acceptance). The lowest relaxed energy is the reference. Every
relaxation step is counted. Writes OUT/reference-minima.json, OUT/reference-minima.md and
OUT/reference/<slug>.extxyz (OUT: --out, default ./docs); a problem may be a shipped name or a YAML path anywhere
(<slug>: its name, or for a file its stem and a hash of its path, as the benchmark names it). The problem's
`reference:` section is rewritten only with --update-yaml (a shipped problem's file only then, too).

Usage:
    python scripts/reference_minima.py --problems pd100-oxide-2x2 pd100-oxide-3x3 --minutes 10
    python scripts/reference_minima.py --problems my/oxide.yaml --minutes 5 --out my/reference --update-yaml
"""
from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.calculators.calculator import CalculationFailed
from ase.constraints import FixAtoms
from ase.optimize import BFGS, FIRE

from asla import load_problem
from asla.bench.problems import is_shipped, slug
from asla.builder import BuildState, atoms_from_actions, encode_action, random_build
from asla.calculators import make_calculator
from asla.enumerate import lattice_gas_arrangements, stacking_sites
from asla.errors import AslaError
from asla.problem import shipped_problem_dir
from asla.storage import atomic_write_text, write_json

COLLAPSE = 0.6


def collapsed(atoms: Atoms, fraction: float = COLLAPSE) -> bool:
    """Two atoms closer than `fraction` of the sum of their covalent radii: not a structure but a hole of the
    potential (asla.reward.collapsed_pair, which the reward applies after its relaxation steps too)."""
    from asla.reward import collapsed_pair
    return collapsed_pair(atoms, fraction) is not None


class Search:
    def __init__(self, problem, seed: int) -> None:
        self.p = problem
        self.rng = np.random.default_rng(seed)
        self.calc = make_calculator(problem.calculator)
        self.n_calls = 0
        self.n_relax = 0
        self.n_collapsed = 0
        self.best: Atoms | None = None
        self.best_e = math.inf
        self.log: list[str] = []
        self.near: list[tuple[float, Atoms]] = []  # relaxed structures within NEAR eV of the best, for the gap

    NEAR = 0.1  # eV: relaxed structures kept to find the lowest one distinct from the minimum
    NEAR_KEPT = 300

    def relax(self, atoms: Atoms, fmax: float = 0.05, steps: int = 400) -> tuple[float, Atoms]:
        a = atoms.copy()
        a.set_constraint(FixAtoms(indices=range(len(self.p.template))))
        a.calc = self.calc
        opt = FIRE(a, logfile=None)
        opt2 = BFGS(a, logfile=None)
        try:
            opt.run(fmax=0.3, steps=steps // 2)
            opt2.run(fmax=fmax, steps=steps)
            e = float(a.get_potential_energy())
        except CalculationFailed:  # e.g. an xTB SCF that does not converge on a wild geometry: no minimum from it
            e = math.inf
        self.n_calls += opt.nsteps + opt2.nsteps + 2
        self.n_relax += 1
        if not math.isfinite(e):
            return math.inf, a
        # placed atoms that left the slab region (desorbed into vacuum) make no surface structure
        if np.any(a.positions[len(self.p.template):, 2] > max(self.p.grid.layer_z) + 4.0):
            return math.inf, a
        if collapsed(a):
            self.n_collapsed += 1
            return math.inf, a
        if e < self.best_e - 1e-6:
            self.best_e, self.best = e, a.copy()
            self.log.append(f"{self.n_relax} relaxations: {e:.4f} eV")
        if e < self.best_e + self.NEAR:
            self.near.append((e, a.copy()))
            if len(self.near) > 2 * self.NEAR_KEPT:
                self.near = sorted((r for r in self.near if r[0] < self.best_e + self.NEAR), key=lambda r: r[0])
                self.near = self.near[:self.NEAR_KEPT]
        return e, a

    def second_minimum(self) -> float | None:
        """How far (eV) above the best the lowest relaxed structure lies that is not the best itself (the strict
        criterion's test, asla.bench.judge.same_structure); None if none within NEAR eV was relaxed. An energy
        window of 0.05 eV counts structures this close as found; the strict criterion does not."""
        from asla.bench.judge import same_structure
        if self.best is None:
            return None
        for e, atoms in sorted(self.near, key=lambda r: r[0]):
            if e < self.best_e + self.NEAR and same_structure(self.p, atoms, self.best) is False:  # None: not judged
                return e - self.best_e
        return None

    def random_phase(self, seconds: float) -> tuple[float, Atoms | None]:
        """Relax random legal builds for `seconds`; returns the lowest energy (and structure) this phase reached by
        itself."""
        t0, low, low_atoms = time.time(), math.inf, None
        while time.time() - t0 < seconds:
            s = random_build(self.p, self.rng)
            if s.done:
                e, relaxed = self.relax(s.atoms())
                if e < low:
                    low, low_atoms = e, relaxed
        return low, low_atoms

    def candidates(self, named: list[tuple[str, Atoms]]) -> list[str]:
        """Relax each named starting structure; returns one line per candidate with its relaxed energy."""
        lines = []
        for what, atoms in named:
            t0 = time.time()
            e, _ = self.relax(atoms)
            lost = " (discarded: an atom desorbed or two collapsed)"
            lines.append(f"{what}: {e:.4f} eV" + ("" if math.isfinite(e) else lost))
            print(f"  candidate {lines[-1]} ({time.time() - t0:.0f} s)", flush=True)
        return lines

    def basin_hopping(self, seconds: float, kT: float = 0.15, start: tuple[float, Atoms] | None = None) -> float:
        """Metropolis basin hopping for `seconds` from `start` (default: the best so far); returns the lowest energy
        this walk reached itself (a walk from another structure than the best checks that it does not go lower)."""
        if start is None and self.best is None:
            return math.inf
        cur_e, cur = start if start is not None else (self.best_e, self.best)
        cur, low = cur.copy(), cur_e
        n_t = len(self.p.template)
        t0 = time.time()
        while time.time() - t0 < seconds:
            trial = cur.copy()
            trial.set_constraint()
            if self.rng.random() < 0.5:  # move one or two placed atoms to random legal grid sites
                for _ in range(int(self.rng.integers(1, 3))):
                    i = int(self.rng.integers(n_t, len(trial)))
                    trial.positions[i, :2] = self.rng.random(2) @ self.p.cell[:2, :2]
                    trial.positions[i, 2] = self.rng.choice(self.p.grid.layer_z)
            else:
                trial.positions[n_t:] += self.rng.normal(0, 0.4, size=(len(trial) - n_t, 3))
                if not any(self.p.pbc) and self.p.grid.n_layers == 1:
                    # a molecule built in one plane: its builds relax within the plane (the out-of-plane forces
                    # vanish by symmetry), so the search stays in it too
                    trial.positions[n_t:, 2] = self.p.grid.layer_z[0]
            d = trial.get_all_distances(mic=True)[n_t:, :]
            np.fill_diagonal(d[:, n_t:], 9.0)
            if d.min() < 0.8:
                continue
            e, relaxed = self.relax(trial)
            low = min(low, e)
            if e < cur_e or self.rng.random() < math.exp(-(e - cur_e) / kT):
                cur, cur_e = relaxed, e
        return low


def motif_species(p) -> tuple[str, str] | str:  # an asla Problem
    """The two species of the overlayer motif (the template's top-layer metal, one atom per top site, and one
    other element, at most one per top site), or the one-line reason the motif does not apply."""
    if not len(p.template):
        return "the motif needs a template surface; this problem has none"
    top_z = p.template.positions[:, 2].max()
    top = np.abs(p.template.positions[:, 2] - top_z) < 0.3
    metals = sorted(set(np.array(p.template.get_chemical_symbols())[top]))
    n_tops = int(top.sum())
    if len(p.bag) != 2 or len(metals) != 1 or p.bag.get(metals[0]) != n_tops:
        return (f"the motif needs a bag of two elements, the surface's top-layer metal once per top site "
                f"({n_tops} x {'/'.join(metals)}) and one other; this bag is {p.bag}")
    other = next(s for s in p.bag if s != metals[0])
    if p.bag[other] > n_tops:
        return f"the motif needs at most one {other} per top site ({n_tops}); the bag has {p.bag[other]}"
    if p.grid.n_layers < 2:
        return "the motif needs two build layers (metal in the hollows, the other element above)"
    return metals[0], other


class MotifSites:
    """The sites of the overlayer motif on this problem's surface: the top sites of the template's top layer, the
    hollow sites (a surface atom plus half a diagonal), the bridge sites of the new metal layer, and the
    symmetry-distinct ways of choosing some of the top sites (under every operation of grid + template)."""

    def __init__(self, p) -> None:
        self.p = p
        top_z = p.template.positions[:, 2].max()
        self.top_z = float(top_z)
        self.tops = p.template.positions[np.abs(p.template.positions[:, 2] - top_z) < 0.3]
        self.a_s = float(np.sort(np.linalg.norm(self.tops[1:, :2] - self.tops[0, :2], axis=1))[0])
        u, v = (p.cell[k, :2] / np.linalg.norm(p.cell[k, :2]) for k in (0, 1))
        self.diag = (u + v) * self.a_s / 2
        self.bridge = u * self.a_s / 2   # from a hollow site: the bridge between two neighbouring new-layer atoms
        grid = p.grid
        self.upper = int(np.argmax(grid.layer_z))
        self.middle = int(np.argsort(grid.layer_z)[1]) if grid.n_layers > 2 else 0
        self.hollow_pts = grid.nearest_point(self.tops + np.append(self.diag, 0.0))
        self.top_pts = grid.nearest_point(self.tops)

    def distinct_choices(self, n: int) -> list[int]:
        """Bitmasks (bit i: top site i) of the symmetry-distinct choices of n top sites, each its class's smallest."""
        from itertools import combinations, islice
        sym = self.p.symmetry
        ms, ts = sym.all_ops()
        mapped = sym.apply(ms, ts, np.broadcast_to(self.top_pts, (len(ms), len(self.top_pts))))
        index = {int(k): i for i, k in enumerate(self.top_pts)}
        perms = np.array([[index[int(k)] for k in row] for row in mapped])
        combos = combinations(range(len(self.top_pts)), n)
        bits = 1 << np.arange(len(self.top_pts), dtype=np.int64)
        unique: set[int] = set()
        while True:
            chunk = np.array(list(islice(combos, 200000)), dtype=np.int64)
            if len(chunk) == 0:
                break
            canon = np.full(len(chunk), np.iinfo(np.int64).max)
            for perm in perms:
                canon = np.minimum(canon, bits[perm[chunk]].sum(axis=1))
            unique.update(canon.tolist())
        return sorted(unique)

    def occupied(self, mask: int) -> np.ndarray:
        return np.array([i for i in range(len(self.tops)) if mask >> i & 1], dtype=int)


def overlayer_motif_phase(search: Search, top_k: int, highest_k: int = 0, log_every: int = 2000) -> str:
    """Exhaustive search within one overlayer motif (that of the Pd(100) oxides): the template's metal M in every
    hollow site (continuing the fcc stacking, middle build layer) and the other element X above a
    symmetry-distinct choice of the surface's top sites (upper build layer, i.e. in the hollows of the new M
    layer). Each arrangement is scored by a single point on the grid; the `top_k` lowest and the `highest_k` highest
    are relaxed (template fixed): relaxation reorders them, and on the 5x5 EMT oxide the minimum's arrangement had
    the HIGHEST single point of 10,510 (docs/reference-minima.md). Where the bag does not fit the motif (see
    `motif_species`), it says why in one line and nothing runs.

    The motif is the one of the 2x2 basin-hopping minimum (Pd4O4) and of the best 3x3 structure known with EMT; it
    is a hypothesis for larger cells and other calculators, so random relaxed builds and basin hopping without it
    run as well.
    """
    p = search.p
    species = motif_species(p)
    if isinstance(species, str):
        return f"motif search not applicable: {species}"
    metal, other = species
    sites = MotifSites(p)
    n_o = p.bag[other]
    unique = sites.distinct_choices(n_o)
    # single points on the grid
    pd_actions = [encode_action(p, p.species.index(metal), sites.middle, int(k)) for k in sites.hollow_pts]
    o_species = p.species.index(other)
    scored = []
    for mask in unique:
        actions = pd_actions + [encode_action(p, o_species, sites.upper, int(sites.top_pts[n]))
                                for n in sites.occupied(mask)]
        atoms = atoms_from_actions(p, actions)
        atoms.calc = search.calc
        scored.append((float(atoms.get_potential_energy()), actions))
        search.n_calls += 1
    scored.sort(key=lambda r: r[0])
    ranks = sorted(set(range(min(top_k, len(scored)))) | set(range(max(0, len(scored) - highest_k), len(scored))))
    energies = []
    for n, rank in enumerate(ranks):
        energies.append(search.relax(atoms_from_actions(p, scored[rank][1]))[0])
        if n % log_every == 0:
            print(f"  motif: relaxed {n}/{len(ranks)}, best {search.best_e:.4f} eV", flush=True)
    which = (f"all {len(scored)}" if len(ranks) == len(scored) else
             f"the {min(top_k, len(scored))} lowest and the {min(highest_k, len(scored))} highest")
    best_rank = ranks[int(np.argmin(energies))] + 1 if energies else 0
    return (f"motif search: {metal} in all {len(sites.hollow_pts)} hollow sites, {other} above every one of the "
            f"{len(unique)} symmetry-distinct choices of {n_o} of {len(sites.top_pts)} top sites, single points on "
            f"the grid, {which} relaxed (lowest relaxed: single-point rank {best_rank} of {len(scored)}, "
            f"{min(energies, default=math.inf):.4f} eV)")


def placed(p, symbols: list[str], positions: list[np.ndarray]) -> Atoms:
    """The template plus atoms at free positions (a starting point for a relaxation, not a grid build)."""
    atoms = p.empty_atoms()
    atoms.extend(Atoms(symbols, positions=np.array(positions)))
    return atoms


def oxide_candidates(p) -> list[tuple[str, Atoms]]:
    """Chemically natural starting structures for oxygen and metal adatoms on an fcc(100) surface, beyond the
    motif's grid arrangements: each relaxed as a candidate, so that the reference does not rest on one search.

    - rocksalt: M in every hollow site (a/2 above the surface) and X on top sites in the same plane (the
      checkerboard of an MO(100) rocksalt layer, X atop a surface atom: M-X a/2), every symmetry-distinct choice;
    - bridge: M in every hollow site and X on bridge sites of the new M layer (2-fold), 1.2 A above it;
    - surface hollow: X in the surface's own 4-fold hollow sites (0.9 A above it, as O on Pd(100) in c(2x2)-O),
      M in the hollows left free and the rest of M above the X atoms (M-X 2.0 A), every distinct choice.
    Empty where `motif_species` says the motif does not apply.
    """
    species = motif_species(p)
    if isinstance(species, str):
        return []
    metal, other = species
    sites = MotifSites(p)
    n_m, n_x = p.bag[metal], p.bag[other]
    h = sites.a_s / math.sqrt(2)   # a/2: the height of the next fcc(100) layer (a_s = a/sqrt(2))
    hollows = [t + np.append(sites.diag, sites.top_z - t[2] + h) for t in sites.tops]
    out = []
    for mask in sites.distinct_choices(n_x):
        xs = [t + [0, 0, h] for t in sites.tops[sites.occupied(mask)]]
        out.append((f"rocksalt layer ({other} top sites {sites.occupied(mask).tolist()})",
                    placed(p, [metal] * n_m + [other] * n_x, hollows + xs)))
    rows = [hollows[i] + np.append(sites.bridge, 1.2) for i in range(n_x)]
    out.append((f"{other} on bridge sites of the {metal} layer",
                placed(p, [metal] * n_m + [other] * n_x, hollows + rows)))
    for mask in sites.distinct_choices(n_x)[:2]:
        occ = set(sites.occupied(mask).tolist())
        xs = [hollows[i] - [0, 0, h - 0.9] for i in sorted(occ)]
        free = [hollows[i] for i in range(len(hollows)) if i not in occ][:n_m]
        above = [x + [0, 0, 2.0] for x in xs][:n_m - len(free)]
        if len(free) + len(above) == n_m:
            out.append((f"{other} in surface hollows {sorted(occ)}, {metal} in the free hollows and above {other}",
                        placed(p, [metal] * n_m + [other] * n_x, free + above + xs)))
    return out


def mapped_candidate(p, path: Path) -> tuple[str, Atoms]:
    """A structure of the same problem on another template (e.g. the EMT reference on CHGNet's lattice): its placed
    atoms (the last len(bag) atoms) keep their fractional in-plane coordinates and their height above the top
    layer, the height scaled by the ratio of the lattices (the file's template is the same size as this one)."""
    from ase.io import read
    src = read(path)
    n_t = len(p.template)
    n_placed = sum(p.bag.values())
    if len(src) != n_t + n_placed:
        raise SystemExit(f"--candidates: {path} has {len(src)} atoms; this problem has {n_t} + {n_placed}")
    scale = np.linalg.norm(p.cell[0]) / np.linalg.norm(src.cell[0])
    frac = src.cell.scaled_positions(src.positions[n_t:])
    xyz = frac @ np.asarray(p.cell)
    xyz[:, 2] = p.template.positions[:, 2].max() + scale * (src.positions[n_t:, 2] - src.positions[:n_t, 2].max())
    return f"{path.name} mapped onto this template", placed(p, src.get_chemical_symbols()[n_t:], list(xyz))


def lattice_gas_phase(search: Search, top_k: int) -> str:
    """Exhaustive search within the lattice-gas motif of adatoms (`lattice_gas_arrangements`): every arrangement
    scored by a single point on the grid, the `top_k` lowest relaxed (template fixed). Where the motif does not
    apply it says why in one line and nothing runs."""
    p = search.p
    arrangements = lattice_gas_arrangements(p)
    if isinstance(arrangements, str):
        return f"lattice-gas search not applicable: {arrangements}"
    scored = []
    for actions in arrangements:
        atoms = atoms_from_actions(p, actions)
        atoms.calc = search.calc
        scored.append((float(atoms.get_potential_energy()), actions))
        search.n_calls += 1
    scored.sort(key=lambda r: r[0])
    for _, actions in scored[:top_k]:
        search.relax(atoms_from_actions(p, actions))
    return (f"lattice-gas search: every one of the {len(scored)} symmetry-distinct ways to put "
            f"{' + '.join(f'{k} {sp}' for sp, k in p.bag.items())} on the {len(stacking_sites(p))} hollow sites of "
            f"the lowest build layer (one atom per site), single points on the grid, the {min(top_k, len(scored))} "
            f"lowest relaxed")


def honeycomb(problem) -> Atoms:
    """The perfect honeycomb on a (2sqrt3 x 2sqrt3)R30 cell: its sites are multiples of 1/6 of the cell."""
    from ase.build import graphene, make_supercell
    a = np.linalg.norm(problem.cell[0]) / (2 * math.sqrt(3))
    sc = make_supercell(graphene(a=a, size=(1, 1, 1), vacuum=6), np.array([[4, 2, 0], [-2, 2, 0], [0, 0, 1]]))
    ij = np.rint(sc.get_scaled_positions()[:, :2] * [problem.grid.na, problem.grid.nb]).astype(int)
    acts = [encode_action(problem, 0, 0, problem.grid.point_index(int(i), int(j))) for i, j in ij]
    s, left = BuildState(problem), list(acts)
    while left:
        m = s.action_mask()
        nxt = next(a for a in left if m[a])
        s.place(nxt)
        left.remove(nxt)
    return s.atoms()


def update_yaml(path: Path, energy: float, method: str, structure: str) -> None:
    """Rewrite the `reference:` section of the problem YAML at `path` (atomically)."""
    text = path.read_text()
    text = re.sub(r"\nreference:\n(?:  .*\n|    .*\n)*", "\n", text).rstrip() + "\n"
    text += (f"reference:\n  energy: {energy:.6f}\n  relaxed: true\n  structure: {structure}\n"
             f"  method: >-\n    {method}\n")
    atomic_write_text(path, text)


def problem_file(name: str) -> Path:
    return shipped_problem_dir() / f"{name}.yaml" if is_shipped(name) else Path(name).resolve()


def structure_entry(written: Path, yaml_path: Path, name: str) -> str:
    """How the YAML names the structure: the shipped problems by their docs/reference/ path (relative to the source
    tree, as the benchmark looks for it); a user's file relative to its folder where the structure lies below it."""
    if is_shipped(name):
        return f"docs/reference/{written.name}"
    try:
        return str(written.resolve().relative_to(yaml_path.parent))
    except ValueError:
        return str(written.resolve())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", nargs="+", default=["graphene-c24", "pd100-oxide-2x2", "pd100-oxide-3x3",
                                                        "pd100-oxide-5x5"],
                    help="shipped problem names or problem YAML paths")
    ap.add_argument("--minutes", type=float, default=10.0, help="search time per problem (random + basin hopping)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--random-fraction", type=float, default=0.4,
                    help="share of --minutes for random relaxed builds, the rest basin hopping from the best "
                         "(0: basin hopping only, e.g. from a --candidates structure)")
    ap.add_argument("--motif-top-k", type=int, default=0,
                    help="overlayer motif (the template's metal in the hollows, one other element above top sites): "
                         "relax the K lowest arrangements first (0: skip); says so where the bag does not fit it")
    ap.add_argument("--lattice-gas-top-k", type=int, default=0,
                    help="adatoms: every symmetry-distinct filling of the surface's hollow sites by the bag in the "
                         "lowest build layer scored by a single point, the K lowest relaxed first (0: skip); says so "
                         "where the problem does not fit it")
    ap.add_argument("--relax-first", metavar="FILE", help="a structure file (every frame: template + bag atoms, "
                    "as built) of chemically motivated candidates, each relaxed as it is before the search")
    ap.add_argument("--motif-highest-k", type=int, default=0,
                    help="relax the H arrangements of the motif with the HIGHEST single points as well (relaxation "
                         "reorders them: the 5x5 EMT minimum had the highest of all)")
    ap.add_argument("--oxide-candidates", action="store_true",
                    help="relax chemically natural starting points for O and metal adatoms on fcc(100) too "
                         "(rocksalt layer, O on bridge sites, O in the surface's hollows: oxide_candidates)")
    ap.add_argument("--candidates", nargs="+", type=Path, default=[],
                    help="extxyz structures of the same bag on a template of the same size (e.g. the EMT "
                         "reference), mapped onto this template and relaxed as candidates")
    ap.add_argument("--out", default="docs", help="where reference-minima.json/.md and reference/ go (default ./docs)")
    ap.add_argument("--update-yaml", action="store_true",
                    help="write a new reference into the problem's YAML (a shipped problem's file too); default: "
                         "the YAML is never rewritten")
    ap.add_argument("--report-only", action="store_true", help="rewrite OUT/reference-minima.md from the JSON")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.report_only:
        write_report(out)
        return 0
    try:
        problems = [(name, slug(name), load_problem(name)) for name in args.problems]
    except AslaError as err:
        ap.error(str(err))
    (out / "reference").mkdir(parents=True, exist_ok=True)
    results_path = out / "reference-minima.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    from ase.io import write
    for name, key, p in problems:
        search = Search(p, args.seed)
        t0 = time.time()
        command = (f"python scripts/reference_minima.py --problems {name} --minutes {args.minutes:g}"
                   + f" --seed {args.seed}" * (args.seed != 0) + " --update-yaml" * args.update_yaml)
        if p.name.startswith("graphene"):
            e, _ = search.relax(honeycomb(p), fmax=0.01)
            low, low_atoms = search.random_phase(60 * args.minutes * 0.5)
            hop = search.basin_hopping(60 * args.minutes * 0.5, start=(low, low_atoms)) \
                if low_atoms is not None else math.inf
            how = (f"the perfect honeycomb (its sites are grid points) relaxed with {p.calculator['name']} "
                   f"(BFGS, fmax 0.01): {e:.4f} eV; the lowest of {search.n_relax - 1} other relaxations (random legal "
                   f"builds relaxed with FIRE+BFGS, then basin hopping from the best of them) lies "
                   f"{min(low, hop) - e:+.2f} eV from it"
                   + ("" if min(low, hop) > e else " (BELOW the honeycomb: the honeycomb is not this minimum)")
                   + f". {command}.")
        else:
            phases = []
            if args.relax_first:
                from ase.io import read
                frames = read(args.relax_first, index=":")
                lines = [f"{f.info.get('name', n)} {search.relax(f)[0]:.4f} eV" for n, f in enumerate(frames)]
                phases.append(f"the {len(frames)} candidates of {args.relax_first} relaxed ({', '.join(lines)})")
                command += f" --relax-first {args.relax_first}"
            if args.lattice_gas_top_k:
                gas = lattice_gas_phase(search, args.lattice_gas_top_k)
                print(f"{key}: {gas}", flush=True)
                if not gas.startswith("lattice-gas search not applicable"):
                    phases.append(gas + f": {search.best_e:.4f} eV")
                command += f" --lattice-gas-top-k {args.lattice_gas_top_k}"
            if args.motif_top_k or args.motif_highest_k:
                motif = overlayer_motif_phase(search, args.motif_top_k, args.motif_highest_k)
                command += f" --motif-top-k {args.motif_top_k} --motif-highest-k {args.motif_highest_k}"
                print(f"{key}: {motif}", flush=True)
                if not motif.startswith("motif search not applicable"):
                    phases.append(motif)
            named = [mapped_candidate(p, path) for path in args.candidates]
            named += oxide_candidates(p) if args.oxide_candidates else []
            if named:
                lines = search.candidates(named)
                phases.append(f"{len(lines)} further candidates relaxed ({'; '.join(lines)})")
                command += " --oxide-candidates" * args.oxide_candidates
                command += "".join(f" --candidates {path}" for path in args.candidates)
            if args.random_fraction > 0:
                low, _ = search.random_phase(60 * args.minutes * args.random_fraction)
                phases.append(f"random legal grid builds relaxed with FIRE+BFGS (template fixed), lowest {low:.4f} eV")
                command += f" --random-fraction {args.random_fraction:g}" * (args.random_fraction != 0.4)
            else:
                command += " --random-fraction 0"
            search.basin_hopping(60 * args.minutes * (1 - args.random_fraction))
            phases.append(f"basin hopping from the best so far (kT 0.15 eV; moves of one or two atoms to random "
                          f"sites, or rattles of all placed atoms): {search.best_e:.4f} eV")
            how = (f"lowest of {search.n_relax} relaxations ({search.n_calls} {p.calculator['name']} energy/force "
                   f"calls, {(time.time() - t0) / 60:.0f} min; {search.n_collapsed} discarded as collapsed: two atoms "
                   f"closer than {COLLAPSE:g} x their covalent radii): " + "; then ".join(phases) + f". {command}.")
        prev = results.get(key, {}).get("energy", math.inf)
        if search.best is not None and search.best_e < prev - 1e-6:
            written = out / "reference" / f"{key}.extxyz"
            write(written, search.best)
            gap = search.second_minimum()
            how += (f" The lowest relaxed structure distinct from it (judge.same_structure) lies {1000 * gap:.1f} meV "
                    "above." if gap is not None else f" No distinct relaxed structure within {Search.NEAR} eV.")
            results[key] = {"energy": search.best_e, "method": how, "relaxations": search.n_relax,
                            "second_distinct_above": gap,
                            "force_calls": search.n_calls, "seconds": time.time() - t0, "log": search.log,
                            "structure": str(written)}
            if args.update_yaml:
                yaml_path = problem_file(name)
                update_yaml(yaml_path, search.best_e, how, structure_entry(written, yaml_path, name))
        kept = results.get(key, {}).get("energy")
        print(f"{key}: {search.best_e:.4f} eV after {search.n_relax} relaxations "
              f"({search.n_calls} force calls, {time.time() - t0:.0f} s); kept "
              f"{'none' if kept is None else f'{kept:.4f}'}", flush=True)
        write_json(results_path, results)
    write_report(out)
    return 0


def write_report(out: Path) -> None:
    results = json.loads((out / "reference-minima.json").read_text())
    lines = ["# Reference global minima", "",
             "Established independently of the RL agent by `scripts/reference_minima.py` (command per problem below). "
             "Energies are total energies of the relaxed structure (template included) with the problem's calculator; "
             "the structures are in `docs/reference/`. \"Found\" for any search method means: the candidate relaxes to "
             "within 0.05 eV of this energy (../shared/ASLA.md section 9). Problems marked *lower bound not proven* "
             "were searched within a fixed time budget; a lower minimum may exist, and any method that finds one "
             "should update the reference.", "",
             "| problem | energy (eV) | relaxations | force calls | minutes | how |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['energy']:.4f} | {r['relaxations']} | {r['force_calls']} | "
                     f"{r['seconds'] / 60:.1f} | {r['method']} |")
    lines += ["", "Tight-binding, DFT and tiny problems: see the `reference:` section of each problem YAML "
              "(graphene-c24-xtb, graphene-c24-dft: the honeycomb, whose forces vanish by symmetry; with GFN1-xTB it "
              "is a saddle point, Kekulé-distorted honeycombs lie 0.39-0.53 eV lower, see the YAML; benzene-xtb: "
              "relaxed benzene; tiny-pd2o: exhaustive enumeration)."]
    # sections written by hand below the table (## headings: what a search alone does not say) are kept
    path = out / "reference-minima.md"
    old = path.read_text() if path.exists() else ""
    kept = old[old.index("\n## ") + 1:] if "\n## " in old else ""
    atomic_write_text(path, "\n".join(lines) + "\n" + ("\n" + kept if kept else ""))


if __name__ == "__main__":
    raise SystemExit(main())
