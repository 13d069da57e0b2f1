"""Real evaluations to the reference basin of one training run (docs/surrogate.md), judged two ways.

History: the first improvement of the run's best whose grid build, relaxed offline with the problem's calculator,
ends within 0.05 eV of the reference (`asla.bench.judge.first_found`, the benchmark's criterion; 5 eV window as on the
oxides). Evaluated structures: the rows of evaluations.db in order (model-relaxed structures when the surrogate was
on; surrogate-only rows skipped), each relaxed offline, the first in the basin.

    python scripts/judge_surrogate_run.py RUN_DIR [--window 5.0]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ase.db import connect

from asla.basin import in_basin, relaxed_energy
from asla.bench.judge import first_found
from asla.problem import load_problem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--window", type=float, default=5.0, help="eV above the reference worth relaxing")
    args = parser.parse_args()
    summary = json.loads((args.run_dir / "summary.json").read_text())
    problem = load_problem(args.run_dir / "problem.yaml")
    ref = problem.reference_energy
    hit = first_found(problem, summary["history"], window=args.window)
    found, spent = None, 0
    for row in connect(str(args.run_dir / "evaluations.db")).select(sort="id"):
        if row.get("surrogate_only"):
            continue
        spent += row.n_calls
        if row.energy > ref + args.window:
            continue
        e = relaxed_energy(problem, row.toatoms())
        if in_basin(e, ref):
            found = {"evaluations": spent, "episode": row.episode, "energy": row.energy, "relaxed_energy": e,
                     "surrogate_relaxed": row.get("surrogate_relaxed")}
            break
    print(json.dumps({"run": str(args.run_dir), "energy_evaluations": summary["energy_evaluations"],
                      "best_energy_relative": summary["best_energy_relative"], "seconds": summary["seconds"],
                      "found_history": None if hit is None else {k: hit[k] for k in ("episode", "evaluations",
                                                                                     "relaxed_energy")},
                      "found_evaluated": found, "surrogate": summary.get("surrogate")}, indent=1))


if __name__ == "__main__":
    main()
