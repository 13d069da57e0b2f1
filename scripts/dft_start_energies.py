"""DFT single points of the DFT reference candidates' CHGNet-relaxed starts (docs/dft-reference/candidates.extxyz).

How far above its own DFT-relaxed energy does a CHGNet-relaxed structure lie in DFT? That sets the judge's window
on pd100-oxide-2x2-dft (asla.bench.problems.WINDOW), whose surrogate recipe scores CHGNet-relaxed builds, and says
what CHGNet is worth as a pre-relaxer before a DFT single point (issue 25). Writes docs/dft-reference/starts.json.

With --minima: what the search's reward says about each DFT minimum. The problem's reference and the N lowest
candidates' GPAW-relaxed structures are relaxed as the surrogate recipe relaxes a build (CHGNet, `surrogate_relax`
with configs/pd100-oxide-2x2-dft-surrogate.yaml's settings), then given a GPAW single point: the reward a build in
that basin can earn at best, if CHGNet's relaxation takes it there. Writes docs/dft-reference/minima-reward.json.

Usage: OMP_NUM_THREADS=1 python scripts/dft_start_energies.py [--first N] [--minima]
(about a minute per GPAW single point on an idle machine here)
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml
from ase.io import read

from asla import load_problem
from asla.calculators import make_calculator
from asla.problem import Problem
from asla.storage import write_json
from asla.surrogate import SurrogateConfig, make_surrogate, surrogate_relax

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "dft-reference"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--first", type=int, default=4, help="candidates, in the reference order (default 4)")
    ap.add_argument("--minima", action="store_true", help="the reward of the reference and the candidates' DFT "
                    "minima, relaxed as the surrogate recipe relaxes a build (writes minima-reward.json)")
    args = ap.parse_args(argv)
    problem = load_problem("pd100-oxide-2x2-dft")
    if args.minima:
        return minima_reward(problem, args.first)
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


def minima_reward(problem: Problem, first: int) -> int:
    """GPAW single points of the reference's and the first candidates' DFT minima after the recipe's CHGNet
    relaxation, beside their DFT-relaxed energies."""
    recipe = yaml.safe_load((ROOT / "configs" / "pd100-oxide-2x2-dft-surrogate.yaml").read_text())
    block = SurrogateConfig.from_dict(recipe["surrogate"])
    surrogate = make_surrogate(block, problem)
    minima = [("reference", read(ROOT / problem.reference["structure"], -1), problem.reference_energy)]
    names = [c["name"] for c in json.loads((OUT / "candidates.json").read_text())["candidates"]]
    relaxed = {name: json.loads((OUT / f"{name}.json").read_text())["energy"] for name in names}
    for name in sorted(names, key=relaxed.get)[:first]:  # the lowest DFT minima first
        minima.append((name, read(OUT / f"{name}.extxyz", -1), relaxed[name]))
    rows = {}
    for name, atoms, relaxed_dft in minima:
        t0 = time.time()
        relaxation = surrogate_relax(problem, atoms, surrogate, **block.relax_kwargs())  # as the training loop does
        start = relaxation.atoms
        start.calc = make_calculator(problem.calculator)
        reward = float(start.get_potential_energy())
        rows[name] = {"relaxed_dft": relaxed_dft, "chgnet_steps": relaxation.steps, "chgnet_energy": relaxation.energy,
                      "reward_dft": reward, "reward_minus_relaxed": reward - relaxed_dft,
                      "relaxation_note": relaxation.reason, "seconds": time.time() - t0}
        print(name, rows[name], flush=True)
    write_json(OUT / "minima-reward.json", {"command": "python scripts/dft_start_energies.py --minima", "minima": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
