"""Success curves of ASLA against a random builder (the floor), over several seeds.

For each problem and seed: train with the problem's recipe (configs/<problem>.yaml); a run has found
the global minimum at the first improvement of its best energy whose structure, relaxed with the
problem's calculator (template fixed; offline, not counted), lies within 0.05 eV of the reference
(the basin criterion, ../shared/ASLA.md section 9). The random builder draws legal builds on the same
grid with the same rules and gets the same number of energy evaluations, judged the same way.

Usage (the command behind docs/learning.md):
    python scripts/learning_curves.py --problems graphene-c24 pd100-oxide-2x2 pd100-oxide-3x3 --seeds 10
    python scripts/learning_curves.py --quick
Writes docs/learning_curves.json, docs/learning_curves.png and docs/learning.md.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from asla import load_problem
from asla.agents.config import load_config
from asla.agents.training import train
from asla.basin import relaxed_energy
from asla.bench.judge import first_found
from asla.builder import atoms_from_actions, random_build
from asla.reward import EnergyEvaluator

DEFAULT_EPISODES = {"graphene-c24": 2000, "pd100-oxide-2x2": 2000, "pd100-oxide-3x3": 5000}


def random_floor(problem, seed: int, budget: int) -> list[dict]:
    """Improvements of the best energy of a random builder with `budget` distinct evaluations."""
    rng = np.random.default_rng(10_000 + seed)
    ev = EnergyEvaluator(problem)
    best, rows, episode = math.inf, [], 0
    while ev.n_calls < budget and episode < 50 * budget:
        episode += 1
        s = random_build(problem, rng)
        if not s.done:
            continue
        r = ev.evaluate(s.atoms(), key=s.canonical_key())
        if r.ok and r.energy < best - 1e-9:
            best = r.energy
            rows.append({"episode": episode, "evaluations": ev.n_calls, "energy": r.energy, "actions": list(s.actions)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", nargs="+", default=list(DEFAULT_EPISODES))
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--episodes", type=int, nargs="*", help="episodes per problem (default: 2000, 2000, 5000)")
    ap.add_argument("--window", type=float, default=40.0,
                    help="relax improvements within this many eV of the reference")
    ap.add_argument("--runs", default="runs/curves")
    ap.add_argument("--out", default="docs")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="recipe override for every run, e.g. --set torch_threads=1")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 24 episodes, pd100-oxide-2x2")
    ap.add_argument("--merge", nargs="+", metavar="JSON[=LABEL]",
                    help="combine earlier runs' learning_curves.json into --out (LABEL renames its problem)")
    args = ap.parse_args()
    if args.merge:
        merged = {"command": [], "python": platform.python_version(), "problems": {}}
        for spec in args.merge:  # PATH or PATH=LABEL (a label for the one problem of that run)
            path, _, label = spec.partition("=")
            part = json.loads(Path(path).read_text())
            merged["command"].append(part["command"])
            for name, data in part["problems"].items():
                merged["problems"][label or name] = data
        merged["command"] = "`; `".join(merged["command"])
        out = Path(args.out)
        (out / "learning_curves.json").write_text(json.dumps(merged, indent=2, default=float) + "\n")
        _plot(merged, out / "learning_curves.png")
        _markdown(merged, out / "learning.md")
        return
    if args.quick:
        args.problems, args.seeds, args.episodes = ["pd100-oxide-2x2"], 1, [24]
    episodes = dict(zip(args.problems, args.episodes, strict=False)) if args.episodes else \
        {p: DEFAULT_EPISODES.get(p, 2000) for p in args.problems}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"command": "python scripts/learning_curves.py " + " ".join(sys.argv[1:]),
              "python": platform.python_version(), "problems": {}}
    for name in args.problems:
        overrides = load_config(f"configs/{name}.yaml", args.overrides)["problem_overrides"]
        problem = load_problem(name, **overrides)
        if problem.reference_energy is None:
            raise SystemExit(f"{name} has no reference energy: run scripts/reference_minima.py first")
        rows = []
        for seed in range(args.seeds):
            run_dir = Path(args.runs) / f"{name}-s{seed}"
            if run_dir.exists():
                shutil.rmtree(run_dir)
            cfg = load_config(f"configs/{name}.yaml", [f"seed={seed}", f"episodes={episodes[name]}",
                                                       "log_images_every=1000000", *args.overrides])
            t0 = time.perf_counter()
            s = train(cfg, run_dir=run_dir, progress=False)
            wall = time.perf_counter() - t0
            hit = first_found(problem, s["history"], window=args.window)
            floor_rows = random_floor(problem, seed, s["energy_evaluations"])
            floor_hit = first_found(problem, floor_rows, window=args.window)
            best_relaxed = relaxed_energy(problem, atoms_from_actions(problem, s["best_actions"]))
            rows.append({"seed": seed, "episodes": s["episodes"], "evaluations": s["energy_evaluations"],
                         "best_energy": s["best_energy"], "best_relaxed": best_relaxed, "found": hit,
                         "random_found": floor_hit, "random_best": floor_rows[-1]["energy"] if floor_rows else None,
                         "wall_seconds": wall, "episodes_per_second": s["episodes_per_second"],
                         "timing_seconds": s["timing_seconds"]})
            print(f"{name} seed {seed}: best {s['best_energy']:.3f} eV (relaxed {best_relaxed:.3f}, reference "
                  f"{problem.reference_energy:.3f}); found {hit is not None}; random found {floor_hit is not None}; "
                  f"{s['episodes_per_second']:.1f} episodes/s", flush=True)
            report["problems"][name] = {"reference": problem.reference_energy, "episodes": episodes[name], "runs": rows}
            (out / "learning_curves.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    _plot(report, out / "learning_curves.png")
    _markdown(report, out / "learning.md")


def _curve(hits: list[int | None], xs: np.ndarray, n: int) -> np.ndarray:
    return np.array([sum(h is not None and h <= x for h in hits) / n for x in xs])


def _plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for n, (name, data) in enumerate(report["problems"].items()):
        runs = data["runs"]
        budget = max(r["evaluations"] for r in runs)
        xs = np.arange(budget + 1)
        colour = f"C{n}"
        ax.step(xs, _curve([r["found"]["evaluations"] if r["found"] else None for r in runs], xs, len(runs)),
                where="post", color=colour, label=f"ASLA, {name}")
        ax.step(xs, _curve([r["random_found"]["evaluations"] if r["random_found"] else None for r in runs], xs,
                           len(runs)), where="post", color=colour, ls="--", label=f"random builder, {name}")
    ax.set_xlabel("energy evaluations")
    ax.set_ylabel("fraction of seeds at the global minimum")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _markdown(report: dict, path: Path) -> None:
    lines = ["# Learning curves", "", f"Command: `{report['command']}`  ",
             f"Machine: 2 vCPUs (about one core of real throughput), no GPU; Python {report['python']}.", "",
             "Found = basin criterion: the best structure so far, relaxed with the problem's calculator (template "
             "fixed, not counted), within 0.05 eV of the reference minimum (docs/reference-minima.md).", "",
             "![success curves](learning_curves.png)", "",
             "| problem | episodes (median evaluations) | ASLA seeds found | median evaluations to find | "
             "random builder seeds found | episodes/s | time: rollout (of it network forward) / calculator / learn "
             "(s per 100 episodes) |", "|---|---|---|---|---|---|---|"]
    for name, data in report["problems"].items():
        runs = data["runs"]
        hits = [r["found"]["evaluations"] for r in runs if r["found"]]
        rhits = [r for r in runs if r["random_found"]]
        t = {k: np.mean([r["timing_seconds"].get(k, 0.0) / r["episodes"] * 100 for r in runs])
             for k in ("rollout", "rollout_forward", "calculator", "learn")}
        fwd = f"{t['rollout_forward']:.1f}" if all("rollout_forward" in r["timing_seconds"] for r in runs) else "n/a"
        budget = int(np.median([r["evaluations"] for r in runs]))
        lines.append(f"| {name} | {data['episodes']} ({budget} evaluations) | {len(hits)}/{len(runs)} | "
                     f"{np.median(hits) if hits else '-'} | {len(rhits)}/{len(runs)} | "
                     f"{np.mean([r['episodes_per_second'] for r in runs]):.1f} | "
                     f"{t['rollout']:.1f} ({fwd} forward) / {t['calculator']:.1f} / {t['learn']:.1f} |")
    lines += ["", "Per seed (best single-point and relaxed energies, eV):", ""]
    for name, data in report["problems"].items():
        lines.append(f"- {name} (reference {data['reference']:.3f}): " + "; ".join(
            f"s{r['seed']} {r['best_energy']:.2f}/{r['best_relaxed']:.2f}" for r in data["runs"]))
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
