"""Benchmark records: one JSON per finished (problem, method, seed), its trace's structures beside it, the
judgement written into it, and the records of a committed report restored onto a new machine.

A record is RESULTS/<slug>/<method>-s<seed>.json; its trace of best-energy improvements (with structures and the
energies the run saw) is <method>-s<seed>-trace.extxyz beside it, so another window or criterion judges the run
again without running it.
"""
from __future__ import annotations

import datetime
import json
import math
import os
from pathlib import Path

from asla.bench.judge import STRICT_TOL, TOL, StrictCheck, first_in_basin
from asla.bench.problems import BenchProblem
from asla.storage import write_json, write_structures


def window_json(window: float) -> float | None:
    """A record's window: null for "every improvement relaxed" (JSON has no infinity)."""
    return None if math.isinf(window) else window


def record_path(results: Path, slug: str, method: str, seed: int) -> Path:
    return Path(results) / slug / f"{method}-s{seed}.json"


def trace_path(record: Path) -> Path:
    """The structures of a record's trace, so it can be judged again (another window) without running again."""
    return record.with_name(f"{record.stem}-trace.extxyz")


def write_trace(path: Path, trace: list[dict]) -> None:
    from ase.calculators.singlepoint import SinglePointCalculator
    structures = []
    for row in trace:
        atoms = row["atoms"].copy()
        atoms.info.update(evaluations=int(row["evaluations"]), seconds=float(row["seconds"]))
        atoms.calc = SinglePointCalculator(atoms, energy=float(row["energy"]))  # the energy the run saw
        structures.append(atoms)
    write_structures(path, structures)


def read_trace(path: Path) -> list[dict]:
    from ase.io import read
    return [{"evaluations": int(a.info["evaluations"]), "seconds": float(a.info["seconds"]),
             "energy": float(a.get_potential_energy()), "atoms": a} for a in read(path, index=":", format="extxyz")]


