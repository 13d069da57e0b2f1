"""Probe of surrogate relaxation (issue 22): does a model fitted on N real evaluations relax new builds well?

For each training-data source and N, fit each model on N real EMT evaluations, relax the same test builds in it
(`asla.surrogate.surrogate_relax`), take one real single point of each result, and compare with ten real LBFGS
steps of the build (the problem's relaxation) and with the build's real relaxed minimum (BFGS to fmax 0.05).

Sources: ``random`` (single points of random legal builds), ``relaxed`` (random builds and the end points of
their ten-step real relaxations, alternating: closer to the low-energy region a search visits), ``agent`` (builds
of the shipped pretrained pd100-oxide-3x3 agent on the 2x2 problem with epsilon-greedy exploration).

    python scripts/surrogate_probe.py --out docs/surrogate-probe.json
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
from ase.calculators.singlepoint import SinglePointCalculator

from asla.basin import relaxed_energy
from asla.builder import random_build
from asla.calculators import make_calculator
from asla.problem import load_problem
from asla.reward import EnergyEvaluator
from asla.storage import atomic_write_text
from asla.surrogate import SurrogateConfig, make_surrogate, surrogate_relax

MODELS = {"gpr": SurrogateConfig(model="gpr"),
          "sgpr-forces": SurrogateConfig(model="sgpr", descriptor="fingerprint", forces=True)}


def single_point(problem, atoms):
    """atoms with its real energy and forces in a SinglePointCalculator."""
    a = atoms.copy()
    a.set_constraint()
    a.calc = make_calculator(problem.calculator)
    e, f = a.get_potential_energy(), a.get_forces()
    a.calc = SinglePointCalculator(a, energy=e, forces=f)
    return a


def random_builds(problem, n: int, rng: np.random.Generator) -> list:
    out = []
    while len(out) < n:
        state = random_build(problem, rng)
        if state.done:
            out.append(state.atoms())
    return out


def ten_real_steps(problem, atoms):
    """The problem's real relaxation (LBFGS, template fixed, atoms kept in the region), as a training search pays."""
    relaxing = load_problem(problem.to_dict(), relax={"steps": 10, "fmax": 0.05})
    ev = EnergyEvaluator(relaxing, use_cache=False).evaluate(atoms)
    return ev.energy, ev.atoms


