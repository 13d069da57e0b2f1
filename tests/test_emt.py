"""asla.emt.EMT, the vectorised EMT: the same numbers as ase.calculators.emt.EMT, on every kind of cell."""
from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, fcc111
from ase.calculators.calculator import PropertyNotImplementedError, compare_atoms
from ase.calculators.emt import EMT as AseEMT
from ase.calculators.fd import calculate_numerical_stress
from ase.cluster import Octahedron
from ase.constraints import FixAtoms
from ase.optimize import BFGS

from asla import load_problem
from asla.builder import random_build
from asla.calculators import make_calculator
from asla.emt import EMT, candidate_pairs

E_TOL = 1e-10  # eV
F_TOL = 1e-9  # eV/A
S_TOL = 1e-10  # eV/A^3


def _both(atoms: Atoms, stress: bool = False, **kw) -> tuple[dict, dict]:
    out = []
    for calc in (AseEMT(**kw), EMT(**kw)):
        a = atoms.copy()
        a.calc = calc
        res = {"energy": a.get_potential_energy(), "forces": a.get_forces(),
               "energies": a.get_potential_energies()}
        if stress:
            res["stress"] = a.get_stress()
        out.append(res)
    return out[0], out[1]


def _assert_same(ref: dict, new: dict) -> None:
    assert abs(ref["energy"] - new["energy"]) < E_TOL
    assert np.abs(ref["energies"] - new["energies"]).max() < E_TOL
    assert np.abs(ref["forces"] - new["forces"]).max() < F_TOL
    if "stress" in ref:
        assert np.abs(ref["stress"] - new["stress"]).max() < S_TOL


@pytest.mark.parametrize("asap_cutoff", [False, True])
@pytest.mark.parametrize("name", ["pd100-oxide-3x3", "pd100-oxide-5x5", "tiny-pd2o"])
def test_random_builds_of_shipped_problems_match_ase(name, asap_cutoff):
    p = load_problem(name)
    for seed in range(2):
        atoms = random_build(p, np.random.default_rng(seed)).atoms()
        assert atoms.pbc.tolist() == [True, True, False]
        ref, new = _both(atoms, stress=True, asap_cutoff=asap_cutoff)  # a slab cell has rank 3: ASE gives stress
        _assert_same(ref, new)
        assert np.abs(new["forces"]).max() > 0.1  # a random build is far from a minimum: forces are tested


@pytest.mark.parametrize("asap_cutoff", [False, True])
def test_rattled_bulk_alloy_energy_forces_stress(asap_cutoff):
    atoms = bulk("Cu", "fcc", a=3.7, cubic=True).repeat((2, 2, 2))
    atoms.symbols[::3] = "Au"
    atoms.rattle(0.08, seed=3)
    atoms.positions[0] += atoms.cell[1] * 2.3  # an atom outside the cell
    ref, new = _both(atoms, stress=True, asap_cutoff=asap_cutoff)
    _assert_same(ref, new)
    assert np.abs(new["stress"]).max() > 1e-3


def test_stress_matches_finite_differences():
    atoms = bulk("Au", "fcc", a=4.0, cubic=True).repeat((2, 1, 1))
    atoms.symbols[1::2] = "Cu"
    atoms.rattle(0.05, seed=1)
    atoms.calc = EMT()
    numerical = calculate_numerical_stress(atoms, eps=1e-6)
    assert np.abs(atoms.get_stress() - numerical).max() < 1e-7


def test_small_and_skewed_periodic_cells_reach_far_images():
    prim = bulk("Al", "fcc", a=4.05)  # one atom, 60-degree cell: many images inside the cutoff
    prim.rattle(0.02, seed=1)
    hexslab = fcc111("Ag", (3, 3, 3), vacuum=6.0)
    hexslab.rattle(0.05, seed=4)
    for atoms in (prim, hexslab):
        ref, new = _both(atoms, stress=True)
        _assert_same(ref, new)


