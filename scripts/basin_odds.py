"""How wide is the reference minimum's basin for a grid build? The fraction of random builds that relax into it.

The benchmark's basin criterion (asla.bench.judge, ../shared/ASLA.md section 9) relaxes a method's builds offline. If a
sizeable fraction of uniformly random legal builds relaxes into the reference minimum's basin, a method that
relaxes many of its builds "finds" the minimum by chance, and a hit early in a run says little about learning.
This script measures that chance for a problem: N random builds on the grid of ASLA's recipe (the random
builder's, asla.bench.methods), each relaxed as the basin check relaxes (BFGS, template fixed, fmax 0.05
eV/A), with the fraction in the basin (Wilson 95% interval) and the spread of relaxed energies.
`--builder untrained-agent` draws instead the first builds of ASLA runs: a freshly initialised Q-network of the
recipe (a new initialisation per build, as a new seed would have) acting with the recipe's starting epsilon, so a
hit in a run's first evaluations can be told from the prior of the untrained network.
Usage:
    python scripts/basin_odds.py --problem graphene-c24 --builds 100 [--builder random untrained-agent] [--out docs]
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from asla import load_problem
from asla.bench.judge import TOL, in_basin, relax
from asla.bench.problems import bench_problem
from asla.builder import BuildState, random_build
from asla.calculators import make_calculator
from asla.storage import atomic_write_text, write_json


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% interval of a binomial fraction that stays sensible at 0 or n hits."""
    if n == 0:
        return (0.0, 1.0)
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


BUILDERS = ("random", "untrained-agent")


def builder_for(kind: str, problem_name: str, seed: int) -> tuple[Callable[[int], BuildState], dict]:
    """A function i -> the i-th build of `kind`, on the grid of ASLA's recipe, and what it was."""
    cfg = bench_problem(problem_name).config()
    grid_problem = load_problem(problem_name, **cfg["problem_overrides"])
    rng = np.random.default_rng(seed)
    if kind == "random":
        return (lambda _: random_build(grid_problem, rng)), {"builder": "uniformly random legal actions"}
    import torch

    from asla.agents.agent import Agent
    from asla.agents.qnetwork import NetworkConfig
    epsilon, temperature = cfg["epsilon"]["start"], cfg["temperature"]["start"]

    def agent_build(i: int) -> BuildState:
        torch.manual_seed(1_000_003 * seed + i)  # a new initialisation per build: the first builds of many seeds
        agent = Agent.for_problem(grid_problem, NetworkConfig(**cfg["network"], periodic=bool(grid_problem.pbc[0])))
        with torch.inference_mode():
            return agent.rollout(grid_problem, 1, epsilon, rng, temperature)[0]
    return agent_build, {"builder": "untrained ASLA agent of the recipe", "network": cfg["network"],
                         "epsilon": epsilon, "temperature": temperature}


def measure(problem_name: str, builds: int, seed: int, kind: str = "random",
            done: dict[int, dict] | None = None) -> dict:
    """`done`: rows of an earlier run of the same problem, builder and seed, reused where the build is the same
    (the draws are seeded, so extending a run to more builds relaxes only the new ones)."""
    build, settings = builder_for(kind, problem_name, seed)
    done = done or {}
    problem = load_problem(problem_name)  # relaxed as the benchmark's basin check relaxes
    ref = problem.reference_energy
    if ref is None:
        raise SystemExit(f"basin_odds.py: error: --problem: {problem_name} has no reference_energy to measure against")
    rows: list[dict] = []
    reused = 0
    t0 = time.perf_counter()
    for i in tqdm(range(builds), desc=f"{problem_name}: relaxing {kind} builds", unit="build"):
        state = build(i)
        if not state.done:
            continue
        atoms = state.atoms()
        single = atoms.copy()
        single.calc = make_calculator(problem.calculator)
        built = float(single.get_potential_energy())
        if i in done and abs(done[i]["built_above_reference"] - (built - ref)) < 1e-6:
            rows.append(done[i])
            reused += 1
            continue
        t = time.perf_counter()
        e = float(relax(problem, atoms).info["relaxed_energy"])  # the benchmark judge's relaxation
        rows.append({"build": i, "built_above_reference": built - ref,
                     "relaxed_above_reference": (e - ref) if math.isfinite(e) else None,
                     "relax_seconds": time.perf_counter() - t})
    above = np.array([r["relaxed_above_reference"] for r in rows if r["relaxed_above_reference"] is not None])
    hits = sum(in_basin(r["relaxed_above_reference"], 0.0, TOL) for r in rows)  # energies relative to the reference
    lo, hi = wilson(hits, len(rows))
    return {"problem": problem_name, "builder": kind, "settings": settings, "reference_energy": ref, "tol": TOL,
            "builds": builds, "seed": seed,
            "relaxed": len(rows), "failed": len(rows) - len(above), "in_basin": hits,
            "fraction": hits / len(rows) if rows else None, "wilson95": [lo, hi],
            "relaxed_above_reference_quantiles": (
                {f"{q:g}": float(np.quantile(above, q)) for q in (0, 0.1, 0.5, 0.9, 1)} if len(above) else {}),
            "median_relax_seconds": float(np.median([r["relax_seconds"] for r in rows])) if rows else None,
            "seconds": time.perf_counter() - t0, "reused_rows": reused, "rows": rows}


