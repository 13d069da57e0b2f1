"""Random-policy rollouts of the Gymnasium environment, wrapper-free: steps/s and episodes/s per problem.

Measures the environment alone (masks, observations, step) and with the energy evaluation at the end,
side by side in one run. Usage:
    python scripts/env_throughput.py [--seconds 5] [--problems ...] [--out docs]
Writes docs/env-throughput.json and docs/env-throughput.md.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from asla import list_problems, load_problem
from asla.envs.build_env import AtomBuildEnv

SLOW = ("-dft",)  # a DFT evaluation takes tens of seconds: measured without evaluation only


def rollout(env: AtomBuildEnv, rng: np.random.Generator, seconds: float, evaluate: bool) -> tuple[float, float]:
    steps = episodes = 0
    if not evaluate:
        env.evaluator.evaluate = lambda atoms, key=None: _fake(atoms)  # type: ignore[method-assign]
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds or episodes == 0:
        obs, info = env.reset(seed=int(rng.integers(1 << 30)))
        done = False
        while not done:
            a = int(rng.choice(np.flatnonzero(info["action_mask"])))
            obs, r, term, trunc, info = env.step(a)
            steps += 1
            done = term or trunc
        episodes += 1
    dt = time.perf_counter() - t0
    return steps / dt, episodes / dt


def _fake(atoms):  # a zero-cost stand-in for the calculator
    from asla.reward import Evaluation
    return Evaluation(energy=0.0, ok=True, n_calls=0, seconds=0.0, atoms=atoms)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", nargs="+", default=list_problems())
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--out", default="docs")
    args = ap.parse_args()
    rows = []
    print(f"{'problem':20s} {'atoms':>5s} {'actions':>8s} {'env steps/s':>12s} {'env episodes/s':>15s} "
          f"{'+energy episodes/s':>19s}")
    for name in args.problems:
        p = load_problem(name)
        rng = np.random.default_rng(0)
        steps, eps = rollout(AtomBuildEnv(p), rng, args.seconds, evaluate=False)
        full = None if name.endswith(SLOW) else rollout(AtomBuildEnv(p), rng, args.seconds, evaluate=True)[1]
        rows.append({"problem": name, "atoms": p.n_atoms, "actions": int(AtomBuildEnv(p).action_space.n),
                     "steps_per_s": steps, "episodes_per_s": eps, "episodes_per_s_with_energy": full,
                     "calculator": p.calculator["name"]})
        print(f"{name:20s} {p.n_atoms:>5d} {rows[-1]['actions']:>8d} {steps:>12.0f} {eps:>15.1f} "
              f"{'-' if full is None else f'{full:.1f}':>19s}", flush=True)
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    meta = {"command": "python scripts/env_throughput.py --seconds " + str(args.seconds), "cpu": cpu,
            "python": platform.python_version()}
    (out / "env-throughput.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = ["# Environment throughput (random legal policy, no wrappers)", "", f"Command: `{meta['command']}`  ",
             f"Machine: {cpu}, 2 vCPUs; Python {meta['python']}. Each figure is a {args.seconds:g} s rollout.", "",
             "| problem | atoms placed | actions | env steps/s | env episodes/s | episodes/s with the energy "
             "| calculator |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        full = "-" if r["episodes_per_s_with_energy"] is None else f"{r['episodes_per_s_with_energy']:.1f}"
        lines.append(f"| {r['problem']} | {r['atoms']} | {r['actions']} | {r['steps_per_s']:.0f} | "
                     f"{r['episodes_per_s']:.1f} | {full} | {r['calculator']} |")
    lines += ["", "A step updates the legal-action masks with one distance evaluation over the grid and encodes the "
              "observation; the episode ends with the symmetry-canonical key (for the cache) and the calculator. "
              "DFT problems are measured without the energy (one GPAW evaluation of C24 takes 10-30 s here)."]
    (out / "env-throughput.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