def test_non_periodic_pt_o_cluster_without_cell():
    cluster = Octahedron("Pt", 4)
    cluster.symbols[::5] = "O"
    cluster.rattle(0.05, seed=2)
    cluster.cell[:] = 0.0
    cluster.pbc = False
    ref, new = _both(cluster)
    _assert_same(ref, new)
    a = cluster.copy()
    a.calc = EMT()
    with pytest.raises(PropertyNotImplementedError):  # as ASE: no stress without a 3D cell
        a.get_stress()


def test_every_supported_element_and_an_unsupported_one():
    rng = np.random.default_rng(0)
    symbols = ["H", "C", "N", "O", "Al", "Ni", "Cu", "Pd", "Ag", "Pt", "Au"]
    atoms = Atoms([symbols[k % len(symbols)] for k in range(44)], positions=rng.uniform(0, 9, (44, 3)))
    for asap_cutoff in (False, True):
        _assert_same(*_both(atoms, asap_cutoff=asap_cutoff))
    bad = Atoms("Fe2", positions=[[0, 0, 0], [0, 0, 2.4]])
    bad.calc = EMT()
    with pytest.raises(NotImplementedError):
        bad.get_potential_energy()


def test_wire_periodic_in_one_direction_with_zero_cell_vectors():
    wire = Atoms("Cu4", positions=[[0, 0, 0], [2.5, 0, 0], [5.1, 0.2, 0], [-9.0, 0.5, 1.0]],
                 cell=[7.5, 0, 0], pbc=[True, False, False])
    _assert_same(*_both(wire))


def test_pairs_at_and_beyond_the_cutoff():
    calc = EMT()
    probe = Atoms("Pd2", positions=[[0, 0, 0], [0, 0, 1.0]])
    probe.calc = calc
    probe.get_potential_energy()
    rc_list = calc.rc_list
    for dist in (rc_list - 1e-3, rc_list - 1e-12, rc_list + 1e-12, rc_list + 0.1, 20.0):
        dimer = Atoms("PdO", positions=[[0, 0, 0], [0, 0, dist]])
        ref, new = _both(dimer)
        _assert_same(ref, new)
    far = Atoms("PdO", positions=[[0, 0, 0], [0, 0, rc_list + 0.1]])
    far.calc = EMT()
    assert np.all(far.get_forces() == 0.0)
    assert far.get_potential_energy() == pytest.approx(3.90 + 4.60)  # isolated atoms: -E0 each
    # with a skin, a pair crossing the cutoff between calls is dropped and taken back exactly
    a = Atoms("Pd2", positions=[[0, 0, 0], [0, 0, rc_list - 0.02]])
    a.calc = EMT(skin=0.2)
    for dz in (0.0, 0.03, 0.06, -0.05, -0.06):
        a.positions[1, 2] = rc_list - 0.02 + dz
        ref, new = _both(a)
        _assert_same(ref, new)
        assert a.get_potential_energy() == new["energy"]


def test_atoms_appearing_and_disappearing_with_one_calculator():
    """The reward evaluator keeps one calculator across builds: numbers and sizes change between calls."""
    p = load_problem("pd100-oxide-3x3")
    calc = make_calculator({"name": "emt"})
    assert isinstance(calc, EMT) and isinstance(calc, AseEMT)
    full = random_build(p, np.random.default_rng(5)).atoms()
    n_template = len(p.template)
    sizes = [len(full), n_template + 3, len(full), n_template + 1, n_template + 8]
    for k, size in enumerate(sizes):
        atoms = full[:size]
        if k == 2:
            atoms.numbers[n_template:] = atoms.numbers[n_template:][::-1]  # same size, elements swapped
        atoms.calc = calc
        e, f = atoms.get_potential_energy(), atoms.get_forces()
        ref = atoms.copy()
        ref.calc = AseEMT()
        assert abs(e - ref.get_potential_energy()) < E_TOL
        assert np.abs(f - ref.get_forces()).max() < F_TOL


