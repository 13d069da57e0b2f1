"""DFT single points of the DFT reference candidates' CHGNet-relaxed starts (docs/dft-reference/candidates.extxyz).

How far above its own DFT-relaxed energy does a CHGNet-relaxed structure lie in DFT? That sets the judge's window
on pd100-oxide-2x2-dft (asla.bench.problems.WINDOW), whose surrogate recipe scores CHGNet-relaxed builds, and says
what CHGNet is worth as a pre-relaxer before a DFT single point (issue 25). Writes docs/dft-reference/starts.json.

Usage: OMP_NUM_THREADS=1 python scripts/dft_start_energies.py [--first N]   (about a minute per candidate here)
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ase.io import read

from asla import load_problem
from asla.calculators import make_calculator
from asla.storage import write_json

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "dft-reference"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--first", type=int, default=4, help="candidates, in the reference order (default 4)")
    args = ap.parse_args(argv)
    problem = load_problem("pd100-oxide-2x2-dft")
    rows = {}
    for atoms in read(OUT / "candidates.extxyz", ":")[:args.first]:
        name = atoms.info["candidate"]
        atoms.calc = make_calculator(problem.calculator)
        t0 = time.time()
        rows[name] = {"start_dft": float(atoms.get_potential_energy()), "seconds": time.time() - t0}
        done = OUT / f"{name}.json"
        if done.exists():
            relaxed = json.loads(done.read_text())["energy"]
            rows[name].update(relaxed_dft=relaxed, start_minus_relaxed=rows[name]["start_dft"] - relaxed)
        print(name, rows[name], flush=True)
    write_json(OUT / "starts.json", {"command": "python scripts/dft_start_energies.py", "starts": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
