"""Ship a trained agent as a pretrained one: agents/pretrained/NAME.{safetensors,json}.

The card gets what a user needs to trust it: the command that trained it (from the run), the training problem,
and its greedy build on that problem evaluated now: the single-point energy, the energy after relaxation with the
problem's calculator (template fixed) and whether that lies in the reference minimum's basin (within 0.05 eV).

Usage:
    python scripts/ship_agent.py runs/transfer/source pd100-oxide-3x3
    python scripts/ship_agent.py runs/benchmarks/graphene-c24-xtb/asla-s0-agent graphene-c24-xtb \
        --trained-with "asla train configs/graphene-c24-xtb.yaml --set seed=0 --set max_evaluations=2000 \\
            --set episodes=100000000"
"""
from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from asla import load_problem
from asla.agents.agent import PRETRAINED_DIR, Agent
from asla.basin import relaxed_energy


def ship(run_dir: str | Path, name: str, dest: Path = PRETRAINED_DIR, trained_with: str | None = None) -> dict:
    """Ship the run's final agent, or, when its greedy build misses the reference basin, the newest kept checkpoint
    whose greedy build lands in it (greedy builds fluctuate between checkpoints late in training)."""
    run_dir = Path(run_dir)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").exists() else {}
    candidates = [run_dir]
    if (run_dir / "checkpoints").is_dir():
        candidates += sorted((d for d in (run_dir / "checkpoints").glob("ckpt-*") if (d / "agent.json").exists()),
                             reverse=True)
    chosen = None
    for candidate in candidates:
        agent = Agent.load(candidate)
        problem = load_problem(agent.card["problem"])
        greedy = agent.build(problem, n=1)[0]
        relaxed = relaxed_energy(problem, greedy.atoms) if greedy.ok else float("nan")
        ref = problem.reference_energy
        in_basin = bool(ref is not None and relaxed <= ref + 0.05)
        if chosen is None or in_basin:
            chosen = (candidate, agent, greedy, relaxed, ref, in_basin)
        if in_basin:
            break
    candidate, agent, greedy, relaxed, ref, in_basin = chosen
    agent.save(dest / name, trained_with=trained_with or cfg.get("command") or agent.card.get("trained_with"),
               training_run={"episodes": agent.card.get("episodes"), "evaluations": agent.card.get("evaluations"),
                             "best_energy": agent.card.get("best_energy"), "seed": cfg.get("seed"),
                             "init_from": cfg.get("init_from"), "problem_overrides": cfg.get("problem_overrides"),
                             "weights": "final" if candidate == run_dir else f"checkpoint {candidate.name}"},
               greedy_build={"energy": greedy.energy, "relaxed_energy": relaxed, "reference_energy": ref,
                             "in_reference_basin": in_basin},
               usage=f"asla build {name}   # or Agent.load('{name}').build(problem, n=...)")
    return agent.card


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", help="a run directory (or an agent .json/.safetensors pair)")
    ap.add_argument("name", help="short name, e.g. pd100-oxide-3x3")
    ap.add_argument("--trained-with", help="the `asla train` command equivalent to how the agent was trained, "
                    "when it was trained elsewhere (e.g. inside scripts/benchmark.py)")
    args = ap.parse_args()
    card = ship(args.run_dir, args.name, trained_with=args.trained_with)
    g = card["greedy_build"]
    print(f"shipped {args.name}: greedy build {g['energy']:.4f} eV, relaxed {g['relaxed_energy']:.4f} eV, "
          f"reference {g['reference_energy']}, in the reference basin: {g['in_reference_basin']}")


if __name__ == "__main__":
    main()
