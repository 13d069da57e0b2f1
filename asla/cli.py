"""The ``asla`` command: list and check problems, random builds, training, building with an agent, explaining it."""
from __future__ import annotations

import argparse
import math
import sqlite3
import sys
import time
from pathlib import Path

import numpy as np

from .errors import AslaError

PROBLEM_HELP = "shipped problem name (see 'asla problems') or a problem YAML file"
RELAX_STEPS = 1000  # optimizer steps of a full relaxation, as the basin criterion (asla.basin.relax) takes


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
    p.add_argument("problem", help=PROBLEM_HELP)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("random", help="random legal builds of a problem, evaluated and written out")
    p.add_argument("problem", help=PROBLEM_HELP)
    p.add_argument("--episodes", type=int, default=100, help="number of random builds (default 100)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random builds (default 0)")
    p.add_argument("--out", default="random.extxyz", help="where the structures go: .extxyz or .db "
                   "(default random.extxyz)")
    p.set_defaults(func=cmd_random)

    p = sub.add_parser("train", help="train an agent on a recipe (configs/<problem>.yaml)")
    p.add_argument("config", nargs="?", help="recipe YAML or shipped recipe name")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set episodes=500 --set learning.lr=3e-4")
    p.add_argument("--run-dir", help="where logs, checkpoints and structures go (default runs/<recipe>-s<seed>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    p.add_argument("--init-from", metavar="CHECKPOINT", help="start from an agent trained elsewhere (transfer)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar; print a one-line status every --status-every seconds instead (for logs)")
    p.add_argument("--status-every", type=float, default=30.0, metavar="SECONDS",
                   help="with --no-progress: seconds between status lines (default 30; 0: one per iteration)")
    p.add_argument("--no-relax", action="store_true",
                   help="do not relax the best structure at the end (by default it is relaxed with the problem's "
                        "calculator, template fixed, and judged against the reference basin)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("pretrain", help="supervised pretraining on known structures (extxyz or ase.db) built in "
                       "random orders; fine-tune the result with asla train --init-from OUT (docs/pretrain.md)")
    p.add_argument("config", help="recipe YAML or shipped recipe name: its problem, network, learning and seed")
    p.add_argument("--data", action="append", default=[], metavar="FILE", required=True,
                   help="structures with energies: .extxyz/.xyz/.traj or an ase.db (.db, .json, URL); repeatable")
    p.add_argument("--out", required=True, help="folder for agent.safetensors, agent.json, pretrain.json and "
                   "TensorBoard (must not hold an agent yet)")
    p.add_argument("--steps", type=int, default=1000, help="gradient steps (default 1000)")
    p.add_argument("--orders", type=int, default=8, help="random build orders per structure (default 8)")
    p.add_argument("--energy", default="evaluate", help="evaluate (default): each grid build's energy from the "
                   "problem's calculator, as training's reward; stored: the file's energies, no calculator calls")
    p.add_argument("--random", type=int, default=0, metavar="N",
                   help="also N uniformly random legal builds, evaluated (the contrast a set of good structures "
                        "lacks; default 0)")
    p.add_argument("--tolerance", type=float, default=0.5,
                   help="A: an atom farther than this from every grid point does not fit (default 0.5)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set seed=3 --set learning.batch_size=32")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("build", help="build structures with a trained or pretrained agent")
    p.add_argument("agent", help="agent path (x.safetensors/x.json), run directory, or pretrained name")
    p.add_argument("--problem", help="problem to build (default: the one the agent was trained on)")
    p.add_argument("--trust-card", action="store_true",
                   help="without --problem, load the card's problem even if it is a file or names an import-path "
                        "calculator (which runs code: only for cards you trust)")
    p.add_argument("--episodes", type=int, default=1, help="number of builds (default 1)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--greedy", action="store_true", help="always take the best action (default)")
    g.add_argument("--epsilon", type=float, help="random legal action with this probability")
    p.add_argument("--seed", type=int, default=0, help="seed of the random actions with --epsilon (default 0)")
    p.add_argument("--relax", nargs="?", type=int, const=RELAX_STEPS, default=None, metavar="STEPS",
                   help="also relax each build with the problem's calculator (template fixed; at most STEPS "
                        f"optimizer steps, default {RELAX_STEPS}) and judge it against the reference basin")
    p.add_argument("--out", help="write the built structures (.extxyz or .db)")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("explain", help="why the agent chose each site: Q map and LRP relevance map per build step "
                       "(PNG)")
    p.add_argument("agent", help="agent path (x.safetensors/x.json), run directory, or pretrained name")
    p.add_argument("--problem", help="problem to build (default: the one the agent was trained on)")
    p.add_argument("--trust-card", action="store_true",
                   help="without --problem, load the card's problem even if it is a file or names an import-path "
                        "calculator (which runs code: only for cards you trust)")
    p.add_argument("--out", default="explain", help="folder for step_NNN.png and steps.json (default explain)")
    p.add_argument("--steps", type=int, help="explain at most this many build steps (default: the whole build)")
    p.add_argument("--epsilon", type=float, default=0.0,
                   help="random legal action with this probability (default 0: greedy, as asla build)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random actions with --epsilon (default 0)")
    p.add_argument("--rule", default="epsilon", help="LRP rule: epsilon (default) or zplus (docs/explain.md)")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("db", help="list or export the evaluations of a run (run_dir/evaluations.db)")
    p.add_argument("run_dir", help="a run directory, or an evaluations database (.db) itself")
    p.add_argument("--export", metavar="FILE", help="write all evaluated structures to this .extxyz")
    p.add_argument("--limit", type=int, default=10, help="rows to list, lowest energy first (default 10)")
    p.set_defaults(func=cmd_db)

    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except AslaError as exc:
        print(f"asla: error: {exc}", file=sys.stderr)
        return 2
    except (OSError, sqlite3.Error) as exc:  # a full disk, a folder turned read-only, a database that cannot grow
        run = getattr(args, "resume", None) or getattr(args, "run_dir", None) or "RUN_DIR"
        hint = (f"; published checkpoints are intact: free space (or fix permissions), then asla train --resume "
                f"{run}" if args.command == "train" else "")
        print(f"asla: error: {_system_error(exc)}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("asla: interrupted; resume with 'asla train --resume RUN_DIR'", file=sys.stderr)
        return 130


def _system_error(exc: BaseException) -> str:
    """One line for an error of the system rather than of the input: the file and the reason."""
    if isinstance(exc, sqlite3.Error):
        return f"evaluations database: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    assert isinstance(exc, OSError)
    reason = exc.strerror or (str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    return f"{exc.filename}: {reason}" if exc.filename else reason


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
    ref = p.reference_energy
    kind = "" if ref is None else (" (relaxed)" if p.reference.get("relaxed") else " (on the grid)")
    print(f"problem {p.name}: {p.description}")
    print(f"  template {len(p.template)} atoms, bag {p.bag}, sequence {p.sequence or 'agent chooses'}")
    print(f"  grid {p.grid.shape} at {p.grid.spacing[0]:.3f} x {p.grid.spacing[1]:.3f} A, layers z="
          f"{[round(z, 3) for z in p.grid.layer_z]} A")
    print(f"  observation {observation_shape(p)}, actions {n_actions(p)}, symmetry operations {p.symmetry.size}")
    print(f"  calculator {_rounded(p.calculator)}, reference {'-' if ref is None else f'{ref:.4f} eV'}{kind}")
    return 0


def _rounded(x: object, digits: int = 6) -> object:
    """Floats in nested dicts and lists rounded for printing (13.078699999999998 -> 13.0787)."""
    if isinstance(x, float):
        return round(x, digits)
    if isinstance(x, dict):
        return {k: _rounded(v, digits) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_rounded(v, digits) for v in x]
    return x


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
        res.atoms.info.update({"episode": episode + 1, "ok": res.ok})  # episodes count from 1, as in training
        frames.append(res.atoms)
        energies.append(res.energy)
    write_structures(args.out, frames, n_template=len(problem.template), calculator=problem.calculator["name"])
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
    progress: bool | float = False if args.no_progress else True
    if args.no_progress:
        progress = max(0.0, args.status_every)  # a number: seconds between status lines
    summary = train(args.config, run_dir=args.resume or args.run_dir, resume=bool(args.resume),
                    init_from=args.init_from, progress=progress, overrides=list(args.overrides))
    ref, best = summary["reference_energy"], summary["best_energy"]
    kind = summary.get("best_energy_kind", "single point")
    line = (f"run {summary['run_dir']}: {summary['episodes']} episodes, {summary['energy_evaluations']} energy "
            f"evaluations, best energy {'-' if best is None else f'{best:.4f}'} eV ({kind}"
            + ("" if ref is None or best is None else f", {best - ref:+.4f} eV vs reference") + ")")
    if best is not None and not args.no_relax:
        from .basin import in_basin, relax
        from .builder import atoms_from_actions
        from .problem import load_problem
        from .storage import write_json
        problem = load_problem(str(Path(summary["run_dir"]) / "problem.yaml"))  # as the run set it up
        relaxed = float(relax(problem, atoms_from_actions(problem, summary["best_actions"]),
                              steps=RELAX_STEPS).info["relaxed_energy"])
        judged = ref is not None and bool(problem.reference.get("relaxed"))  # an on-grid reference has no basin
        found = in_basin(relaxed, ref) if judged else None
        summary.update({"best_relaxed_energy": relaxed if math.isfinite(relaxed) else None,
                        "best_in_reference_basin": found})
        write_json(Path(summary["run_dir"]) / "summary.json", summary)
        line += f"; relaxed {relaxed:.4f} eV" + ("" if not judged else f" ({relaxed - ref:+.4f} vs reference, "
                                                 f"{'in' if found else 'not in'} the reference basin)")
    print(line + f", {summary['episodes_per_second']:.1f} episodes/s")
    print(f"TensorBoard: tensorboard --logdir {summary['run_dir']}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from asla.agents.pretrain import pretrain
    r = pretrain(args.config, args.data, args.out, steps=args.steps, orders=args.orders, energy=args.energy,
                 tolerance=args.tolerance, random=args.random, overrides=list(args.overrides),
                 progress=not args.no_progress)
    skipped = sum(r.skipped.values())
    print(f"{r.problem}: {r.read} structures read, {r.used} used ({r.orders} orders each, {r.episodes} build "
          f"sequences){f', {r.random} random builds' if r.random else ''}, {r.duplicates} duplicates, {skipped} skipped"
          + (": " + ", ".join(f"{n} {kind}" for kind, n in r.skipped.items()) if skipped else ""))
    for kind, example in r.skipped_examples.items():
        print(f"  {kind}: e.g. {example}")
    how = "evaluated" if r.energy == "evaluate" else "as stored"
    how += f", {r.evaluations} calculator evaluations"
    print(f"energies ({how}): lowest {r.energies['lowest']:.4f}, median {r.energies['median']:.4f} eV; "
          f"{r.steps} gradient steps, loss {r.loss_first:.4f} -> {r.loss_last:.4f}, {r.seconds:.1f} s")
    print(f"wrote {Path(args.out) / 'agent.safetensors'}, agent.json and pretrain.json; fine-tune with: asla train "
          f"{args.config} --init-from {args.out}")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from asla.agents.agent import Agent, load_card_problem

    from .problem import load_problem
    from .storage import write_structures
    _explain_run_without_agent(args.agent)
    agent = Agent.load(args.agent)
    if args.problem:
        problem = load_problem(args.problem)
    else:  # the card is untrusted: its problem is a shipped name or plain data (asla.agents.agent.load_card_problem)
        problem = load_card_problem(agent.card, args.agent, trust=args.trust_card)
    if args.relax is not None and args.relax < 1:
        raise AslaError(f"--relax: optimizer steps must be a positive integer, got {args.relax}")
    greedy = args.epsilon is None
    ref = problem.reference_energy
    judged = ref is not None and bool(problem.reference.get("relaxed"))  # relaxed energies meet relaxed references
    t0 = time.perf_counter()
    results = agent.build(problem, n=args.episodes, greedy=greedy, epsilon=args.epsilon or 0.0, seed=args.seed,
                          relax_steps=args.relax or 0)
    reward_relaxes = problem.relax.steps > 0
    first = (f"after {problem.relax.steps} {problem.relax.optimizer} steps (the reward's relaxation)"
             if reward_relaxes else "single point, as built on the grid")
    print(f"agent {args.agent} on {problem.name} ({'greedy' if greedy else f'epsilon {args.epsilon}'}); "
          f"reference {'-' if ref is None else f'{ref:.4f} eV'}"
          + ("" if ref is None else (" (relaxed)" if problem.reference.get("relaxed") else " (on the grid)")))
    explain = f"  energy: {first}"
    if args.relax is not None:
        explain += (f"; relaxed: with {problem.calculator['name']}, template fixed, at most {args.relax} steps, as "
                    "the basin criterion relaxes (asla.basin)")
        explain += ("; basin: relaxed within 0.05 eV of the reference" if judged else
                    "; the reference is on the grid, so relaxed energies are not compared with it")
    print(explain)
    label = f"{problem.relax.steps}-step (eV)" if reward_relaxes else "single pt (eV)"
    head = f"{'#':>4s} {label:>14s} {'vs reference':>13s}"
    if args.relax is not None:
        head += f" {'relaxed (eV)':>14s} {'vs reference':>13s} {'basin':>6s}"
    print(head + f" {'time (s)':>9s}")
    for n, r in enumerate(results):
        rel = "-" if r.energy_relative is None else f"{r.energy_relative:+.4f}"
        e = f"{r.energy:.4f}" if math.isfinite(r.energy) else "failed"
        row = f"{n:>4d} {e:>14s} {rel:>13s}"
        r.atoms.info.update({"build": n, "ok": r.ok,
                             "energy_kind": "reward relaxation" if reward_relaxes else "single point"})
        if args.relax is not None:
            relaxed = float("nan") if r.relaxed_energy is None else r.relaxed_energy
            found = r.in_reference_basin
            r.atoms.info.update({"relaxed_energy": relaxed} | ({} if found is None else {"in_reference_basin": found}))
            row += (f" {relaxed:>14.4f}" if math.isfinite(relaxed) else f" {'failed':>14s}")
            row += f" {'-' if not judged or not math.isfinite(relaxed) else f'{relaxed - ref:+.4f}':>13s}"
            row += f" {'-' if found is None else ('yes' if found else 'no'):>6s}"
        print(row + f" {r.seconds:>9.3f}")
    if args.out:
        write_structures(args.out, [r.atoms for r in results], n_template=len(problem.template),
                         calculator=problem.calculator["name"])
        print(f"wrote {len(results)} structures to {args.out}")
    print(f"total {time.perf_counter() - t0:.2f} s")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from asla.agents.agent import Agent, load_card_problem
    from asla.agents.explain import RULES, explain_build, step_png

    from .problem import load_problem
    from .storage import atomic_write_bytes, write_json
    if args.rule not in RULES:
        raise AslaError(f"--rule: must be one of {', '.join(RULES)}, got {args.rule!r}")
    if args.steps is not None and args.steps < 1:
        raise AslaError(f"--steps: must be a positive integer, got {args.steps}")
    if not (0.0 <= args.epsilon <= 1.0):
        raise AslaError(f"--epsilon: must be a probability in [0, 1], got {args.epsilon}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise AslaError(f"--out: {out} is a file; give a folder (made if missing)")
    _explain_run_without_agent(args.agent)
    agent = Agent.load(args.agent)
    problem = (load_problem(args.problem) if args.problem
               else load_card_problem(agent.card, args.agent, trust=args.trust_card))
    agent.check_compatible(problem)
    pictures, rows = [], []  # all made before anything is written: an error leaves no half-written folder
    for step in explain_build(agent, problem, args.steps, args.epsilon, args.seed, args.rule):
        e = step.explanation
        pictures.append((f"step_{step.index:03d}.png", step_png(step, problem)))
        rows.append({"step": step.index, "file": pictures[-1][0], "action": e.action,
                     "species": problem.species[e.species], "layer": e.layer, "point": e.point,
                     "i": e.point // problem.grid.nb, "j": e.point % problem.grid.nb, "q": e.q,
                     **e.shares(problem.n_species, problem.grid.n_layers)})
    for name, png in pictures:
        atomic_write_bytes(out / name, png)
    write_json(out / "steps.json", {"agent": str(args.agent), "problem": problem.name, "rule": args.rule,
                                    "epsilon": args.epsilon, "seed": args.seed, "steps": rows})
    print(f"agent {args.agent} on {problem.name} ({'greedy' if args.epsilon == 0 else f'epsilon {args.epsilon}'}), "
          f"LRP rule {args.rule}: {len(pictures)} step{'s' * (len(pictures) != 1)} explained")
    for r in rows:
        print(f"  step {r['step']:3d}: {r['species']:>2s} layer {r['layer']} (i, j) = ({r['i']}, {r['j']}), Q "
              f"{r['q']:.4f}; relevance placed {r['placed']:+.4f}, template {r['template']:+.4f}, bag "
              f"{r['bag']:+.4f}, unassigned {r['unassigned']:+.4f}")
    print(f"wrote {len(pictures)} picture{'s' * (len(pictures) != 1)} and steps.json to {out}")
    return 0


def _explain_run_without_agent(path: str) -> None:
    """A run directory whose first checkpoint is not written yet: say so, not 'no agent at'."""
    run = Path(path)
    if run.is_dir() and (run / "config.yaml").exists() and not (run / "agent.json").exists():
        import yaml
        every = (yaml.safe_load((run / "config.yaml").read_text()) or {}).get("checkpoint_every", "?")
        raise AslaError(f"{path}: this run has no agent yet; it is written at the first checkpoint (every {every} "
                        "episodes, checkpoint_every) and when the run ends")


def cmd_db(args: argparse.Namespace) -> int:
    from .storage import open_db
    path = Path(args.run_dir) / "evaluations.db" if Path(args.run_dir).is_dir() else Path(args.run_dir)
    if not path.exists():
        raise AslaError(f"run_dir: no evaluations database at {path}")
    db = open_db(path)
    rows = list(db.select(sort="energy"))
    from .storage import episode_base
    base = episode_base(path)
    print(f"{path}: {len(rows)} evaluated structures (episodes counted from {base}"
          + (", as written before asla counted them from 1)" if base == 0 else ")"))
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