def previous_results(path: Path) -> list[dict]:
    """The measurements already in OUT (kept, and reused when extended); none if there is no file yet."""
    if not path.exists():
        return []
    try:
        results = json.loads(path.read_text())["results"]
        for r in results:
            r["problem"], r["builder"], r["seed"], r["rows"], r["command"]  # the fields reused
        return results
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SystemExit(f"basin_odds.py: error: --out: {path} is not a basin_odds result ({err}); "
                         "move it away") from None


def report(results: list[dict], command: str) -> str:
    lines = ["# How wide is the minimum's basin for a random grid build?", "",
             "Builds on the grid of ASLA's recipe, by the benchmark's random builder (uniformly random legal actions) "
             "or by an untrained ASLA agent (the recipe's network freshly initialised for each build, acting with the "
             "recipe's starting epsilon: the first builds of ASLA runs), each relaxed "
             "as the benchmark's basin check relaxes (BFGS, template fixed, fmax 0.05 eV/Å, up to 1000 steps); "
             f"in the basin: relaxed within {TOL} eV of the reference. If this fraction is p, a method that relaxes "
             "k of its builds hits by chance with probability about 1 - (1 - p)^k, whatever it learned.", "",
             "| problem | builder | builds relaxed | in the basin | fraction (Wilson 95%) | "
             "relaxed − reference: min / 10% / median / 90% (eV) | median s per relaxation |",
             "|---|---|---:|---:|---|---|---:|"]
    for r in results:
        q = r["relaxed_above_reference_quantiles"]
        spread = " / ".join(f"{q[k]:.2f}" for k in ("0", "0.1", "0.5", "0.9")) if q else "–"
        frac = (f"{r['fraction']:.3f} ({r['wilson95'][0]:.3f}–{r['wilson95'][1]:.3f})" if r["fraction"] is not None
                else "–")
        lines.append(f"| {r['problem']} | {r['builder']} | {r['relaxed']} | {r['in_basin']} | {frac} | {spread} | "
                     f"{r['median_relax_seconds']:.2f} |")
    lines += ["", f"Made {datetime.date.today().isoformat()} with `{command}` (a run with more builds reuses the "
              "relaxations of an earlier one in the same --out); raw rows in basin-odds.json."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problem", nargs="+", default=["graphene-c24"])
    ap.add_argument("--builds", type=int, default=100)
    ap.add_argument("--builder", nargs="+", choices=BUILDERS, default=["random"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="docs")
    args = ap.parse_args()
    if args.builds < 1:
        raise SystemExit(f"basin_odds.py: error: --builds must be at least 1, got {args.builds}")
    command = "python scripts/basin_odds.py " + " ".join(sys.argv[1:])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = previous_results(out / "basin-odds.json")
    for name in args.problem:
        for kind in args.builder:
            key = (name, kind, args.seed)
            before = next((r for r in results if (r["problem"], r["builder"], r["seed"]) == key), None)
            done = {row["build"]: row for row in (before or {}).get("rows", [])}
            result = measure(name, args.builds, args.seed, kind, done)
            result["command"] = command
            results = [r for r in results if r is not before] + [result]
            write_json(out / "basin-odds.json", {"results": results})  # after each: a kill loses one measurement
    text = report(results, " and ".join(dict.fromkeys(r["command"] for r in results)))
    atomic_write_text(out / "basin-odds.md", text)
    print(text)


if __name__ == "__main__":
    main()
