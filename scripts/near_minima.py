"""How clear a reference minimum is: the lowest distinct arrangements near it, relaxed tightly.

For a problem whose adatoms fill the surface's hollow sites (the lattice-gas motif of scripts/reference_minima.py):
score every symmetry-distinct arrangement by a single point on the grid, relax the K lowest (BFGS, fmax 0.05, the
judge's), relax the 25 lowest of those again to fmax 0.001 together with the reference, and group them by the strict
criterion (asla.bench.judge.same_structure). Prints the distinct structures by energy, relative to the reference.
Relaxations to fmax 0.05 scatter by about 1 meV, so near-degenerate minima are told apart only at fmax 0.001.

Usage:
    python scripts/near_minima.py suite-cuag-pt100-4x4 --relax 60
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from ase import Atoms

from asla import load_problem
from asla.basin import relax as judge_relax
from asla.bench.judge import reference_structure, same_structure
from asla.builder import atoms_from_actions
from asla.calculators import make_calculator
from asla.enumerate import lattice_gas_arrangements


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("problem", help="shipped problem name or YAML path (with a reference structure)")
    ap.add_argument("--relax", type=int, default=60, help="lattice-gas arrangements relaxed (lowest single points)")
    ap.add_argument("--polish", type=int, default=25, help="of those, the lowest relaxed again to fmax 0.001")
    args = ap.parse_args(argv)
    p = load_problem(args.problem)
    calc = make_calculator(p.calculator)

    def relax(atoms: Atoms, fmax: float) -> tuple[float, Atoms]:  # the judge's relaxation, to fmax
        a = judge_relax(p, atoms, fmax=fmax, steps=2000)
        return a.info["relaxed_energy"], a

    t0 = time.time()
    arrangements = lattice_gas_arrangements(p)
    reference = reference_structure(p)
    if isinstance(arrangements, str) or reference is None:
        ap.error(f"{args.problem}: " + (arrangements if isinstance(arrangements, str) else "no reference structure"))
    single = []
    for actions in arrangements:
        atoms = atoms_from_actions(p, actions)
        atoms.calc = calc
        single.append(float(atoms.get_potential_energy()))
    order = [int(i) for i in np.argsort(single)]
    relaxed = sorted((relax(atoms_from_actions(p, arrangements[i]), 0.05) + (rank,)
                      for rank, i in enumerate(order[:args.relax])), key=lambda r: r[0])
    e_ref, ref = relax(reference, 0.001)
    print(f"{args.problem}: reference {p.reference_energy:.4f} eV, relaxed to fmax 0.001: {e_ref:.4f} eV")
    classes: list[tuple[float, Atoms, int]] = []
    for _, atoms, rank in relaxed[:args.polish]:
        e, tight = relax(atoms, 0.001)
        if not any(same_structure(p, tight, c[1]) for c in classes):
            classes.append((e, tight, rank))
    for e, tight, rank in sorted(classes, key=lambda c: c[0]):
        tag = " (the reference)" if same_structure(p, tight, ref) else ""
        print(f"  {e:.4f} eV  {1000 * (e - e_ref):+7.1f} meV  single-point rank {rank}{tag}")
    print(f"{len(arrangements)} arrangements, {args.relax} relaxed, {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