def training_data(problem, source: str, n: int, seed: int, epsilon: float) -> list:
    rng = np.random.default_rng(seed)
    if source == "random":
        return [single_point(problem, a) for a in random_builds(problem, n, rng)]
    if source == "relaxed":
        out = []
        for a in random_builds(problem, (n + 1) // 2, rng):
            out.append(single_point(problem, a))
            out.append(single_point(problem, ten_real_steps(problem, a)[1]))
        return out[:n]
    if source == "agent":
        from asla.agents import Agent
        agent = Agent.load("pd100-oxide-3x3")
        builds = agent.build(problem, n=n, greedy=False, epsilon=epsilon, seed=seed)
        return [single_point(problem, b.atoms) for b in builds if b.ok][:n]
    raise SystemExit(f"unknown source {source!r}")


def divergence_kind(reason: str) -> str:
    """The check that stopped a relaxation, from `SurrogateRelaxation.reason`."""
    for key, kind in (("floor", "floor"), ("closer than", "collision"), ("region", "region"),
                      ("non-finite", "non-finite"), ("failed", "model failed")):
        if key in reason:
            return kind
    return "other"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problem", default="pd100-oxide-2x2")
    ap.add_argument("--sources", default="random,relaxed,agent")
    ap.add_argument("--sizes", default="20,50,100")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--test-builds", type=int, default=20)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--epsilon", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    problem = load_problem(args.problem)
    sizes = [int(s) for s in args.sizes.split(",")]

    # the test builds, with their ten-real-step and relaxed-minimum energies (not counted: the yardsticks)
    tests = random_builds(problem, args.test_builds, np.random.default_rng(10_000 + args.seed))
    build_e = [single_point(problem, a).get_potential_energy() for a in tests]
    ten_e = [ten_real_steps(problem, a)[0] for a in tests]
    t0 = time.perf_counter()
    min_e = [relaxed_energy(problem, a) for a in tests]
    print(f"references: {len(tests)} test builds, real relaxations {time.perf_counter() - t0:.1f} s", flush=True)

    rows = []
    for source in args.sources.split(","):
        pool = training_data(problem, source, max(sizes), args.seed, args.epsilon)
        for n in sizes:
            for name in args.models.split(","):
                cfg = MODELS[name]
                model = make_surrogate(cfg, problem)
                t0 = time.perf_counter()
                model.update(pool[:n])
                fit_s = time.perf_counter() - t0
                after, diverged, secs, steps, reasons = [], 0, [], [], collections.Counter()
                for atoms, e_build in zip(tests, build_e, strict=True):
                    res = surrogate_relax(problem, atoms, model, steps=args.steps, fmax=cfg.fmax, min_points=0,
                                          fallback="last_good", min_distance=cfg.min_distance,
                                          floor_per_atom=cfg.floor_per_atom)
                    e_last_good = single_point(problem, res.atoms).get_potential_energy()
                    # fallback "build" would have evaluated the unrelaxed build instead
                    after.append({"last_good": e_last_good, "build": e_build if res.diverged else e_last_good})
                    diverged += res.diverged
                    if res.diverged:
                        reasons[divergence_kind(res.reason)] += 1
                    secs.append(res.seconds)
                    steps.append(res.steps)
                row = {"source": source, "n": n, "model": name, "fit_s": round(fit_s, 2),
                       "relax_s_median": round(statistics.median(secs), 2), "steps_median": statistics.median(steps),
                       "diverged": diverged, "divergence_reasons": dict(sorted(reasons.items())),
                       "test_builds": len(tests),
                       "train_energy_min": round(min(a.get_potential_energy() for a in pool[:n]), 2)}
                for policy in ("last_good", "build"):
                    e = np.array([a[policy] for a in after])
                    row[policy] = {
                        "above_min_median": round(float(np.median(e - np.array(min_e))), 2),
                        "vs_ten_steps_median": round(float(np.median(e - np.array(ten_e))), 2),
                        "better_than_ten_steps": int(np.sum(e < np.array(ten_e))),
                        "above_build_median": round(float(np.median(e - np.array(build_e))), 2)}
                rows.append(row)
                lg = row["last_good"]
                print(f"{source:8s} N={n:4d} {name:12s} fit {fit_s:5.2f} s  relax {row['relax_s_median']:5.2f} s  "
                      f"diverged {diverged:2d}/{len(tests)}  above min {lg['above_min_median']:6.2f} eV  "
                      f"vs 10 steps {lg['vs_ten_steps_median']:6.2f} eV  better {lg['better_than_ten_steps']:2d}"
                      f"/{len(tests)}  [fallback build: above min {row['build']['above_min_median']:6.2f}, "
                      f"better {row['build']['better_than_ten_steps']:2d}]", flush=True)
    total = time.perf_counter() - t_start
    report = {"problem": problem.name, "command": "python scripts/surrogate_probe.py " + " ".join(
        sys.argv[1:] if argv is None else argv), "settings": vars(args),
        "references": {"build_median": round(statistics.median(build_e), 2),
                       "ten_steps_median": round(statistics.median(ten_e), 2),
                       "relaxed_min_median": round(statistics.median(min_e), 2),
                       "ten_steps_above_min_median": round(float(np.median(np.array(ten_e) - np.array(min_e))), 2)},
        "rows": rows, "seconds": round(total, 1)}
    print(f"ten real steps: median {report['references']['ten_steps_above_min_median']} eV above the relaxed minimum;"
          f" total {total:.0f} s")
    if args.out:
        atomic_write_text(args.out, json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
