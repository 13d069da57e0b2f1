"""The DFT 2x2 oxide (pd100-oxide-2x2-dft) and scripts/dft_reference.py, without a single GPAW evaluation."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ase.constraints import FixAtoms
from ase.io import read, write
from ase.io.trajectory import Trajectory
from ase.optimize import BFGS

from asla import load_problem
from asla.bench.judge import same_structure
from asla.calculators import make_calculator

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "dft_reference.py"


def test_dft_problem_has_the_geometry_grid_and_rules_of_the_emt_2x2_problem():
    dft, emt = load_problem("pd100-oxide-2x2-dft"), load_problem("pd100-oxide-2x2")
    assert np.allclose(dft.cell, emt.cell) and dft.pbc == emt.pbc
    assert np.array_equal(dft.template.numbers, emt.template.numbers)
    assert np.allclose(dft.template.positions, emt.template.positions)
    assert dft.bag == emt.bag and dft.rules == emt.rules
    assert np.allclose(dft.grid.positions, emt.grid.positions) and np.allclose(dft.grid.layer_z, emt.grid.layer_z)
    assert dft.symmetry.size == emt.symmetry.size == 32
    calc = dft.calculator
    assert (calc["name"], calc["mode"], calc["basis"], calc["xc"], calc["h"]) == ("gpaw", "lcao", "dzp", "PBE", 0.2)
    assert calc["kpts"] == [1, 1, 1] and calc["setups"] == {"Pd": "10"} and calc["symmetry"] == "off"
    assert calc["occupations"] == {"name": "fermi-dirac", "width": 0.1}  # a metal slab
    assert calc["convergence"] == {"forces": 0.01}  # below the relaxations' fmax 0.05
    assert dft.faults.retries == 1 and dft.faults.retry_settings["mixer"]["beta"] == 0.02


def test_gpaw_takes_the_dft_problems_settings_without_computing():
    pytest.importorskip("gpaw")
    params = make_calculator(load_problem("pd100-oxide-2x2-dft").calculator).parameters
    assert params.setups == {"Pd": "10"}
    assert "fermi-dirac" in str(params.occupations) and "0.1" in str(params.occupations)


def _script():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        spec = importlib.util.spec_from_file_location("dft_reference", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return module


def test_distinct_lowest_merges_copies_of_one_arrangement_and_keeps_another():
    emt = load_problem("pd100-oxide-2x2")
    ref = read(ROOT / "docs" / "reference" / "pd100-oxide-2x2.extxyz")
    copy = ref.copy()
    copy.positions[12:] += np.random.default_rng(0).normal(0, 0.02, (8, 3))
    other = ref.copy()
    o = [i for i in range(12, 20) if other[i].symbol == "O"]
    other.positions[o[0], :2] += emt.cell[0, :2] / 4  # one O a bridge site away: another arrangement
    found = [(2.5, copy, "b"), (2.4, ref, "a"), (3.0, other, "c")]
    picked = _script().distinct_lowest(emt, found, k=3)
    assert [p[2] for p in picked] == ["a", "c"]
    assert _script().distinct_lowest(emt, found, k=3, taken=[other]) == [(2.4, ref, "a")]


def test_relax_resumes_from_the_last_trajectory_frame_and_writes_a_record_and_report(tmp_path):
    """The relax phase with EMT in place of GPAW: a relaxation stopped after 3 steps goes on from its last frame."""
    problem_yaml = tmp_path / "p.yaml"
    emt = (ROOT / "configs" / "problems" / "pd100-oxide-2x2.yaml").read_text()
    problem_yaml.write_text(emt[:emt.index("\nreference:")] + "\n")  # no reference yet: the search sets it
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    work.mkdir()
    start = read(ROOT / "docs" / "reference" / "pd100-oxide-2x2.extxyz")
    start.positions[12:] += np.random.default_rng(1).normal(0, 0.1, (8, 3))
    write(out / "candidates.extxyz", [start])
    cand = {"name": "c01-test", "sources": ["a test"], "emt_energies": [2.44], "chgnet_energy": -101.0}
    (out / "candidates.json").write_text(json.dumps({
        "candidates": [cand], "command": "by hand", "emt_relaxations": 0, "chgnet_relaxations": 0,
        "chgnet_calls": 0, "seconds": 0.0, "motif": "none"}))
    # a run killed after three BFGS steps: its trajectory and progress are on disk, no record yet
    first = start.copy()
    first.set_constraint(FixAtoms(indices=range(12)))
    first.calc = make_calculator({"name": "emt"})
    BFGS(first, trajectory=str(work / "c01-test.traj"), logfile=None).run(fmax=0.05, steps=3)
    (work / "c01-test.progress.json").write_text(json.dumps(
        {"evaluations": 4, "steps": 3, "seconds": 1.0, "resumes": 0, "retries": 0}))
    with Trajectory(str(work / "c01-test.traj")) as t:
        killed_at = t[-1].positions.copy()
        n_before = len(t)
    # the report of a partial run shows where the running relaxation stands
    report = subprocess.run([sys.executable, str(SCRIPT), "report", "--problem", str(problem_yaml), "--out", str(out),
                             "--work", str(work)], capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    with Trajectory(str(work / "c01-test.traj")) as t:
        assert f"relaxing: {t[-1].get_potential_energy():.4f} at frame 4" in (out / "report.md").read_text()
    run = subprocess.run([sys.executable, str(SCRIPT), "relax", "--problem", str(problem_yaml), "--out", str(out),
                          "--work", str(work), "--update-yaml"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "resuming from frame 4" in run.stdout
    with Trajectory(str(work / "c01-test.traj")) as t:
        assert len(t) > n_before + 1
        assert np.allclose(t[n_before - 1].positions, killed_at)
        killed_energy = t[n_before - 1].get_potential_energy()
        n_frames = len(t)
    # the resumed run began where the killed one ended (ASE does not write its first frame again)
    first_step = (work / "c01-test.log").read_text().splitlines()[1].split()
    assert first_step[:2] == ["BFGS:", "0"] and abs(float(first_step[3]) - killed_energy) < 1e-5
    record = json.loads((out / "c01-test.json").read_text())
    assert record["converged"] and record["resumes"] == 1 and record["fmax"] <= 0.05
    # 4 evaluations before the kill; after it, the resumed frame again and one per new frame
    assert record["evaluations"] == 4 + 1 + (n_frames - n_before) and record["steps"] == 3 + n_frames - n_before
    assert abs(record["energy"] - 2.4374) < 0.01  # back in the EMT minimum
    assert np.allclose(read(out / "c01-test.extxyz").positions[:12], start.positions[:12])  # template fixed
    report = (out / "report.md").read_text()
    assert "c01-test" in report and f"{record['energy']:.4f}" in report and "All candidates relaxed" in report
    reference = load_problem(problem_yaml).reference
    assert abs(reference["energy"] - record["energy"]) < 1e-6 and "NOT FINAL" not in reference["method"]
    # a second call finds the record and relaxes nothing
    again = subprocess.run([sys.executable, str(SCRIPT), "relax", "--problem", str(problem_yaml), "--out", str(out),
                            "--work", str(work)], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "relaxing" not in again.stdout
    missing = subprocess.run([sys.executable, str(SCRIPT), "relax", "--out", str(tmp_path / "nothing")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "no candidates.json there" in missing.stderr.splitlines()[-1]



def test_a_relaxation_whose_work_directory_is_lost_resumes_from_its_checkpoint_on_the_same_path(tmp_path):
    """The machine (and WORK with it) is gone after 3 steps: the committed checkpoint (last frame, BFGS Hessian,
    counts) continues the relaxation exactly as if it had never stopped, and the finished record removes it."""
    mod = _script()
    problem = load_problem("pd100-oxide-2x2")
    start = read(ROOT / "docs" / "reference" / "pd100-oxide-2x2.extxyz")
    start.positions[12:] += np.random.default_rng(2).normal(0, 0.15, (8, 3))
    cand = {"name": "c01", "sources": ["a test"], "emt_energies": [2.44], "chgnet_energy": -101.0}
    whole = mod.relax_one(problem, cand, start, tmp_path / "whole", 0.05, 60, tmp_path / "whole-keep")
    keep = tmp_path / "keep"
    cut = mod.relax_one(problem, cand, start, tmp_path / "lost", 0.05, 3, keep)  # then the machine is gone
    assert not cut["converged"] and cut["steps"] == 3
    for ext in (".extxyz", ".bfgs.json", ".progress.json"):
        assert (keep / f"c01{ext}").exists()
    saved = read(keep / "c01.extxyz")
    assert np.allclose(saved.positions, cut["atoms"].positions)
    assert abs(saved.get_potential_energy() - cut["energy"]) < 1e-9  # the frame carries its energy and forces
    resumed = mod.relax_one(problem, cand, start, tmp_path / "new-machine", 0.05, 60, keep)
    assert resumed["converged"] and resumed["resumes"] == 1
    assert resumed["steps"] == whole["steps"]  # the Hessian came back: the same steps, not a restart from scratch
    assert np.allclose(resumed["atoms"].positions, whole["atoms"].positions, atol=1e-6)
    assert resumed["evaluations"] == whole["evaluations"] + 1  # the resumed frame is evaluated once more
    # a checkpoint-only partial run shows in the report like a trajectory would
    out = tmp_path / "out"
    out.mkdir()
    write(out / "candidates.extxyz", [start])
    (out / "candidates.json").write_text(json.dumps({
        "candidates": [cand], "command": "by hand", "emt_relaxations": 0, "chgnet_relaxations": 0,
        "chgnet_calls": 0, "seconds": 0.0, "motif": "none"}))
    mod.relax_one(problem, cand, start, tmp_path / "again", 0.05, 3, out / "progress")
    mod.write_report(problem, out, tmp_path / "no-such-work")
    assert f"relaxing: {cut['energy']:.4f} at frame 4" in (out / "report.md").read_text()


def one_candidate_plan(out: Path) -> Path:
    """OUT with a candidates phase's files for one candidate, c01: the EMT 2x2 reference structure."""
    out.mkdir()
    write(out / "candidates.extxyz", [read(ROOT / "docs" / "reference" / "pd100-oxide-2x2.extxyz")])
    (out / "candidates.json").write_text(json.dumps({
        "candidates": [{"name": "c01", "sources": ["x"], "emt_energies": [2.44], "chgnet_energy": -101.0}],
        "command": "by hand", "emt_relaxations": 0, "chgnet_relaxations": 0, "chgnet_calls": 0, "seconds": 0.0,
        "motif": "none"}))
    return out


