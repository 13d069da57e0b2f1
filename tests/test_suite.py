"""The benchmark suite (issue 27): problems no recipe was tuned on, each with a reference that can be checked.

Every suite problem loads, can be built to the end (check_fits), and names a reference structure that exists, holds
the template and the bag, is relaxed, and re-evaluates to the stated energy. The lattice-gas search that gave the
adatom references counts every symmetry-distinct arrangement once (checked against the builder's canonical keys).
"""
from __future__ import annotations

from collections import Counter
from itertools import combinations, permutations
from pathlib import Path

import numpy as np
import pytest

from asla.bench.judge import reference_structure
from asla.bench.problems import SUITE, bench_problem, expand_suite
from asla.builder import BuildState, check_fits, encode_action
from asla.calculators import make_calculator
from asla.problem import list_problems, load_problem

ROOT = Path(__file__).resolve().parents[1]


def test_the_suite_is_five_shipped_problems_of_the_kinds_the_issue_names_and_the_word_suite_stands_for_it():
    assert len(SUITE) >= 5 and set(SUITE) <= set(list_problems())
    problems = {name: load_problem(name) for name in SUITE}
    calculators = {p.calculator["name"] for p in problems.values()}
    assert calculators == {"emt", "tblite"}
    assert any(not len(p.template) for p in problems.values())  # a molecule in vacuum
    assert any(len(p.bag) == 2 and "O" not in p.bag and len(p.template) for p in problems.values())  # two metals
    assert any("O" in p.bag and "Pd" not in p.template.get_chemical_symbols() for p in problems.values())
    assert any(len(p.bag) == 1 and p.grid.n_layers >= 2 for p in problems.values())  # a cluster, more than a layer
    assert expand_suite(["pd100-oxide-2x2", "suite"]) == ["pd100-oxide-2x2", *SUITE]
    assert all(bench_problem(name).shipped for name in expand_suite(["suite"]))


@pytest.mark.parametrize("name", SUITE)
def test_a_suite_problem_builds_and_its_reference_is_relaxed_and_reevaluates_to_its_energy(name):
    problem = load_problem(name)
    check_fits(problem)  # random builds reach the end
    assert problem.reference.get("relaxed") is True and problem.reference_energy is not None
    assert "python scripts/reference_minima.py" in problem.reference["method"]  # how it was found, reproducibly
    atoms = reference_structure(problem)
    assert atoms is not None, problem.reference.get("structure")
    n_t = len(problem.template)
    assert atoms.get_chemical_symbols()[:n_t] == problem.template.get_chemical_symbols()
    assert np.allclose(atoms.positions[:n_t], problem.template.positions, atol=1e-6)  # the template stayed fixed
    assert Counter(atoms.get_chemical_symbols()[n_t:]) == Counter(problem.bag)
    if problem.calculator["name"] == "tblite":
        pytest.importorskip("tblite")
    atoms.calc = make_calculator(problem.calculator)
    assert atoms.get_potential_energy() == pytest.approx(problem.reference_energy, abs=1e-3)
    assert np.abs(atoms.get_forces()[n_t:]).max() < 0.06  # relaxed (BFGS to fmax 0.05 eV/A)


def test_the_lattice_gas_search_counts_every_symmetry_distinct_arrangement_on_the_hollow_sites_once():
    from asla.enumerate import lattice_gas_arrangements, stacking_sites
    problem = load_problem("suite-cuag-pt100-3x3")
    sites = stacking_sites(problem)
    assert len(sites) == 9  # the four-fold hollows of the 3x3 Pt(100) surface
    tops = problem.template.positions[np.abs(problem.template.positions[:, 2] - problem.template.positions[:, 2].max())
                                      < 0.3]
    hollow = problem.grid.positions[0, sites[0], :2]
    lateral = np.linalg.norm((hollow - tops[:, :2]) @ problem.grid.ab_inv % 1 @ problem.grid.ab, axis=1)
    assert abs(np.sort(lateral)[0] - 3.9218 / 2) < 1e-6  # half a diagonal from the nearest top site
    arrangements = lattice_gas_arrangements(problem)

    def key(actions):
        state = BuildState(problem)
        for a in actions:
            state.place(a)
        return state.canonical_key()

    # brute force: every labelled arrangement (84 site choices x 15 ways to choose the two Cu among six)
    species = [0] * problem.bag["Cu"] + [1] * problem.bag["Ag"]  # the bag's order: Cu, Ag
    every = {key([encode_action(problem, s, 0, int(sites[m])) for s, m in zip(labels, occ, strict=True)])
             for occ in combinations(range(9), 6) for labels in set(permutations(species))}
    assert len(arrangements) == len(every) == len({key(a) for a in arrangements})
    assert {key(a) for a in arrangements} == every
    assert lattice_gas_arrangements(load_problem("suite-c4h4n2-xtb")).startswith("0 stacking sites")


