"""The benchmark's report: benchmarks.md (tables, overview, protocol), benchmarks.json (every record) and the
success-curve plots, made from the finished records only (asla.bench.records), so it can be remade any time.
"""
from __future__ import annotations

import collections
import importlib.metadata
import math
import os
import platform
import subprocess
from pathlib import Path

import numpy as np

from asla.basin import in_basin
from asla.bench.judge import STRICT_TOL, TOL
from asla.bench.methods import LABELS
from asla.bench.problems import DEFAULT_WINDOW, BenchProblem
from asla.bench.records import load_record, record_path
from asla.storage import atomic_write_text, write_json

PROTOCOL_SEEDS = 10  # seeds per (problem, method) the benchmark issue asks for
READ_AT = 300  # a second like-for-like reading, where a DFT search lives (the surrogate issue's 300 evaluations)


def success_curve(hits: list[float | None], xs: np.ndarray, n: int) -> np.ndarray:
    found = np.sort(np.array([h for h in hits if h is not None], dtype=float))
    return np.searchsorted(found, xs, side="right") / max(n, 1)


def to_success(hits: list[float | None], n: int, q: float) -> float | None:
    """Smallest x at which a fraction q of the n runs had found the minimum (None if never)."""
    found = sorted(h for h in hits if h is not None)
    need = math.ceil(q * n - 1e-9)
    return found[need - 1] if n and len(found) >= need else None


def versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("asla", "agox", "ase", "torch", "numpy", "scipy"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def machine() -> dict:
    model = platform.processor() or "unknown"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")),
                     model)
    except (OSError, subprocess.SubprocessError):
        pass
    mem = None
    try:
        kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
        mem = round(kb / 1024**2, 1)
    except (OSError, StopIteration, ValueError):
        pass
    return {"cpu": model, "logical_cpus": os.cpu_count(), "memory_gib": mem, "system": platform.platform()}


def make_report(out: Path, problems: list[BenchProblem], methods: list[str], seeds: list[int],
                skips: dict[tuple[str, str], str], results: Path) -> dict:
    """OUT/benchmarks.json, OUT/benchmarks.md and one plot per problem, from every finished record in RESULTS."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"commands": [], "versions": versions(), "machine": machine(), "tol": TOL, "problems": {}}
    for bp in problems:
        problem = bp.load()
        entry = {"reference_energy": problem.reference_energy, "reference_method": problem.reference.get("method"),
                 "reference_structure": problem.reference.get("structure"), "methods": {}}
        if not bp.shipped:
            entry["problem_file"] = bp.spec
        for method in methods:
            if (bp.slug, method) in skips:
                entry["methods"][method] = {"status": skips[(bp.slug, method)], "runs": []}
                continue
            runs = [r for s in seeds if (r := load_record(record_path(results, bp.slug, method, s)))]
            for r in runs:
                if r.get("command") and r["command"] not in report["commands"]:
                    report["commands"].append(r["command"])
            entry["methods"][method] = {"status": "done" if runs else "no finished runs", "runs": runs}
        report["problems"][bp.slug] = entry
        plot_problem(bp.slug, entry, out / f"benchmarks-{bp.slug}.png")
    write_json(out / "benchmarks.json", report)
    atomic_write_text(out / "benchmarks.md", markdown(report))
    return report


def summary_row(runs: list[dict], ref: float | None, within: int | None = None) -> dict:
    """A table row; `within`: the problem's smallest budget, where every method can be compared at equal evaluations."""
    n = len(runs)
    ev = [r["found_at_evaluations"] for r in runs]
    sec = [r["found_at_seconds"] for r in runs]
    # Until found (a run may stop there, --stop-when-found) or to the end of its budget: the same for every record.
    walls = [r["found_at_seconds"] if r["found_at_seconds"] is not None else r["wall_seconds"] for r in runs]
    rates = [r["wall_seconds"] / max(r["evaluations_spent"], 1) for r in runs]
    relaxed = [r["best_relaxed_energy"] for r in runs if r.get("best_relaxed_energy") is not None]
    # The window only bounds which improvements are relaxed; the final best is relaxed in every record, so this
    # count (found, or the final best in the basin, whatever its single-point energy) shows what the window missed.
    by_end = sum(r["found_at_evaluations"] is not None or in_basin(r.get("best_relaxed_energy"), ref, r.get("tol", TOL))
                 for r in runs)
    # Strict: the first hit's relaxed structure is the reference structure. A run without a hit is judged (not
    # found either way); a hit needs its relaxed structure, which records made before the criterion do not keep.
    judged = [r for r in runs if r["found_at_evaluations"] is None or r.get("first_hit_is_reference") is not None]
    return {"n": n, "found": sum(e is not None for e in ev), "found_by_end_any_window": by_end,
            "strict_judged": len(judged),
            "strict_found": sum(r.get("first_hit_is_reference") is True for r in judged),
            "found_within": sum(e is not None and e <= within for e in ev) if within is not None else None,
            "found_within_read_at": sum(e is not None and e <= READ_AT for e in ev),
            # runs that ended before READ_AT evaluations without a hit: not judged there
            "short_of_read_at": sum(r["budget"] < READ_AT and r["found_at_evaluations"] is None for r in runs),
            "budget": max((r["budget"] for r in runs), default=None),
            "evals_50": to_success(ev, n, 0.5), "evals_90": to_success(ev, n, 0.9),
            "seconds_50": to_success(sec, n, 0.5), "median_wall": float(np.median(walls)) if walls else None,
            "seconds_per_evaluation": float(np.median(rates)) if n else None,
            "median_best_relaxed_above_ref": (float(np.median(relaxed)) - ref) if relaxed and ref is not None else None}