def load_record(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def judgement(problem: BenchProblem, trace: list[dict], window: float, known: dict | None = None,
              known_structures: dict | None = None) -> dict:
    """The record's fields decided by asla.bench.judge on `trace`: the basin criterion and the strict one."""
    loaded = problem.load()
    check = first_in_basin(loaded, trace, tol=TOL, window=window, known=known,
                           strict=StrictCheck(loaded, problem.base), known_structures=known_structures)
    found, strict = check["found"], check["strict_found"]
    return {"window": window_json(window), "tol": TOL,
            "found_at_evaluations": found["evaluations"] if found else None,
            "found_at_seconds": found["seconds"] if found else None,
            "best_relaxed_energy": check.get("best_relaxed_energy"),
            "found_energy": found["energy"] if found else None,
            "found_relaxed_energy": found["relaxed_energy"] if found else None,
            "strict_judged": check["strict_judged"], "strict_tol": STRICT_TOL,
            "first_hit_is_reference": check["first_hit_is_reference"],
            "strict_found_at_evaluations": strict["evaluations"] if strict else None,
            "strict_found_at_seconds": strict["seconds"] if strict else None,
            "basin_check": {"relaxations": check["relaxations"], "reused_from_run": check["reused"],
                            "seconds": check["seconds"],
                            "relaxed": [[trace[i]["evaluations"], e if math.isfinite(e) else None]
                                        for i, e in sorted(check["relaxed"].items())]}}


def rejudge(problem: BenchProblem, record: dict, path: Path, window: float, command: str) -> dict:
    """A finished record judged again (another window, or the strict criterion it lacks) from its trace
    structures: nothing is run. Exact: a run stopped when found (by a narrower window) has the earliest hit of any
    window in its trace, too."""
    trace = read_trace(trace_path(path))
    return {**record, **judgement(problem, trace, window), "reference_energy": problem.load().reference_energy,
            "rejudged": now(), "rejudged_with": command}


def now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def restore_records(report_json: Path, results: Path) -> int:
    """Write the runs embedded in a report back as records (never over an existing one): the records in RESULTS
    are machine-local, the report is committed, and a benchmark extended elsewhere must not rerun hours of work."""
    from asla.errors import ConfigError
    try:
        report = json.loads(Path(report_json).read_text())
        runs = [run for problem in report["problems"].values() for method in problem["methods"].values()
                for run in method["runs"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ConfigError("--restore-from", f"{report_json} is not a benchmarks.json report ({err})") from None
    restored = 0
    for run in runs:
        path = record_path(results, run["problem"], run["method"], run["seed"])
        if not path.exists():
            write_json(path, run)
            restored += 1
    return restored


def adopt_first_hit_verdict(record: dict, other: dict | None) -> dict | None:
    """`record` with the strict verdict on its first hit taken from `other`, a run of the same problem, method and
    seed that reached the same first hit (same evaluation, same single-point energy: the same structure, as a
    seeded run is repeated exactly), e.g. a reproduction with --stop-when-found of a record whose trace keeps
    energies only. None where `other` does not qualify or `record` has a verdict already."""
    if record.get("strict_judged") or not other or not other.get("strict_judged"):
        return None
    if any(record.get(k) != other.get(k) for k in ("problem", "method", "seed", "found_at_evaluations")):
        return None
    hit = record.get("found_at_evaluations")
    if hit is None or other.get("first_hit_is_reference") is None or other.get("found_energy") is None \
            or abs(record["found_energy"] - other["found_energy"]) > 1e-9:
        return None  # (a run without a hit needs no strict verdict: it has not found the reference either)
    verdict = bool(other["first_hit_is_reference"])
    return {**record, "strict_judged": True, "strict_tol": other.get("strict_tol", STRICT_TOL),
            "first_hit_is_reference": verdict,
            "strict_found_at_evaluations": hit if verdict else None,
            "strict_found_at_seconds": record.get("found_at_seconds") if verdict else None,
            "strict_judged_from": f"a reproduction that reached the same first hit ({other.get('command')})"}


def import_training_run(problem: BenchProblem, method: str, seed: int, run_dir: Path, results: Path,
                        window: float, command: str, machine: str) -> dict:
    """The record of an ASLA training run made elsewhere (e.g. by scripts/transfer.py with the same recipe, seed and
    evaluation budget), judged here like every run: its best-energy improvements are the trace, the judgement
    the same. Evaluations are the trainer's count, which equals the counting calculator's (tests/test_counting.py);
    within one build the trainer records the relaxed energy after its last step, so a hit can be placed up to one
    relaxation (11 evaluations) later than a ledger would place it."""
    import yaml

    from asla.builder import atoms_from_actions
    summary = json.loads((run_dir / "summary.json").read_text())
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    if summary["problem"] not in (problem.spec, problem.slug):
        raise ValueError(f"--import-runs: {run_dir} trained {summary['problem']}, not {problem.spec}")
    loaded = problem.load()
    trace = [{"evaluations": h["evaluations"], "seconds": h["seconds"], "energy": h["energy"],
              "atoms": atoms_from_actions(loaded, h["actions"])} for h in summary["history"]]
    write_trace(trace_path(record_path(results, problem.slug, method, seed)), trace)
    return {"problem": problem.slug, "method": method, "seed": seed, "budget": cfg.get("max_evaluations"),
            "reference_energy": loaded.reference_energy, "command": command, "status": "done",
            **judgement(problem, trace, window),
            "evaluations_spent": summary["energy_evaluations"], "wall_seconds": summary["seconds"],
            "best_energy": summary["best_energy"],
            "settings": {"imported_from": os.path.relpath(run_dir.resolve()), "trained_with": cfg.get("command"),
                         "recipe_problem_overrides": cfg.get("problem_overrides"), "init_from": cfg.get("init_from")},
            "notes": ["imported training run (--import-runs)"],
            "trace": [[row["evaluations"], round(row["seconds"], 4), row["energy"]] for row in trace],
            "finished": now(), "machine": machine}
