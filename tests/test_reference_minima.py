"""scripts/reference_minima.py's candidates and its guard against a potential's holes (no calculator runs here)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from ase.io import read

from asla import load_problem

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("reference_minima", ROOT / "scripts" / "reference_minima.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_collapsed_flags_merged_atoms_and_passes_the_shipped_references(script) -> None:
    for name in ("pd100-oxide-3x3", "pd100-oxide-5x5", "graphene-c24", "pd100-oxide-3x3-chgnet",
                 "graphene-c24-chgnet"):
        assert not script.collapsed(read(ROOT / "docs" / "reference" / f"{name}.extxyz")), name
    merged = read(ROOT / "docs" / "reference" / "pd100-oxide-3x3.extxyz")
    merged.positions[-1] = merged.positions[-2] + [0.31, 0.0, 0.0]   # two atoms 0.31 A apart, as CHGNet relaxed them
    assert script.collapsed(merged)


def test_oxide_candidates_and_the_mapped_emt_reference_hold_the_bag_on_this_template(script) -> None:
    problem = load_problem("pd100-oxide-3x3-chgnet")
    n_t = len(problem.template)
    named = script.oxide_candidates(problem)
    named.append(script.mapped_candidate(problem, ROOT / "docs" / "reference" / "pd100-oxide-3x3.extxyz"))
    assert len(named) == 8   # 4 rocksalt layers, O on bridges, 2 with O in the surface's hollows, the EMT reference
    for what, atoms in named:
        assert np.allclose(atoms.positions[:n_t], problem.template.positions), what
        placed = atoms.get_chemical_symbols()[n_t:]
        assert {s: placed.count(s) for s in set(placed)} == problem.bag, what
        assert not script.collapsed(atoms), what
        assert atoms.positions[n_t:, 2].min() > problem.template.positions[:, 2].max() + 0.5, what
    assert script.oxide_candidates(load_problem("tiny-pd2o")) == []   # one build layer: the motif does not apply