def test_bfgs_relaxation_follows_the_same_path_as_ase():
    p = load_problem("pd100-oxide-3x3")
    start = random_build(p, np.random.default_rng(1)).atoms()
    start.set_constraint(FixAtoms(indices=range(len(p.template))))
    paths = []
    for calc in (AseEMT(), EMT()):
        a = start.copy()
        a.calc = calc
        opt = BFGS(a, logfile=None)
        path = []
        for _ in opt.irun(fmax=0.01, steps=15):
            path.append((a.get_potential_energy(), a.positions.copy()))
        paths.append(path)
    assert len(paths[0]) == len(paths[1]) == 16
    for (ea, pa), (eb, pb) in zip(*paths):
        assert abs(ea - eb) < 1e-9
        assert np.abs(pa - pb).max() < 1e-9
    assert paths[1][-1][0] < paths[1][0][0] - 1.0  # it did relax


def test_skin_changes_no_bit_along_a_random_walk():
    p = load_problem("pd100-oxide-5x5")
    atoms = random_build(p, np.random.default_rng(2)).atoms()
    rng = np.random.default_rng(0)
    a, b = atoms.copy(), atoms.copy()
    a.calc, b.calc = EMT(skin=0.0), EMT(skin=0.3)
    rebuilds = 0
    for _ in range(25):
        step = rng.normal(0.0, 0.03, atoms.positions.shape)
        a.positions += step
        b.positions += step
        cache = b.calc._pairs_cache
        assert a.get_potential_energy() == b.get_potential_energy()
        assert np.array_equal(a.get_forces(), b.get_forces())
        assert np.array_equal(a.get_stress(), b.get_stress())
        rebuilds += b.calc._pairs_cache is not cache
    assert 1 <= rebuilds < 20  # the skin was both reused and used up


def test_forces_match_finite_differences():
    p = load_problem("tiny-pd2o")
    atoms = random_build(p, np.random.default_rng(3)).atoms()
    atoms.rattle(0.05, seed=0)
    atoms.calc = EMT()
    forces = atoms.get_forces()
    h = 1e-5
    for idx in (0, len(atoms) - 1, len(atoms) - 2):
        for k in range(3):
            e = []
            for sign in (1, -1):
                x = atoms.copy()
                x.positions[idx, k] += sign * h
                x.calc = EMT()
                e.append(x.get_potential_energy())
            assert forces[idx, k] == pytest.approx(-(e[0] - e[1]) / (2 * h), abs=1e-6)


def test_candidate_pairs_are_ases_neighbour_list():
    from ase.neighborlist import neighbor_list
    atoms = fcc111("Pt", (2, 2, 3), vacuum=5.0)
    atoms.rattle(0.1, seed=0)
    atoms.positions[3] -= 2.5 * atoms.cell[0]
    i, j, offsets = candidate_pairs(atoms.positions, atoms.cell.array, atoms.pbc, 5.0)
    ia, ja, sa = neighbor_list("ijS", atoms, 5.0)
    ours = sorted(zip(i.tolist(), j.tolist(), map(tuple, offsets.T.tolist())))
    theirs = sorted(zip(ia.tolist(), ja.tolist(), map(tuple, sa.tolist())))
    assert ours == theirs


def test_check_state_agrees_with_ase_compare_atoms():
    base = fcc111("Pd", (2, 2, 2), vacuum=4.0)
    calc = EMT()
    base.calc = calc
    base.get_potential_energy()
    variants = []
    for change in range(7):
        a = base.copy()
        if change == 1:
            a.positions[0, 0] += 1e-16
        elif change == 2:
            a.positions[0, 0] += 1e-6
        elif change == 3:
            a.numbers[0] = 8
        elif change == 4:
            a.cell[2, 2] += 1e-3
        elif change == 5:
            a.pbc = [True, True, True]
        elif change == 6:
            a.set_initial_magnetic_moments([1.0] * len(a))
        variants.append(a)
    nan = base.copy()
    nan.positions[1, 1] = np.nan
    variants.append(nan)
    for a in variants:
        assert sorted(calc.check_state(a)) == sorted(compare_atoms(calc.atoms, a))