def test_an_independent_search_never_replaces_a_lower_reference_found_since(tmp_path):
    """On the DFT 2x2 an ASLA run found a minimum below the independent search's: rerunning that search (a new
    candidate) must not write its higher minimum over it."""
    emt = (ROOT / "configs" / "problems" / "pd100-oxide-2x2.yaml").read_text()
    problem_yaml = tmp_path / "p.yaml"
    problem_yaml.write_text(emt.replace("  energy: 2.437400", "  energy: 2.000000"))
    before = problem_yaml.read_text()
    out = one_candidate_plan(tmp_path / "out")
    run = subprocess.run([sys.executable, str(SCRIPT), "relax", "--problem", str(problem_yaml), "--out", str(out),
                          "--work", str(tmp_path / "work"), "--update-yaml"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert abs(json.loads((out / "c01.json").read_text())["energy"] - 2.4374) < 0.01  # relaxed and recorded
    assert "kept the problem's reference, 2.0000 eV" in run.stdout
    assert problem_yaml.read_text() == before and not (out / "p.extxyz").exists()


FLAKY = '''
from ase.calculators.emt import EMT
from gpaw import KohnShamConvergenceError


class Flaky(EMT):
    """EMT whose SCF 'does not converge' unless told robust=True (as the problem's retry_settings do)."""

    def __init__(self, robust=False, **kwargs):
        super().__init__(**kwargs)
        self.robust = robust

    def calculate(self, *args, **kwargs):
        if not self.robust:
            raise KohnShamConvergenceError("did not converge")
        super().calculate(*args, **kwargs)
'''


def test_an_scf_that_does_not_converge_is_retried_with_the_problems_retry_settings(tmp_path):
    pytest.importorskip("gpaw")
    (tmp_path / "flaky.py").write_text(FLAKY)
    problem = (ROOT / "configs" / "problems" / "pd100-oxide-2x2.yaml").read_text().replace(
        "calculator: {name: emt}", "calculator: {name: 'flaky:Flaky'}\n"
        "faults: {retries: 1, retry_settings: {robust: true}}")
    (tmp_path / "p.yaml").write_text(problem)
    out = one_candidate_plan(tmp_path / "out")
    run = subprocess.run([sys.executable, str(SCRIPT), "relax", "--problem", str(tmp_path / "p.yaml"), "--out",
                          str(out), "--work", str(tmp_path / "work")], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert run.returncode == 0, run.stderr
    assert "KohnShamConvergenceError: did not converge; retry 1" in run.stdout
    record = json.loads((out / "c01.json").read_text())
    assert record["retries"] == 1 and record["error"] is None and record["converged"]
    assert abs(record["energy"] - 2.4374) < 0.01


def test_candidates_put_the_proxy_lowest_first_then_the_emt_minimum_all_distinct(tmp_path):
    """The candidate phase with EMT as the proxy too (seconds; the shipped run uses CHGNet)."""
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, str(SCRIPT), "candidates", "--emt-minutes", "0.1", "--chgnet-minutes",
                          "0.1", "--per-source", "2", "--proxy", "emt", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    plan = json.loads((out / "candidates.json").read_text())
    cands, starts = plan["candidates"], read(out / "candidates.extxyz", ":")
    assert len(cands) == len(starts) >= 2 and plan["proxy"] == {"name": "emt"}
    assert [s.info["candidate"] for s in starts] == [c["name"] for c in cands]
    assert len({c["name"] for c in cands}) == len(cands)
    energies = [c["chgnet_energy"] for c in cands]
    assert energies[0] == min(energies) and energies[2:] == sorted(energies[2:])
    ref = next(c for c in cands if any(s.startswith("EMT reference") for s in c["sources"]))
    assert ref["name"] in (cands[0]["name"], cands[1]["name"])
    # the motif's only arrangement on the 2x2 cell (O above all four top sites) is the EMT reference itself
    assert "lowest of the EMT overlayer-motif search" in ref["sources"]
    emt = load_problem("pd100-oxide-2x2")
    for i in range(len(starts)):
        assert not any(same_structure(emt, starts[i], starts[j]) for j in range(i))
    assert "not yet relaxed" in (out / "report.md").read_text()
