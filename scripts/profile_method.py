"""Profile one benchmark run: where a method's wall time goes (its own code, AGOX's, the calculator's).

Runs one (method, problem, seed) exactly as the benchmark (asla.bench) does, in a scratch directory (no record is
written to the benchmark results), under cProfile; prints the functions with the largest cumulative time and
writes them, with the run's wall time and evaluations, as JSON.

Usage:
    python scripts/profile_method.py --method gofee --problem pd100-oxide-3x3 --budget 12 --out /tmp/prof
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
from pathlib import Path

from asla.bench import methods as bm
from asla.bench.problems import bench_problem
from asla.errors import AslaError
from asla.storage import write_json


def top_functions(stats: pstats.Stats, n: int) -> list[dict]:
    """The n functions with the largest cumulative time, outermost first."""
    rows = []
    for (path, line, func), (_cc, ncalls, tottime, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": f"{Path(path).name}:{line}({func})", "calls": ncalls,
                     "own_seconds": round(tottime, 3), "cumulative_seconds": round(cumtime, 3)})
    rows.sort(key=lambda r: -r["cumulative_seconds"])
    return rows[:n]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", required=True, help=f"one of: {', '.join(bm.METHODS)}")
    ap.add_argument("--problem", required=True,
                    help="a shipped problem name (e.g. pd100-oxide-3x3) or a problem YAML path")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget", type=int, required=True, help="evaluations (keep it small: cProfile slows Python)")
    ap.add_argument("--top", type=int, default=40, help="functions to print and keep")
    ap.add_argument("--out", type=Path, required=True, help="directory for profile.json and profile.prof")
    args = ap.parse_args(argv)
    if args.method not in bm.METHODS:
        ap.error(f"--method: unknown method {args.method!r}; allowed: {', '.join(bm.METHODS)}")

    try:
        problem = bench_problem(args.problem)
    except AslaError as err:
        ap.error(str(err))
    args.out.mkdir(parents=True, exist_ok=True)
    bm.prepare(args.method)  # imports and Ray start stay out of the profile, as they stay off a run's clock
    with tempfile.TemporaryDirectory(prefix="asla-profile-") as work:
        profiler = cProfile.Profile()
        profiler.enable()
        outcome = bm.run_method(args.method, problem, args.seed, args.budget, Path(work))
        profiler.disable()
    profiler.dump_stats(str(args.out / "profile.prof"))
    stats = pstats.Stats(profiler)
    top = top_functions(stats, args.top)
    wall = outcome.wall_seconds
    print(f"{args.method} on {args.problem}, seed {args.seed}: {outcome.ledger.count} evaluations, "
          f"{wall:.1f} s (under cProfile)")
    print(f"{'cumulative s':>12} {'share':>6} {'own s':>8} {'calls':>8}  function")
    for r in top:
        print(f"{r['cumulative_seconds']:12.1f} {r['cumulative_seconds'] / wall:6.0%} {r['own_seconds']:8.1f} "
              f"{r['calls']:8d}  {r['function']}")
    write_json(args.out / "profile.json", {"method": args.method, "problem": args.problem, "seed": args.seed,
                                           "budget": args.budget, "evaluations": outcome.ledger.count,
                                           "wall_seconds": wall, "command": "python " + " ".join(sys.argv), "top": top})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
