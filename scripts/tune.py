"""Compare recipe variants over seeds: does the greedy build reach the reference, how fast, how many evaluations.

Usage (the command behind the tiny-problem table of docs/tuning.md):
    python scripts/tune.py configs/tiny-pd2o.yaml --seeds 5 \
        --variant base= --variant steps4=learning.grad_steps_per_episode=4 \
        --variant max=learning.target=max
A variant is NAME=KEY=VALUE[,KEY=VALUE...] (recipe overrides, as `asla train --set`).
"""
from __future__ import annotations

import argparse
import tempfile
import time

from asla import load_problem
from asla.agents.agent import Agent
from asla.agents.config import load_config
from asla.agents.training import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--variant", action="append", default=[], help="NAME=KEY=VALUE[,KEY=VALUE...]")
    args = ap.parse_args()
    for spec in args.variant or ["base="]:
        name, _, sets = spec.partition("=")
        overrides = [s for s in sets.split(",") if s]
        greedy_hits, found, evals, best, t0 = 0, 0, [], [], time.perf_counter()
        for seed in range(args.seeds):
            cfg = load_config(args.recipe, [*overrides, f"seed={seed}", "record_evaluations=false",
                                            "log_images_every=1000000"])
            with tempfile.TemporaryDirectory() as tmp:
                s = train(cfg, run_dir=f"{tmp}/run", progress=False)
                problem = load_problem(cfg["problem"])
                e = Agent.load(f"{tmp}/run").build(problem, n=1)[0].energy
            ref = problem.reference_energy
            greedy_hits += ref is not None and abs(e - ref) < 1e-6
            found += s["found_reference_at"] is not None
            evals.append(s["energy_evaluations"])
            best.append(round(s["best_energy"], 3) if s["best_energy"] is not None else None)
        print(f"{name}: greedy build at the reference {greedy_hits}/{args.seeds}, found {found}/{args.seeds}, "
              f"evaluations {evals}, best {best}, {(time.perf_counter() - t0) / args.seeds:.1f} s per run", flush=True)


if __name__ == "__main__":
    main()
