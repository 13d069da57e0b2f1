"""Pretrain an ASLA agent from another search method's database (docs/pretrain.md).

Runs the method (AGOX's basin hopping by default, as the benchmark runs it: asla.bench.methods.run_method, with
its evaluation budget) on the problem with a seed outside the benchmark's 0..9, writes every structure of its
database to OUT/source.extxyz, pretrains the problem's recipe on them (asla.agents.pretrain; the agent goes to
OUT/agent) and prints the greedy build of the network before and after pretraining. The comparison against
training from scratch is then the benchmark's own: the asla-transfer method fine-tuned from OUT/agent against asla,
over seeds (the commands are printed at the end).

Usage:
    python scripts/pretrain_from_method.py --problem pd100-oxide-3x3 --budget 3000 --out runs/pretrain-bh-3x3
    python scripts/pretrain_from_method.py --problem pd100-oxide-3x3 --data runs/pretrain-bh-3x3/source.extxyz \
        --out runs/pretrain-bh-3x3-again       # pretrain from a database already written, no search
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from asla.agents.agent import Agent
from asla.agents.config import load_config
from asla.agents.pretrain import pretrain
from asla.agents.qnetwork import NetworkConfig
from asla.bench.problems import bench_problem
from asla.errors import AslaError
from asla.problem import load_problem
from asla.storage import write_json, write_structures


def run_source(problem_name: str, method: str, budget: int, seed: int, out: Path) -> Path:
    """The method's run, as the benchmark runs it; every structure of its database into out/source.extxyz."""
    from agox.databases import Database

    from asla.bench.methods import run_method
    work = out / "source"
    t0 = time.perf_counter()
    outcome = run_method(method, bench_problem(problem_name), seed, budget, work)
    files = sorted(work.rglob("*.db"))
    if not files:
        raise AslaError(f"--method: {method} left no AGOX database in {work}")
    frames = [a for f in files for a in Database(str(f), initialize=False).restore_to_trajectory()]
    problem = load_problem(problem_name)
    path = out / "source.extxyz"
    write_structures(path, frames, n_template=len(problem.template), calculator=problem.calculator["name"])
    write_json(out / "source.json", {"method": method, "seed": seed, "budget": budget,
                                     "evaluations": outcome.ledger.count, "best_energy": outcome.ledger.best_energy,
                                     "structures": len(frames), "seconds": time.perf_counter() - t0})
    print(f"{method} seed {seed}: {outcome.ledger.count} evaluations, best {outcome.ledger.best_energy:.4f} eV, "
          f"{len(frames)} structures in its database -> {path} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return path


def greedy(recipe: dict, agent: Agent) -> float:
    problem = load_problem(recipe["problem"], **recipe["problem_overrides"])
    return float(agent.build(problem)[0].energy)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problem", default="pd100-oxide-3x3")
    ap.add_argument("--recipe", help="recipe (default: the problem's shipped configs/<problem>.yaml)")
    ap.add_argument("--method", default="bh", help="AGOX method whose database is read: bh (default), rss, gofee")
    ap.add_argument("--budget", type=int, default=3000, help="evaluations of the method's run (default 3000)")
    ap.add_argument("--source-seed", type=int, default=100, help="its seed (default 100: not a benchmark seed)")
    ap.add_argument("--data", nargs="+", help="pretrain from these files instead of running the method")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--orders", type=int, default=8)
    ap.add_argument("--energy", default="evaluate")
    ap.add_argument("--random", type=int, default=50, help="uniformly random legal builds as contrast (default 50)")
    ap.add_argument("--tolerance", type=float, default=1.0,
                    help="A (default 1.0: relaxed structures of a continuous search sit off the build layers by "
                         "more than asla pretrain's default 0.5; each snapped build is evaluated on the grid)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    out = Path(args.out)
    try:
        recipe_name = args.recipe or args.problem
        recipe = load_config(recipe_name)
        data = args.data or [run_source(args.problem, args.method, args.budget, args.source_seed, out)]
        report = pretrain(recipe_name, data, out / "agent", steps=args.steps, orders=args.orders,
                          energy=args.energy, tolerance=args.tolerance, random=args.random)
    except AslaError as exc:
        print(f"pretrain_from_method: error: {exc}", file=sys.stderr)
        return 2
    print(f"pretrained on {report.used} of {report.read} structures and {report.random} random builds "
          f"({report.duplicates} duplicates, skipped "
          f"{report.skipped or 'none'}), {report.evaluations} evaluations for their grid energies, "
          f"{report.steps} steps, loss {report.loss_first:.4f} -> {report.loss_last:.4f}, {report.seconds:.0f} s")
    torch.manual_seed(recipe["seed"])  # the network pretraining started from
    problem = load_problem(recipe["problem"], **recipe["problem_overrides"])
    before = Agent.for_problem(problem, NetworkConfig(**recipe["network"], periodic=bool(problem.pbc[0])))
    ref = problem.reference_energy
    e0, e1 = greedy(recipe, before), greedy(recipe, Agent.load(out / "agent"))
    print(f"greedy build (reward energy): untrained {e0:.4f} eV, pretrained {e1:.4f} eV"
          + ("" if ref is None else f" (reference {ref:.4f}: {e0 - ref:+.4f} / {e1 - ref:+.4f})"))
    write_json(out / "greedy.json", {"untrained": e0, "pretrained": e1, "reference": ref,
                                     "pretrain": json.loads((out / "agent" / "pretrain.json").read_text())})
    print("compare over seeds, in the benchmark's protocol (docs/pretrain.md):\n"
          f"  asla bench --problems {args.problem} --methods asla asla-transfer --transfer-from {out / 'agent'} "
          f"--seeds 10 --stop-when-found --results runs/bench-pretrain --out docs/pretrain-bench")
    return 0


if __name__ == "__main__":
    sys.exit(main())
