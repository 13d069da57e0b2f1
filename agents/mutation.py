"""Mutants of the best builds: an exploitation move beside ε-greedy (issue 27, deliverable 4) [ours].

ε-greedy leaves the agent's favourite build by random actions spread over the whole episode, and a random action
early in a build changes everything the greedy policy places after it. On near-degenerate landscapes that is a poor
way to reach a neighbour of the best build: on the untuned suite (docs/suite.md) the default recipe reached an
arrangement 28 meV above the Cu/Ag on Pt(100) minimum within a few hundred evaluations and the minimum itself only
thousands later, while basin hopping, whose moves are local, got there sooner. A mutant is one of the best distinct
builds with one local change: two atoms of different species exchanged, or one atom moved to another grid point
within ``shift_radius``. It is placed through the build rules (the parent's order where legal, deferred atoms
otherwise), so it is a legal episode like any other: evaluated and counted as any build, and the Q-network learns
from it off-policy, as from every episode in the buffer.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from asla.builder import BuildState, decode_action, encode_action

if TYPE_CHECKING:
    from asla.problem import Problem

Atom = tuple[int, int, int]  # (species index, layer, grid point)


def build_in_order(problem: Problem, atoms: list[Atom]) -> BuildState | None:
    """The atoms placed through the build rules: in the given order where legal, an atom that is not legal yet
    (too far from the others, out of the forced sequence) deferred until it is; None if some never becomes legal."""
    state = BuildState(problem)
    pending = [encode_action(problem, s, layer, k) for s, layer, k in atoms]
    while pending:
        for i, action in enumerate(pending):
            if state.is_legal(action):
                state.place(action)
                del pending[i]
                break
        else:
            return None
    return state


def swap(atoms: list[Atom], rng: np.random.Generator) -> list[Atom] | None:
    """Two atoms of different species exchange their species (None when the build has one species only)."""
    species = np.array([a[0] for a in atoms])
    if len(set(species.tolist())) < 2:
        return None
    i = int(rng.integers(len(atoms)))
    others = np.flatnonzero(species != species[i])
    j = int(rng.choice(others))
    out = list(atoms)
    out[i], out[j] = (atoms[j][0], *atoms[i][1:]), (atoms[i][0], *atoms[j][1:])
    return out


def shift(problem: Problem, atoms: list[Atom], rng: np.random.Generator, radius: float) -> list[Atom] | None:
    """One atom moved to another grid point (any layer) within `radius` Å of where it is."""
    grid = problem.grid
    i = int(rng.integers(len(atoms)))
    s, layer, k = atoms[i]
    points = grid.positions.reshape(-1, 3)
    d = grid.min_image_distances(points, grid.positions[layer, k][None])[:, 0]
    near = np.flatnonzero((d <= radius) & (d > 1e-9))
    if len(near) == 0:
        return None
    flat = int(rng.choice(near))
    out = list(atoms)
    out[i] = (s, flat // grid.n_points, flat % grid.n_points)
    return out


def mutant(problem: Problem, parent: list[int], rng: np.random.Generator, swap_probability: float = 0.5,
           shift_radius: float = 1.0, tries: int = 20,
           is_new: Callable[[BuildState], bool] | None = None) -> BuildState | None:
    """A legal build one swap or one shift away from the build `parent` (its action sequence).

    Up to `tries` mutations are drawn; the first that is legal and, when `is_new` is given, new (a structure not
    evaluated before: a repeat would cost nothing, the cache answers it, but would waste the builder) is returned.
    Failing that, the last legal one, or None when none was legal.
    """
    atoms: list[Atom] = [decode_action(problem, int(a)) for a in parent]
    can_swap = len({a[0] for a in atoms}) > 1
    fallback = None
    for _ in range(tries):
        if can_swap and rng.random() < swap_probability:
            changed = swap(atoms, rng)
        else:
            changed = shift(problem, atoms, rng, shift_radius)
        state = build_in_order(problem, changed) if changed is not None else None
        if state is None:
            continue
        if is_new is None or is_new(state):
            return state
        fallback = state
    return fallback