def read_at_text(s: dict) -> str:
    """The cell of hits within READ_AT evaluations; runs whose budget ended before it without a hit are named."""
    short = s["short_of_read_at"]
    return f"{s['found_within_read_at']}/{s['n']}" + (
        f" ({short} run{'s' if short > 1 else ''} ended before {READ_AT} unfound)" if short else "")


def strict_text(s: dict) -> str:
    """The strict column's cell: runs whose first hit is the reference structure itself / runs; with hits not
    judged, the range the count lies in."""
    missing = s["n"] - s["strict_judged"]
    if not s["strict_judged"]:
        return "not judged"
    if not missing:
        return f"{s['strict_found']}/{s['n']}"
    return (f"{s['strict_found']}–{s['strict_found'] + missing}/{s['n']} ({missing} hit{'s' if missing > 1 else ''} "
            "not judged)")


def _fmt(x: float | None, digits: int = 0) -> str:
    if x is None:
        return "—"
    return f"{x:,.{digits}f}"


def markdown(report: dict) -> str:
    v, m = report["versions"], report["machine"]
    lines = ["# Benchmark: ASLA, a random builder and AGOX (RSS, basin hopping, GOFEE)", "",
             "Made by `scripts/benchmark.py`; raw results (every run, with its trace of best-energy improvements) in "
             "`benchmarks.json` beside this file.", "",
             "**Protocol.** Every method calls the problem's calculator through `asla.counting.CountingCalculator`: "
             "one evaluation is one geometry whose energy and/or forces were computed (single points and every "
             "local-relaxation step with the real calculator; a cached repeat costs nothing), and a run stops when "
             "its budget is spent, or, if run with `--stop-when-found` (`stopped_when_found` in `benchmarks.json`), "
             "at its first improvement that relaxes into the basin below (checked online, its time off the clock; "
             "a local relaxation's steps by its start and its end, so a hit only its later steps reach stops the "
             "run at its next improvement): a run adds only its first hit to the success curves, so they are the "
             "same either way; wall time per run is therefore reported until found, else to the end of the budget. "
             "A run has *found* the global minimum at the first improvement of its best energy "
             "whose structure, relaxed with the problem's calculator (template fixed; offline, not counted), ends "
             f"within {report['tol']} eV of the reference (the basin criterion, ASLA.md section 9; "
             "`asla.bench.judge`). "
             "To bound the offline cost, only improvements within a `window` of the reference are relaxed (stated "
             "per problem: 5 eV on the oxides, whose grid builds lie within a few eV of their relaxed basins; "
             "every improvement on the graphene sheets, whose grid builds lie 30-190 eV above theirs), and an "
             "uninterrupted descent (the "
             "steps of one relaxation that kept improving the best) is examined from its start only if its lowest "
             "point relaxes into the basin. Success curves: fraction of seeds that have found the minimum, against "
             "evaluations and against wall time per run. The final best of every run is relaxed whatever its energy; "
             "the column *found by the budget's end, any window* counts the runs that found the minimum or whose "
             "final best relaxes into the basin, so it shows what a window missed. The column *found within N "
             "evaluations* counts hits by the problem's smallest budget (GOFEE's), where every method's curve is "
             "defined: the like-for-like comparison at equal evaluations; *found within 300* is a second reading "
             "where a DFT search lives (runs whose budget ended before it without a hit are named in the cell). "
             "Each record keeps its trace's "
             "structures (`runs/benchmarks/<problem>/<method>-s<seed>-trace.extxyz`), so another window judges "
             "it again without running it.", "",
             "**Methods.** ASLA from scratch (the problem's recipe in `configs/`, trained until the budget; the Pd "
             "recipes relax 10 EMT steps before the reward, counted); ASLA transferred (5x5 fine-tuned from the 3x3 "
             "agent); a pretrained agent of another cell building zero-shot, no training (epsilon 0.1; 5x5 by the 3x3 "
             "agent, 3x3 by the 5x5 agent, 2x2 by the 3x3 agent); ASLA + surrogate, from scratch and transferred (the "
             "problem's surrogate recipe `configs/<name>-surrogate.yaml`: each finished build relaxed in a Gaussian "
             "process trained on the run's own real evaluations, the real single point of the relaxed structure the "
             "reward, so one real evaluation per episode, counted by the same counter; `docs/surrogate.md`); the "
             "random builder (uniformly random legal "
             "builds on the same grid, same rules, same evaluation as ASLA's recipe: the floor); AGOX random "
             "structure search with BFGS relaxation (fmax 0.05 eV/A, at most 100 steps), AGOX basin hopping (rattle "
             "of 25% of the atoms within 3 A, Metropolis at 0.25 eV, same relaxation) and AGOX GOFEE (global GPR on "
             "the fingerprint descriptor with a repulsive prior, 10 candidates per iteration relaxed in the LCB "
             "(kappa 2) surrogate, the chosen one evaluated as a single point plus one BFGS step: 2 evaluations per "
             "iteration), each from AGOX's own algorithm configuration with the template fixed and a confinement box "
             "over the build layers (0.5 A below the lowest, 1.0 A above the highest; a free sheet: +-0.5 A). "
             "GOFEE's candidate generation and surrogate relaxations run serially (AGOX runs them on Ray workers; "
             "its GPR keeps a one-CPU Ray pool). Details: `asla/bench/`; each run's exact AGOX "
             "configuration is in `benchmarks.json`.", "",
             "**Strict criterion.** The energy window alone can count a distinct arrangement as found (a held-back "
             "problem had one 0.017 eV above its minimum). The column *found, strict* counts the runs whose first "
             "hit, relaxed, is the reference structure itself (`docs/reference/`): every atom within "
             f"{STRICT_TOL} Å of its match in the reference after the best of the problem's symmetry operations (the "
             "grid's rotations and mirrors that map the template onto itself, and the translations between atoms), "
             "species matched by an optimal assignment; `asla.bench.judge.same_structure`. A run without a hit "
             "counts as judged, not found. A hit needs its relaxed structure: records whose trace keeps energies "
             "only are judged from a reproduction of the same run that reached the same first hit (same evaluation, "
             "same energy; `--strict-from`, named in the record's `strict_judged_from`), else their hits are "
             "*not judged*.", "",
             f"**Machine.** Runs made on {machines_text(all_runs(report))}; this report was made on {m['cpu']}, "
             f"{m['logical_cpus']} logical CPUs (about one core of real throughput), {m['memory_gib']} GiB; "
             f"{m['system']}. Wall times compare only within one machine: a row whose runs were made on more than "
             "one says so under its table.", "",
             "**Versions.** " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".", "",
             *commands_text(report)]
    lines += overview(report)
    for name, entry in report["problems"].items():
        ref = entry["reference_energy"]
        within = min((r["budget"] for data in entry["methods"].values() for r in data["runs"]), default=None)
        lines += [f"## {name}", "",
                  f"Reference minimum: {_fmt(ref, 4)} eV. How it was established: {entry['reference_method'] or '—'} "
                  f"(see `docs/reference-minima.md`).", "",
                  f"![success curves](benchmarks-{name}.png)", "",
                  "| method | budget (evaluations) | seeds | found | "
                  "found, strict: the first hit is the reference structure | "
                  "basin check window (records) | "
                  "found by the budget's end, any window | "
                  f"found within {_fmt(within)} evaluations (the smallest budget: all methods alike) | "
                  f"found within {READ_AT} evaluations | "
                  "evaluations to 50% | evaluations to 90% | "
                  "wall s to 50% | median wall s per run (until found, else the budget) | median s per evaluation | "
                  "median best relaxed − reference (eV) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for method, data in entry["methods"].items():
            if not data["runs"]:
                lines.append(f"| {LABELS[method]} | {data['status']} | | | | | | | | | | | | | |")
                continue
            s = summary_row(data["runs"], ref, within)
            lines.append(f"| {LABELS[method]} | {_fmt(s['budget'])} | {s['n']} | {s['found']}/{s['n']} | "
                         f"{strict_text(s)} | "
                         f"{window_text(data['runs'])} | {s['found_by_end_any_window']}/{s['n']} | "
                         f"{s['found_within']}/{s['n']} | {read_at_text(s)} | "
                         f"{_fmt(s['evals_50'])} | {_fmt(s['evals_90'])} | {_fmt(s['seconds_50'], 1)} | "
                         f"{_fmt(s['median_wall'], 1)} | {_fmt(s['seconds_per_evaluation'], 4)} | "
                         f"{_fmt(s['median_best_relaxed_above_ref'], 3)} |")
        mixed = [f"{LABELS[method]}: {machines_text(data['runs'])}" for method, data in entry["methods"].items()
                 if len(machine_counts(data["runs"])) > 1]
        if mixed:
            lines += ["", "Wall-time columns of rows whose runs were made on more than one machine: "
                      + "; ".join(mixed) + "."]
        stale = stale_reference_text(entry)
        if stale:
            lines += ["", stale]
        lines.append("")
    return "\n".join(lines)


def stale_reference_text(entry: dict) -> str:
    """A warning line for runs judged against another reference energy than the problem's current one (a reference
    that was lowered later): their verdicts are not this table's until judged again (`record_stands` does that when
    the trace's structures are there)."""
    ref = entry["reference_energy"]
    stale: dict[str, list[str]] = {}
    for method, data in entry["methods"].items():
        for run in data["runs"]:
            old = run.get("reference_energy")
            if ref is not None and old is not None and abs(old - ref) > 1e-6:
                stale.setdefault(LABELS[method], []).append(f"seed {run['seed']} ({old:.4f} eV)")
    if not stale:
        return ""
    return ("Judged against another reference energy than this one, so not comparable until judged again: "
            + "; ".join(f"{label}: {', '.join(runs)}" for label, runs in stale.items()) + ".")


def commands_text(report: dict) -> list[str]:
    """The one command that finishes (or extends) the protocol, then every command its records were made by: the
    records' own, in the order met, folded away since a report grown over many sessions has dozens."""
    problems = " ".join(report["problems"])
    lines = ["**Commands.** To finish the protocol on any machine (the runs of this report restored as records, only "
             "what is missing run, two at a time): `python scripts/benchmark.py --restore-from docs/benchmarks.json "
             f"--problems {problems} --seeds {PROTOCOL_SEEDS} --stop-when-found --jobs 2 --out docs`; to remake this "
             f"report from the records: `python scripts/benchmark.py --report-only --problems {problems} --seeds "
             f"{PROTOCOL_SEEDS} --out docs`.", ""]
    if report["commands"]:
        lines += [f"<details><summary>The {len(report['commands'])} commands that made the records (each record "
                  "names its own in benchmarks.json)</summary>", "",
                  *(f"- `{c}`" for c in report["commands"]), "", "</details>", ""]
    return lines


def all_runs(report: dict) -> list[dict]:
    return [r for e in report["problems"].values() for data in e["methods"].values() for r in data["runs"]]


def machine_counts(runs: list[dict]) -> dict[str, int]:
    """Records by the CPU they ran on: wall times from different machines are not comparable."""
    return dict(collections.Counter(r.get("machine") or "unknown" for r in runs))


def machines_text(runs: list[dict]) -> str:
    return ", ".join(f"{cpu} ({n} run{'' if n == 1 else 's'})" for cpu, n in machine_counts(runs).items()) or "—"


def window_counts(runs: list[dict]) -> dict[str, int]:
    """Records by the window their basin check used ("all": every improvement relaxed)."""
    counts: dict[str, int] = {}
    for r in runs:
        w = r.get("window", DEFAULT_WINDOW)
        key = "all" if w is None else f"≤{w:g} eV"
        counts[key] = counts.get(key, 0) + 1
    return counts


def window_text(runs: list[dict]) -> str:
    counts = window_counts(runs)
    return ", ".join(k if len(counts) == 1 else f"{k} ({n})" for k, n in counts.items())


def overview(report: dict) -> list[str]:
    """One line per problem: which method found the minimum in how many seeds, so gaps in the protocol show."""
    methods = list(dict.fromkeys(m for e in report["problems"].values() for m in e["methods"]))
    lines = ["## Overview", "",
             f"Seeds that found the global minimum / seeds run (the protocol asks for {PROTOCOL_SEEDS}; cells with "
             "fewer are short of it). Blank: not run; n/a: the method does not apply (see the problem's table); "
             "†: the row's records were judged with different basin-check windows (see the problem's table).", "",
             "| problem | " + " | ".join(LABELS[m] for m in methods) + " |", "|---|" + "---|" * len(methods)]
    for name, entry in report["problems"].items():
        cells = []
        for m in methods:
            data = entry["methods"].get(m, {"runs": [], "status": ""})
            found = sum(r["found_at_evaluations"] is not None for r in data["runs"])
            mixed = "†" if len(window_counts(data["runs"])) > 1 else ""
            cells.append(f"{found}/{len(data['runs'])}{mixed}" if data["runs"] else
                         "n/a" if data["status"].startswith("skipped") else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def plot_problem(name: str, entry: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_e, ax_t) = plt.subplots(1, 2, figsize=(11, 4.2))
    for n, (method, data) in enumerate(entry["methods"].items()):
        runs = data["runs"]
        if not runs:
            continue
        colour = f"C{n}"
        hits = [r["found_at_evaluations"] for r in runs]
        # found/seeds in the label: curves that never leave zero lie on top of one another
        label = f"{LABELS[method]} ({sum(h is not None for h in hits)}/{len(runs)} seeds)"
        budget = max(r["budget"] for r in runs)
        xs = np.linspace(0, budget, 1000)
        curve = success_curve(hits, xs, len(runs))
        ax_e.step(xs, curve, where="post", color=colour, label=label)
        ax_e.plot([budget], [curve[-1]], marker="|", markersize=12, color=colour)  # where its budget ends
        t_max = max(r["wall_seconds"] for r in runs)
        ts = np.geomspace(0.1, max(t_max, 0.2), 1000)
        ax_t.step(ts, success_curve([r["found_at_seconds"] for r in runs], ts, len(runs)), where="post",
                  color=colour, label=label)
    ax_e.set_xlabel("energy evaluations (single points + relaxation steps; | marks a budget's end)")
    ax_t.set_xlabel("wall time per run (s)")
    ax_t.set_xscale("log")
    for ax in (ax_e, ax_t):
        ax.set_ylabel("fraction of seeds at the global minimum")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    if ax_e.get_legend_handles_labels()[0]:
        ax_e.legend(fontsize=7, loc="best")
    fig.suptitle(f"{name}: reference {entry['reference_energy']} eV (basin criterion, {TOL} eV)")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