# ---- the default recipe (asla.agents.defaults) -------------------------------------------------------------------

def test_the_default_recipe_gives_the_shipped_2x2_recipe_on_its_problem_plus_the_mutants():
    from asla.agents.config import load_config
    from asla.agents.defaults import default_recipe
    shipped = load_config(ROOT / "configs" / "pd100-oxide-2x2.yaml")
    derived = load_config(default_recipe("pd100-oxide-2x2"))
    assert derived["mutation"]["fraction"] == 0.25 and shipped["mutation"]["fraction"] == 0.0  # the one difference
    assert ({k: v for k, v in derived.items() if k not in ("name", "mutation")}
            == {k: v for k, v in shipped.items() if k not in ("name", "mutation")})


def test_the_default_recipe_scales_with_the_atoms_and_relaxes_only_with_a_cheap_calculator_on_a_surface(tmp_path):
    from asla.agents.config import load_config
    from asla.agents.defaults import default_recipe
    cfg = {name: load_config(default_recipe(name)) for name in (*SUITE, "graphene-c24", "pd100-oxide-5x5")}
    assert cfg["suite-cuag-pt100-3x3"]["episodes"] == 1500 and cfg["suite-cuag-pt100-4x4"]["episodes"] == 3000
    assert cfg["suite-cuag-pt100-4x4"]["epsilon"]["decay_episodes"] == 1500
    assert cfg["pd100-oxide-5x5"]["episodes"] == 10_000  # 41 atoms: the upper bound
    for name in ("suite-cuag-pt100-3x3", "suite-cu100-oxide-3x3", "suite-pt7-au111"):  # EMT on a surface
        assert cfg[name]["problem_overrides"] == {"relax": {"steps": 10}}
    for name in ("suite-c4h4n2-xtb", "graphene-c24"):  # xTB; a free sheet
        assert cfg[name]["problem_overrides"] == {}
    assert len({str(c["network"]) for c in cfg.values()}) == 1  # one network for all
    own = tmp_path / "relaxed.yaml"  # a problem that sets its own relaxation keeps it
    own.write_text((ROOT / "configs/problems/suite-cuag-pt100-3x3.yaml").read_text() + "relax: {steps: 3}\n")
    assert load_config(default_recipe(str(own)))["problem_overrides"] == {}


def test_a_problem_without_a_recipe_trains_and_benchmarks_with_the_default_recipe(tmp_path):
    from asla.agents.config import load_config
    from asla.agents.defaults import default_recipe
    named = load_config("suite-cuag-pt100-3x3")  # `asla train suite-cuag-pt100-3x3`: a problem with no recipe
    assert named["name"] == "suite-cuag-pt100-3x3" and named["episodes"] == 1500
    assert named == {**load_config(default_recipe("suite-cuag-pt100-3x3")), "name": "suite-cuag-pt100-3x3"}
    path = ROOT / "configs" / "problems" / "tiny-pd2o.yaml"  # `asla train configs/problems/tiny-pd2o.yaml`
    from_file = load_config(path)
    assert from_file["name"] == "tiny-pd2o" and from_file["problem"] == str(path) and from_file["episodes"] == 750
    assert load_config("tiny-pd2o")["episodes"] == 400  # a shipped recipe of that name is still the recipe
    bench = bench_problem("suite-cu100-oxide-3x3")
    assert bench.recipe is None and "default recipe" in bench.recipe_label()
    assert bench.config()["episodes"] == 2000 and bench.recipe_overrides() == {"relax": {"steps": 10}}
    with pytest.raises(Exception, match="does not exist"):
        load_config("no-such-recipe-or-problem")


def test_the_strict_criterion_judges_a_molecule_in_vacuum_at_any_angle_and_place_in_its_plane():
    from ase.io import read

    from asla.bench.judge import StrictCheck, same_structure
    problem = load_problem("suite-c4h4n2-xtb")
    reference = reference_structure(problem)
    assert StrictCheck(problem).available  # judged (before: never, the grid has no periodic translations)
    turned = reference.copy()
    turned.rotate(37, "z", center="COP")  # an angle none of the grid's operations makes
    turned.positions[:, :2] += [0.7, -1.1]
    turned.positions[:, 1] = 10.0 - turned.positions[:, 1]  # and mirrored
    turned = turned[np.random.default_rng(0).permutation(len(turned))]
    assert same_structure(problem, turned, reference) is True
    turned.positions[3] += [0.3, 0.0, 0.0]
    assert same_structure(problem, turned, reference) is False  # one atom 0.3 A off: not the same
    diazines = read(ROOT / "docs/reference/suite-c4h4n2-xtb-candidates.extxyz", index=":")
    verdicts = {d.info["name"]: same_structure(problem, d, reference) for d in diazines}
    assert verdicts == {"pyridazine": False, "pyrimidine": True, "pyrazine": False}  # the reference is pyrimidine
