"""Exhaustive enumeration of every legal build of a small problem, up to symmetry.

This is how the tiny test problems get a global minimum that is known, not guessed: every
distinct structure the grid and rules allow is evaluated once. For adatoms on a surface, the
lattice-gas motif (every way to put the bag on the surface's hollow sites, one atom per site)
is enumerated the same way on larger cells (scripts/reference_minima.py --lattice-gas-top-k).
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .builder import BuildState, encode_action
from .problem import Problem, covalent_radius
from .reward import EnergyEvaluator


def enumerate_builds(problem: Problem, limit: int = 200_000) -> list[BuildState]:
    """One representative BuildState per symmetry-distinct complete structure."""
    level = {(): BuildState(problem)}
    for _ in range(problem.n_atoms):
        nxt: dict[tuple[int, ...], BuildState] = {}
        for state in level.values():
            for action in np.flatnonzero(state.action_mask()):
                child = BuildState(problem)
                for a in state.actions:
                    child.place(a)
                child.place(int(action))
                key = child.canonical_key()
                if key not in nxt:
                    nxt[key] = child
                    if len(nxt) > limit:
                        raise RuntimeError(f"more than {limit} distinct partial builds; problem too large to enumerate")
        level = nxt
    return list(level.values())


def global_minimum(problem: Problem) -> tuple[float, BuildState, int, list[float]]:
    """(lowest energy, its build, number of distinct structures, all energies) by enumeration."""
    ev = EnergyEvaluator(problem, use_cache=False)
    states = enumerate_builds(problem)
    energies = [ev.evaluate(s.atoms()).energy for s in states]
    best = int(np.nanargmin(energies))
    return float(energies[best]), states[best], len(states), energies


def stacking_sites(p: Problem) -> np.ndarray:
    """The surface's hollow sites that continue the crystal's stacking: the in-plane positions of the template
    atoms of the second and third planes from the top that no top-plane atom covers (fcc(100): the four-fold
    hollows; fcc(111): the hcp and fcc hollows), as grid points. Empty without a template."""
    if not len(p.template):
        return np.zeros(0, dtype=int)
    z = p.template.positions[:, 2]
    planes = sorted({round(float(v), 1) for v in z}, reverse=True)
    top = p.template.positions[np.abs(z - z.max()) < 0.3]
    top_pts = set(p.grid.nearest_point(top).tolist())
    below = p.template.positions[np.isin(np.round(z, 1), planes[1:3])]
    return np.array(sorted(set(p.grid.nearest_point(below).tolist()) - top_pts), dtype=int)


def _labellings(labels: list[int]) -> Iterator[tuple[int, ...]]:
    """Every distinct ordering of a multiset of labels (itertools.permutations would repeat each many times)."""
    if not labels:
        yield ()
        return
    for first in sorted(set(labels)):
        rest = list(labels)
        rest.remove(first)
        for tail in _labellings(rest):
            yield (first, *tail)


def lattice_gas_arrangements(p: Problem) -> list[list[int]] | str:
    """Every symmetry-distinct way to put the bag's atoms, one per site, on the surface's stacking sites
    (`stacking_sites`) in the lowest build layer, as the builder's actions (one representative each); or the one-line
    reason this motif does not apply (no template, fewer sites than atoms, a symmetry that does not map the sites
    onto themselves). Arrangements with two atoms closer than rules.c_min allows are left out: the builder could
    not make them."""
    from itertools import combinations

    sites = stacking_sites(p)
    n = p.n_atoms
    if len(sites) < n:
        return (f"{len(sites)} stacking sites for {n} atoms (needs a template surface with at least as many hollow "
                f"sites as atoms)")
    layer = int(np.argmin(p.grid.layer_z))
    ms, ts = p.symmetry.all_ops()
    mapped = p.symmetry.apply(ms, ts, np.broadcast_to(sites, (len(ms), len(sites))))
    index = {int(k): m for m, k in enumerate(sites)}
    if any(int(k) not in index for k in mapped.ravel()):
        return "the problem's symmetry does not map the hollow sites onto themselves"
    perms = np.array([[index[int(k)] for k in row] for row in mapped])  # (G, S): site m goes to perms[g, m]
    species = list(p.bag)
    labels = [s + 1 for s, sp in enumerate(species) for _ in range(p.bag[sp])]  # 1..n_species; 0: an empty site
    # a labelling x of the sites mapped by g is y[perms[g, m]] = x[m], i.e. y = x[inverse[g]]; its class is named by
    # the smallest base-(n_species + 1) code of its images
    weights = (len(species) + 1) ** np.arange(len(sites), dtype=np.int64)[::-1]
    inverse = np.argsort(perms, axis=1)
    decorations = np.array(list(_labellings(labels)), dtype=np.int64)
    radii = np.array([covalent_radius(sp) for sp in species])
    frac = p.grid.positions[layer, sites, :2] @ p.grid.ab_inv
    dfrac = frac[:, None, :] - frac[None, :, :]
    if p.grid.periodic:
        dfrac -= np.round(dfrac)
    dist = np.linalg.norm(dfrac @ p.grid.ab, axis=-1)
    unique: dict[int, np.ndarray] = {}
    for occ in combinations(range(len(sites)), n):
        occ = np.array(occ)
        x = np.zeros((len(decorations), len(sites)), dtype=np.int64)
        x[:, occ] = decorations
        r = radii[decorations - 1]  # (D, n): the occupied sites' covalent radii
        too_close = (dist[np.ix_(occ, occ)] + np.eye(n) * 99)[None] < p.rules.c_min * (r[:, :, None] + r[:, None, :])
        x = x[~too_close.any(axis=(1, 2))]
        for c, row in zip(np.min(x[:, inverse] @ weights, axis=1).tolist(), x):
            unique.setdefault(c, row)
    return [[encode_action(p, int(row[m]) - 1, layer, int(sites[m])) for m in np.flatnonzero(row)]
            for row in unique.values()]
