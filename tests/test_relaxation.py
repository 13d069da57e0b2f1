"""Resumable relaxations (asla.relaxation) and the judge's relaxation store, which keeps DFT judge relaxations on
disk (asla.bench.judge.resumable_relaxations). EMT stands in for GPAW: the code paths are the calculator's."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from ase.io import read

from asla import basin, load_problem
from asla.bench import judge
from asla.bench.judge import RelaxationStore, first_in_basin, resumable_relaxations, store_for
from asla.builder import random_build
from asla.relaxation import Checkpoint, relax_resumable
from asla.storage import write_structures

PROBLEM = "pd100-oxide-2x2"


@pytest.fixture(scope="module")
def problem():
    return load_problem(PROBLEM)


@pytest.fixture(scope="module")
def build(problem):
    return random_build(problem, np.random.default_rng(3)).atoms()


def test_a_relaxation_cut_and_resumed_from_its_checkpoint_ends_where_an_uncut_one_does(problem, build, tmp_path):
    whole = relax_resumable(problem, build, "x", tmp_path / "w1", tmp_path / "k1", steps=200, log=lambda _: None)
    relax_resumable(problem, build, "x", tmp_path / "lost", tmp_path / "k2", steps=4, log=lambda _: None)
    assert Checkpoint(tmp_path / "k2", "x").exists()
    resumed = relax_resumable(problem, build, "x", tmp_path / "new-machine", tmp_path / "k2", steps=200,
                              log=lambda _: None)
    assert resumed.progress["resumes"] == 1 and resumed.progress["steps"] == whole.progress["steps"]
    # the checkpoint holds positions as extxyz text (8 decimals): after ~100 more BFGS steps from a random build
    # that rounding has grown to about 1e-3 A, far below what tells two arrangements apart (0.2 A)
    assert np.abs(resumed.atoms.positions - whole.atoms.positions).max() < 5e-3
    assert abs(resumed.atoms.get_potential_energy() - whole.atoms.get_potential_energy()) < 1e-4
    assert whole.converged and resumed.converged


def test_the_store_relaxes_as_the_judge_always_did_and_keeps_the_result(problem, build, tmp_path, monkeypatch):
    plain = basin.relax(problem, build)
    store = tmp_path / "judge"
    with resumable_relaxations(store):
        kept = judge.relax(problem, build)
    assert abs(kept.info["relaxed_energy"] - plain.info["relaxed_energy"]) < 1e-6
    name = RelaxationStore.name(build)
    record = json.loads((store / f"{name}.json").read_text())
    assert record["converged"] and abs(record["energy"] - plain.info["relaxed_energy"]) < 1e-6
    assert np.abs(read(store / f"{name}.extxyz").positions - plain.positions).max() < 1e-6
    assert not Checkpoint(store / "progress", name).exists()  # superseded by the record
    # asked again (a rejudged record, the next seed, a killed run), nothing is computed
    monkeypatch.setattr("asla.relaxation.relax_resumable", lambda *a, **k: pytest.fail("relaxed again"))
    with resumable_relaxations(store):
        again = judge.relax(problem, build)
    assert again.info["relaxed_energy"] == kept.info["relaxed_energy"]
    # outside the block the judge relaxes with asla.basin.relax, as before
    monkeypatch.setattr("asla.bench.judge.basin.relax", lambda p, a: plain)
    assert judge.relax(problem, build) is plain


def test_a_failed_relaxation_is_kept_as_not_found(problem, build, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("calculator died")
    monkeypatch.setattr("asla.relaxation.relax_resumable", boom)
    with resumable_relaxations(tmp_path):
        done = judge.relax(problem, build)
    assert math.isnan(done.info["relaxed_energy"])
    record = json.loads((tmp_path / f"{RelaxationStore.name(build)}.json").read_text())
    assert record["energy"] is None and "calculator died" in record["error"]


def test_first_in_basin_judges_through_the_store(problem, build, tmp_path):
    ref = read("docs/reference/pd100-oxide-2x2.extxyz")
    trace = [{"evaluations": 1, "seconds": 0.0, "energy": problem.reference_energy + 3.0, "atoms": build},
             {"evaluations": 9, "seconds": 0.0, "energy": problem.reference_energy + 0.01, "atoms": ref}]
    with resumable_relaxations(tmp_path):
        check = first_in_basin(problem, trace, window=5.0)
    assert check["found"]["evaluations"] == 9
    assert len(list(tmp_path.glob("r-*.json"))) == check["relaxations"] == 2


def test_only_dft_problems_keep_their_judge_relaxations(problem, tmp_path):
    assert store_for(problem, tmp_path) is None  # EMT: milliseconds, nothing kept
    assert store_for(load_problem("pd100-oxide-2x2-dft"), tmp_path) == tmp_path


def test_an_interrupted_relaxation_is_not_kept_as_a_failure(problem, build, tmp_path, monkeypatch):
    from asla.reward import EvaluationTimeout

    def interrupted(*args, **kwargs):
        raise EvaluationTimeout()
    monkeypatch.setattr("asla.relaxation.relax_resumable", interrupted)
    with resumable_relaxations(tmp_path), pytest.raises(EvaluationTimeout):
        judge.relax(problem, build)
    assert not list(tmp_path.glob("r-*.json"))  # asked again, it relaxes (resuming its checkpoint)


def test_a_structure_read_back_from_a_trace_file_finds_the_relaxation_kept_during_the_run(problem, build, tmp_path,
                                                                                          monkeypatch):
    store = tmp_path / "judge"
    with resumable_relaxations(store):
        kept = judge.relax(problem, build)  # during the run: the structure in memory, full precision
    write_structures(tmp_path / "trace.extxyz", [build], n_template=12)
    read_back = read(tmp_path / "trace.extxyz")
    assert not np.array_equal(read_back.positions, build.positions)  # the file keeps 8 decimals
    assert RelaxationStore.name(read_back) == RelaxationStore.name(build)
    monkeypatch.setattr("asla.relaxation.relax_resumable", lambda *a, **k: pytest.fail("relaxed again"))
    with resumable_relaxations(store):  # a rejudge from the trace: no DFT relaxation started again
        assert judge.relax(problem, read_back).info["relaxed_energy"] == kept.info["relaxed_energy"]
