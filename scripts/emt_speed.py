"""ASE's EMT vs asla's vectorised EMT: milliseconds per single point and per 10-step BFGS relaxation.

Both calculators (and asla's with the neighbour skin off) run side by side in one process, interleaved
call by call, so machine noise hits them alike; medians are reported with the speed-up ratios.
Single point = energy + forces. Cold = a new calculator each call (basin relaxations, new evaluators);
warm = one calculator, atoms moved by a 0.01 A Gaussian random walk between calls (relaxation steps).
Relaxation = asla's reward with relax.steps 10 (EnergyEvaluator: BFGS, template fixed) on random builds.
Usage:
    python scripts/emt_speed.py [--repeats 40] [--relaxations 20] [--out docs]
Writes docs/emt-speed.json (and prints the table docs/emt-speed.md shows).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
from ase import Atoms
from ase.build import fcc100
from ase.calculators.emt import EMT as AseEMT
from tqdm import tqdm

from asla import load_problem
from asla.builder import random_build
from asla.emt import EMT
from asla.reward import EnergyEvaluator
from asla.storage import write_json

VARIANTS: dict[str, Callable[[], object]] = {
    "ase": AseEMT,
    "asla": EMT,  # default skin 0.8 A
    "asla skin 0": lambda: EMT(skin=0.0),
}


def systems() -> dict[str, Atoms]:
    out = {}
    for name in ("pd100-oxide-3x3", "pd100-oxide-5x5"):
        out[name] = random_build(load_problem(name), np.random.default_rng(0)).atoms()
    slab = fcc100("Pd", (10, 10, 3), a=3.8787, vacuum=8.0)  # 300 atoms
    slab.rattle(0.05, seed=0)
    out["pd100-10x10x3 slab"] = slab
    return out


def single_points(atoms: Atoms, repeats: int) -> dict[str, dict[str, float]]:
    """Median ms per energy+forces, cold and warm, per variant (interleaved call by call)."""
    cold = {v: [] for v in VARIANTS}
    warm = {v: [] for v in VARIANTS}
    walkers = {}
    for v, make in VARIANTS.items():
        w = atoms.copy()
        w.calc = make()
        w.get_forces()
        walkers[v] = w
    rng = np.random.default_rng(0)
    for _ in range(repeats):
        step = rng.normal(0.0, 0.01, atoms.positions.shape)
        for v, make in VARIANTS.items():
            a = atoms.copy()
            t0 = time.perf_counter()
            a.calc = make()
            a.get_potential_energy()
            a.get_forces()
            cold[v].append(time.perf_counter() - t0)
            w = walkers[v]
            w.positions += step
            t0 = time.perf_counter()
            w.get_potential_energy()
            w.get_forces()
            warm[v].append(time.perf_counter() - t0)
    energies = [walkers[v].get_potential_energy() for v in VARIANTS]
    return {"cold_ms": {v: 1e3 * statistics.median(t) for v, t in cold.items()},
            "warm_ms": {v: 1e3 * statistics.median(t) for v, t in warm.items()},
            "max_abs_energy_difference_eV": float(max(energies) - min(energies))}


def relaxations(name: str, n: int) -> dict:
    """asla's reward with 10 BFGS steps, per structure: ASE's EMT vs asla's, same builds, interleaved.

    Per-structure times include BFGS itself (a 3N x 3N eigendecomposition per step) and the
    evaluator's copies, which no calculator can remove."""
    specs = {"ase": {"name": "ase.calculators.emt:EMT"}, "asla": {"name": "emt"},
             "asla skin 0": {"name": "emt", "skin": 0.0}}
    evaluators = {v: EnergyEvaluator(load_problem(name, relax={"steps": 10}, calculator=spec), use_cache=False)
                  for v, spec in specs.items()}
    p = evaluators["asla"].problem
    rng = np.random.default_rng(1)
    times = {v: [] for v in specs}
    worst = 0.0
    calls = 0
    for _ in tqdm(range(n), desc=f"relax {name}", leave=False):
        atoms = random_build(p, rng).atoms()
        energies = {}
        for v, ev in evaluators.items():
            t0 = time.perf_counter()
            result = ev.evaluate(atoms)
            times[v].append(time.perf_counter() - t0)
            energies[v] = result.energy
            calls += result.n_calls if v == "asla" else 0
        worst = max(worst, max(energies.values()) - min(energies.values()))
    return {"ms_per_relaxation": {v: 1e3 * statistics.median(t) for v, t in times.items()},
            "calculator_calls_per_relaxation": calls / n, "max_abs_energy_difference_eV": worst}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=40, help="interleaved calls per variant and system")
    ap.add_argument("--relaxations", type=int, default=20, help="random builds relaxed per calculator")
    ap.add_argument("--out", default="docs")
    args = ap.parse_args()

    rows = []
    for label, atoms in tqdm(systems().items(), desc="single points", leave=False):
        res = single_points(atoms, args.repeats)
        rows.append({"system": label, "atoms": len(atoms), **res})
    relax = relaxations("pd100-oxide-3x3", args.relaxations)

    print(f"{'system':20s} {'atoms':>5s} | {'cold ms: ase':>12s} {'asla':>6s} {'x':>5s} | "
          f"{'warm ms: ase':>12s} {'asla':>6s} {'x':>5s} {'skin 0':>7s} | {'max dE eV':>9s}")
    for r in rows:
        c, w = r["cold_ms"], r["warm_ms"]
        print(f"{r['system']:20s} {r['atoms']:5d} | {c['ase']:12.2f} {c['asla']:6.2f} {c['ase'] / c['asla']:5.1f} | "
              f"{w['ase']:12.2f} {w['asla']:6.2f} {w['ase'] / w['asla']:5.1f} {w['asla skin 0']:7.2f} | "
              f"{r['max_abs_energy_difference_eV']:9.1e}")
    m = relax["ms_per_relaxation"]
    print(f"10-step BFGS reward, pd100-oxide-3x3 ({relax['calculator_calls_per_relaxation']:.1f} calls): "
          f"ase {m['ase']:.1f} ms, asla {m['asla']:.1f} ms, x{m['ase'] / m['asla']:.1f} "
          f"(asla skin 0: {m['asla skin 0']:.1f} ms); "
          f"max dE {relax['max_abs_energy_difference_eV']:.1e} eV")
    out = {"command": f"python scripts/emt_speed.py --repeats {args.repeats} --relaxations {args.relaxations}",
           "machine": {"python": platform.python_version(), "processor": platform.processor() or platform.machine()},
           "single_points": rows, "relaxation_pd100_oxide_3x3": relax,
           "speedup": {**{f"{r['system']} cold": r["cold_ms"]["ase"] / r["cold_ms"]["asla"] for r in rows},
                       **{f"{r['system']} warm": r["warm_ms"]["ase"] / r["warm_ms"]["asla"] for r in rows},
                       "relaxation": m["ase"] / m["asla"]}}
    write_json(f"{args.out}/emt-speed.json", out)


if __name__ == "__main__":
    main()
