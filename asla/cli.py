"""The ``asla`` command: list and check problems, random builds, training, building with an agent."""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

from .errors import AslaError


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # the benchmark has its own options (asla.bench.command, as scripts/benchmark.py)
        from .bench.command import main as bench_main
        return bench_main(argv[1:], prog="asla bench")
    parser = argparse.ArgumentParser(prog="asla", description="Atomistic structure learning (ASLA).")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("bench", add_help=False, help="benchmark ASLA against AGOX's searches (asla bench --help)")

    p = sub.add_parser("problems", help="list the shipped problems")
    p.set_defaults(func=cmd_problems)

    p = sub.add_parser("check", help="load and validate a problem, print its grid and symmetry")
    p.add_argument("problem")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("random", help="random legal builds of a problem, evaluated and written out")
    p.add_argument("problem")
    p.add_argument("--episodes", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="random.extxyz", help=".extxyz or .db")
    p.set_defaults(func=cmd_random)

    p = sub.add_parser("train", help="train an agent on a recipe (configs/<problem>.yaml)")
    p.add_argument("config", nargs="?", help="recipe YAML or shipped recipe name")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set episodes=500 --set learning.lr=3e-4")
    p.add_argument("--run-dir", help="where logs, checkpoints and structures go (default runs/<recipe>-s<seed>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    p.add_argument("--init-from", metavar="CHECKPOINT", help="start from an agent trained elsewhere (transfer)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("build", help="build structures with a trained or pretrained agent")
    p.add_argument("agent", help="agent path (x.safetensors/x.json), run directory, or pretrained name")
    p.add_argument("--problem", help="problem to build (default: the one the agent was trained on)")
    p.add_argument("--episodes", type=int, default=1)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--greedy", action="store_true", help="always take the best action (default)")
    g.add_argument("--epsilon", type=float, help="random legal action with this probability")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the built structures (.extxyz or .db)")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("db", help="list or export the evaluations of a run (run_dir/evaluations.db)")
    p.add_argument("run_dir")
    p.add_argument("--export", help="write all evaluated structures to this .extxyz")
    p.add_argument("--limit", type=int, default=10)
    p.set_defaults(func=cmd_db)

    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except AslaError as exc:
        print(f"asla: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("asla: interrupted; resume with 'asla train --resume RUN_DIR'", file=sys.stderr)
        return 130


def cmd_problems(args: argparse.Namespace) -> int:
    from .problem import list_problems, load_problem
    print(f"{'problem':24s} {'bag':18s} {'grid':>10s} {'layers':>6s} {'calculator':>10s} {'reference (eV)':>15s}")
    for name in list_problems():
        p = load_problem(name)
        bag = "".join(f"{s}{n}" for s, n in p.bag.items())
        ref = "-" if p.reference_energy is None else f"{p.reference_energy:.3f}"
        print(f"{name:24s} {bag:18s} {p.grid.na:>4d}x{p.grid.nb:<5d} {p.grid.n_layers:>6d} "
              f"{p.calculator['name']:>10s} {ref:>15s}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from .builder import check_fits, n_actions, observation_shape
    from .problem import load_problem
    p = load_problem(args.problem)
    check_fits(p)  # random legal builds: the check load_problem leaves out
    print(f"problem {p.name}: {p.description}")
    print(f"  template {len(p.template)} atoms, bag {p.bag}, sequence {p.sequence or 'agent chooses'}")
    print(f"  grid {p.grid.shape} at {p.grid.spacing[0]:.3f} x {p.grid.spacing[1]:.3f} A, layers z={p.grid.layer_z}")
    print(f"  observation {observation_shape(p)}, actions {n_actions(p)}, symmetry operations {p.symmetry.size}")
    print(f"  calculator {p.calculator}, reference {p.reference.get('energy')}")
    return 0


def cmd_random(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .builder import random_build
    from .problem import load_problem
    from .reward import EnergyEvaluator
    from .storage import write_structures
    problem = load_problem(args.problem)
    rng = np.random.default_rng(args.seed)
    ev = EnergyEvaluator(problem)
    frames, energies, dead = [], [], 0
    for episode in tqdm(range(args.episodes), unit="build"):
        state = random_build(problem, rng)
        if not state.done:
            dead += 1
            continue
        res = ev.evaluate(state.atoms(), key=state.canonical_key())
        res.atoms.info.update({"episode": episode, "ok": res.ok})
        frames.append(res.atoms)
        energies.append(res.energy)
    write_structures(args.out, frames)
    e = np.array(energies, dtype=float)
    print(f"{len(frames)} structures written to {args.out} ({dead} builds had no legal move left)")
    if len(e):
        ref = problem.reference_energy
        rel = "" if ref is None else f" ({np.nanmin(e) - ref:+.3f} eV vs reference)"
        print(f"energy: lowest {np.nanmin(e):.3f} eV{rel}, median {np.nanmedian(e):.3f} eV; "
              f"{ev.n_calls} calculator evaluations")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from asla.agents.training import train
    if not args.config and not args.resume:
        raise SystemExit("asla train: give a recipe (e.g. configs/tiny-pd2o.yaml) or --resume RUN_DIR")
    overrides = list(args.overrides)
    summary = train(args.config, run_dir=args.resume or args.run_dir, resume=bool(args.resume),
                    init_from=args.init_from, progress=not args.no_progress, overrides=overrides)
    ref = summary["reference_energy"]
    best = summary["best_energy"]
    print(f"run {summary['run_dir']}: {summary['episodes']} episodes, {summary['energy_evaluations']} energy "
          f"evaluations, best energy {best if best is None else round(best, 4)} eV"
          + ("" if ref is None or best is None else f" ({best - ref:+.4f} eV vs reference)")
          + f", {summary['episodes_per_second']:.1f} episodes/s")
    print(f"TensorBoard: tensorboard --logdir {Path(summary['run_dir']).parent}")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from asla.agents.agent import Agent

    from .problem import load_problem
    from .storage import write_structures
    agent = Agent.load(args.agent)
    problem_name = args.problem or agent.card.get("problem")
    if not problem_name:
        raise AslaError("--problem: the agent card names no training problem; give --problem")
    problem = load_problem(problem_name)
    greedy = args.epsilon is None
    t0 = time.perf_counter()
    results = agent.build(problem, n=args.episodes, greedy=greedy, epsilon=args.epsilon or 0.0, seed=args.seed)
    print(f"agent {args.agent} on {problem.name} ({'greedy' if greedy else f'epsilon {args.epsilon}'}):")
    print(f"{'#':>4s} {'energy (eV)':>14s} {'vs reference':>13s} {'time (s)':>9s}")
    for n, r in enumerate(results):
        rel = "-" if r.energy_relative is None else f"{r.energy_relative:+.4f}"
        e = f"{r.energy:.4f}" if math.isfinite(r.energy) else "failed"
        print(f"{n:>4d} {e:>14s} {rel:>13s} {r.seconds:>9.3f}")
    if args.out:
        frames = []
        for n, r in enumerate(results):
            r.atoms.info.update({"build": n, "ok": r.ok})
            frames.append(r.atoms)
        write_structures(args.out, frames)
        print(f"wrote {len(frames)} structures to {args.out}")
    print(f"total {time.perf_counter() - t0:.2f} s")
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    from .storage import open_db
    path = Path(args.run_dir) / "evaluations.db" if Path(args.run_dir).is_dir() else Path(args.run_dir)
    if not path.exists():
        raise AslaError(f"run_dir: no evaluations database at {path}")
    db = open_db(path)
    rows = list(db.select(sort="energy"))
    print(f"{path}: {len(rows)} evaluated structures")
    print(f"{'id':>6s} {'episode':>8s} {'energy (eV)':>14s} {'formula':>14s}")
    for row in rows[: args.limit]:
        print(f"{row.id:>6d} {row.get('episode', -1):>8d} {row.get('energy', float('nan')):>14.4f} {row.formula:>14s}")
    if args.export:
        from .storage import write_structures
        write_structures(args.export, [row.toatoms(add_additional_information=False) for row in rows])
        print(f"exported {len(rows)} structures to {args.export}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
