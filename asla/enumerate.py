"""Exhaustive enumeration of every legal build of a small problem, up to symmetry.

This is how the tiny test problems get a global minimum that is known, not guessed: every
distinct structure the grid and rules allow is evaluated once.
"""
from __future__ import annotations

import numpy as np

from .builder import BuildState
from .problem import Problem
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
