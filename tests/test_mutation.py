"""Mutants of the best builds (agents/mutation.py, recipe mutation:): one local change, legal, trained on."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from asla.agents.callbacks import StopAfterEpisodes
from asla.agents.config import load_config
from asla.agents.mutation import build_in_order, mutant, shift, swap
from asla.agents.training import train
from asla.builder import decode_action, random_build
from asla.errors import ConfigError
from asla.problem import load_problem
from tests.recipes import tiny_cfg


def _atoms(problem, state):
    return [decode_action(problem, a) for a in state.actions]


def _build(problem, seed):
    rng = np.random.default_rng(seed)
    while True:
        state = random_build(problem, rng)
        if state.done:
            return state


def test_a_swap_exchanges_the_species_of_two_atoms_and_moves_none():
    problem = load_problem("tiny-pd2o")
    atoms = _atoms(problem, _build(problem, 0))
    for seed in range(20):
        out = swap(atoms, np.random.default_rng(seed))
        changed = [i for i, (a, b) in enumerate(zip(atoms, out, strict=True)) if a != b]
        assert len(changed) == 2
        i, j = changed
        assert atoms[i][0] != atoms[j][0]
        assert (out[i][0], out[j][0]) == (atoms[j][0], atoms[i][0])
        assert [a[1:] for a in out] == [a[1:] for a in atoms]  # the sites stay
    one_species = [(0, layer, k) for _, layer, k in atoms]
    assert swap(one_species, np.random.default_rng(0)) is None


def test_a_shift_moves_one_atom_to_another_grid_point_within_the_radius():
    problem = load_problem("tiny-pd2o")
    atoms = _atoms(problem, _build(problem, 1))
    grid = problem.grid
    for seed in range(20):
        out = shift(problem, atoms, np.random.default_rng(seed), radius=1.0)
        changed = [i for i, (a, b) in enumerate(zip(atoms, out, strict=True)) if a != b]
        assert len(changed) == 1
        (i,) = changed
        assert out[i][0] == atoms[i][0]
        before, after = grid.positions[atoms[i][1], atoms[i][2]], grid.positions[out[i][1], out[i][2]]
        assert 0 < grid.min_image_distances(after[None], before[None])[0, 0] <= 1.0 + 1e-9


def test_an_atom_not_legal_in_its_turn_is_placed_when_it_is_and_an_impossible_build_is_none():
    problem = load_problem("tiny-pd2o", sequence=["O", "Pd", "Pd"])
    build = _build(problem, 2)  # O first, as the sequence forces
    atoms = _atoms(problem, build)
    reordered = [atoms[1], atoms[2], atoms[0]]  # Pd first: not legal until the O is placed
    state = build_in_order(problem, reordered)
    assert state is not None and state.done
    assert state.canonical_key() == build.canonical_key()
    assert [problem.species[s] for s in state.species] == ["O", "Pd", "Pd"]
    assert build_in_order(problem, [atoms[0], atoms[1], atoms[1]]) is None  # two atoms on one site


def test_a_mutant_is_a_legal_finished_build_one_change_away_and_new_when_it_can_be():
    problem = load_problem("tiny-pd2o")
    parent = _build(problem, 3)
    seen = {parent.canonical_key()}
    for seed in range(10):
        child = mutant(problem, parent.actions, np.random.default_rng(seed),
                       is_new=lambda b: b.canonical_key() not in seen)
        assert child is not None and child.done
        assert child.canonical_key() not in seen
        a, b = Counter(_atoms(problem, parent)), Counter(_atoms(problem, child))
        sites_a, sites_b = Counter(x[1:] for x in a.elements()), Counter(x[1:] for x in b.elements())
        swapped = sites_a == sites_b and sum((a - b).values()) == 2  # the sites stay, two atoms change species
        shifted = sum((sites_a - sites_b).values()) == 1 and sum((a - b).values()) == 1  # one atom elsewhere
        assert swapped or shifted


def test_training_with_mutants_counts_them_and_resumes_bit_for_bit(tmp_path):
    cfg = dict(episodes=48, seed=5, mutation={"fraction": 0.5, "parents": 3, "swap_probability": 0.5,
                                              "shift_radius": 1.0})
    plain = train(tiny_cfg(episodes=48, seed=5), run_dir=tmp_path / "plain", progress=False)
    full = train(tiny_cfg(**cfg), run_dir=tmp_path / "full", progress=False)
    assert "mutants" not in plain
    assert 0 < full["mutants"] <= 24  # half of the builds at most, none before the first real energy
    assert full["mutant_improvements"] == sum(bool(h.get("mutant")) for h in full["history"])
    from ase.db import connect
    rows = list(connect(str(tmp_path / "full" / "evaluations.db")).select())
    marked = sum(bool(row.get("mutant")) for row in rows)
    assert 0 < marked <= full["mutants"]  # the evaluated mutants are marked in the database (cache hits are not rows)
    part = train(tiny_cfg(**cfg), run_dir=tmp_path / "part", progress=False, callbacks=[StopAfterEpisodes(28)])
    assert part["episodes"] == 28
    resumed = train(None, run_dir=tmp_path / "part", resume=True, progress=False)
    assert resumed["mutants"] == full["mutants"]
    assert resumed["energy_evaluations"] == full["energy_evaluations"]
    assert [h["actions"] for h in resumed["history"]] == [h["actions"] for h in full["history"]]


@pytest.mark.parametrize(("key", "value"), [("fraction", 1.5), ("shift_radius", 0.0), ("parents", 0)])
def test_a_bad_mutation_setting_names_its_field(key, value):
    with pytest.raises(ConfigError, match=f"mutation.{key}"):
        load_config({"problem": "tiny-pd2o", "mutation": {key: value}})
