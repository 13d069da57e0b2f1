"""The benchmark's command line: `python scripts/benchmark.py ...` and `asla bench ...` call `main` here.

For each problem, method and seed: run the method with the problem's calculator counted (asla.bench.methods; the
run stops when its budget is spent, or with --stop-when-found at its first hit), then judge its trace of
best-energy improvements (asla.bench.judge: the basin criterion and the strict one; offline, not counted).

Each finished (problem, method, seed) is written at once to RESULTS/<slug>/<method>-s<seed>.json and skipped when
the command is run again with the same budget, so a crash or a kill loses at most the runs in progress. The report
(OUT/benchmarks.md, OUT/benchmarks.json, OUT/benchmarks-<slug>.png) is made from every finished record of the
requested problems, methods and seeds.

Usage:
    python scripts/benchmark.py --seeds 10                       # every shipped problem and method (hours)
    python scripts/benchmark.py --problems pd100-oxide-2x2 --methods rss bh gofee random --seeds 2 --budget 2000
    python scripts/benchmark.py --problems my/oxide.yaml --recipe my/recipe.yaml --zero-shot pd100-oxide-3x3 \\
        --methods asla random bh asla-zeroshot --seeds 3 --out my/bench --results my/bench/runs
    python scripts/benchmark.py --report-only                    # remake the report from finished records
    python scripts/benchmark.py --restore-from docs/benchmarks.json --seeds 10   # extend the committed report
    python scripts/benchmark.py --quick --out /tmp/b --results /tmp/b/runs   # each method briefly (a test)
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import multiprocessing
import os
import shutil
import sys
import tempfile
import traceback
from collections.abc import Iterator
from pathlib import Path

from asla.bench import methods as bm
from asla.bench.judge import TOL, FoundCheck, StrictCheck, resumable_relaxations, store_for
from asla.bench.problems import (
    DEFAULT_GOFEE_BUDGET,
    DEFAULT_SURROGATE_BUDGET,
    DEFAULT_WINDOW,
    GOFEE_BUDGET,
    PROBLEMS,
    SUITE,
    SURROGATE_BUDGET,
    SURROGATE_METHODS,
    WINDOW,
    BenchProblem,
    bench_problem,
    expand_suite,
)
from asla.bench.records import (
    adopt_first_hit_verdict,
    import_training_run,
    judgement,
    load_record,
    now,
    record_path,
    rejudge,
    restore_records,
    trace_path,
    window_json,
    write_trace,
)
from asla.bench.report import machine, make_report
from asla.errors import AslaError
from asla.lock import RunLockedError
from asla.problem import Problem
from asla.storage import write_json

QUICK = {"problems": ["pd100-oxide-2x2"], "seeds": 1, "budget": 60, "gofee_budget": 6, "surrogate_budget": 40}


def budget_for(args: argparse.Namespace, problem: BenchProblem, method: str) -> int:
    if method == "gofee":
        return args.gofee_budget or problem.budget(method)
    if method in SURROGATE_METHODS:
        return args.surrogate_budget or problem.budget(method)
    return args.budget or problem.budget(method)


def window_for(args: argparse.Namespace, problem: BenchProblem) -> float:
    return args.window if args.window is not None else problem.window()


def judge_store(args: argparse.Namespace, problem: BenchProblem, loaded: Problem) -> Path | None:
    """Where a DFT problem's judge relaxations are kept (beside its records, RESULTS/<problem>/judge), else None."""
    return store_for(loaded, Path(args.results) / problem.slug / "judge")


def run_one(args: argparse.Namespace, problem: BenchProblem, method: str, seed: int, budget: int) -> dict:
    """Run one (problem, method, seed) and judge it: the record."""
    loaded = problem.load()
    window = window_for(args, problem)
    base = {"problem": problem.slug, "method": method, "seed": seed, "budget": budget, "window": window_json(window),
            "tol": TOL, "reference_energy": loaded.reference_energy, "command": args.command, "jobs": args.jobs}
    if not problem.shipped:
        base["problem_file"] = problem.spec
    dest = record_path(Path(args.results), problem.slug, method, seed).with_suffix("")
    # A training run and an AGOX search work beside the record and keep their state there (checkpoints; AGOX's
    # database and the ledger), so a killed benchmark resumes them (a DFT GOFEE run outlasts a session); the
    # other methods run in minutes and work in a temporary directory.
    with contextlib.ExitStack() as stack:
        stack.enter_context(resumable_relaxations(judge_store(args, problem, loaded)))
        if bm.METHODS[method].resumable:
            work = Path(f"{dest}.work")
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(
                prefix=f"bench-{problem.slug}-{method}-s{seed}-")))
        try:
            strict = StrictCheck(loaded, problem.base) if args.stop_when_found == "strict" else None
            stop_when = FoundCheck(loaded, TOL, window, strict) if args.stop_when_found else None
            outcome = bm.run_method(method, problem, seed, budget, work, quick=args.quick,
                                    checkpoint_every=args.checkpoint_every, stop_when=stop_when)
        except bm.Skipped as skip:
            return {**base, "status": str(skip)}
        trained = work / "asla"
        if (trained / "agent.json").exists():  # keep the trained agent (half a MB) beside the record
            dest.parent.mkdir(parents=True, exist_ok=True)
            for suffix in (".json", ".safetensors"):
                shutil.copyfile(trained / f"agent{suffix}", f"{dest}-agent{suffix}")
    ledger = outcome.ledger
    trace = [row for row in ledger.trace if row["evaluations"] <= budget]  # judged within the budget only
    write_trace(trace_path(dest.with_suffix(".json")), trace)
    known = stop_when.relaxed if stop_when is not None else None  # the online check's relaxations, not redone
    structures = stop_when.structures if stop_when is not None else None
    return {**base, "status": "done", **judgement(problem, trace, window, known, structures),
            "evaluations_spent": ledger.count, "wall_seconds": outcome.wall_seconds,
            "best_energy": trace[-1]["energy"] if trace else None,
            "stopped_when_found": outcome.ledger.stopped,
            "stop_rule": args.stop_when_found, "settings": outcome.settings, "notes": outcome.notes,
            "trace": [[row["evaluations"], round(row["seconds"], 4), row["energy"]] for row in trace],
            "finished": now(), "machine": machine()["cpu"]}


def record_stands(args: argparse.Namespace, p: BenchProblem, m: str, s: int, label: str) -> bool:
    """Whether a finished record makes a run unnecessary: same budget and window, or another window (or no strict
    verdict yet) with trace structures to judge it again from (done here, in seconds)."""
    path = record_path(Path(args.results), p.slug, m, s)
    old = load_record(path)
    window = window_for(args, p)
    if not old or old.get("budget") != budget_for(args, p, m):
        return False
    same_window = old.get("window") == window_json(window)
    ref, old_ref = p.load().reference_energy, old.get("reference_energy")
    same_reference = ref is None or old_ref is None or abs(ref - old_ref) <= 1e-6
    if not trace_path(path).exists():
        return same_window  # a restored record keeps no structures: it stands as judged (the report flags another ref)
    if same_window and same_reference and "first_hit_is_reference" in old:
        return True
    with resumable_relaxations(judge_store(args, p, p.load())):
        rec = rejudge(p, old, path, window, args.command)
    write_json(path, rec)
    print(f"{label} {p.slug} {m} seed {s}: judged again with window {window} (was {old.get('window')}): found "
          f"{_hit(rec['found_at_evaluations'])} (was {_hit(old['found_at_evaluations'])}), strict "
          f"{_hit(rec['strict_found_at_evaluations'])}", flush=True)
    return True


def _hit(evaluations: int | None) -> str:
    return str(evaluations) if evaluations is not None else "no"


def attempt(args: argparse.Namespace, p: BenchProblem, m: str, s: int) -> tuple[dict | None, str | None]:
    """run_one, with a failure returned as its traceback text: a worker process's exception may not pickle.

    (None, None): not run here, as another benchmark command on the same results folder finished it since this one
    listed its runs, or holds it now (its run directory locked). Two commands may share a folder (one from seed 0,
    one --from-seed 5): each goes on to the next seed instead of redoing a finished one or failing on a held one."""
    label = f"{p.slug} {m} seed {s}"
    try:
        if record_stands(args, p, m, s, label):
            print(f"{label}: finished meanwhile by another benchmark command; its record is kept", flush=True)
            return None, None
        return run_one(args, p, m, s, budget_for(args, p, m)), None
    except RunLockedError as err:
        print(f"{label}: held by another benchmark command, left to it ({err})", flush=True)
        return None, None
    except Exception:  # noqa: BLE001 - the caller counts it and goes on with the other runs
        return None, traceback.format_exc()


Job = tuple[int, BenchProblem, str, int]


def run_jobs(args: argparse.Namespace, todo: list[Job],
             skips: dict[tuple[str, str], str]) -> Iterator[tuple[Job, dict | None, str | None]]:
    """The runs, as they finish: in this process one after another, or with --jobs N in N worker processes (a fresh
    one per run: AGOX starts its own Ray instance, torch keeps threads), so one command keeps every core busy.
    Each run writes only its own files, so parallel runs cannot clash; each record keeps --jobs, since its wall
    time depends on what ran beside it."""
    if args.jobs <= 1:
        for job in todo:
            if (job[1].slug, job[2]) not in skips:  # e.g. the transfer method without a source: its first seed says so
                yield job, *attempt(args, *job[1:])
        return
    context = multiprocessing.get_context("spawn")  # fork would copy torch's and Ray's threads half-made
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context, max_tasks_per_child=1) as pool:
        futures = {pool.submit(attempt, args, *job[1:]): job for job in todo}
        try:
            for future in concurrent.futures.as_completed(futures):
                try:
                    yield futures[future], *future.result()
                except concurrent.futures.process.BrokenProcessPool as err:  # a worker killed (e.g. out of memory)
                    yield futures[future], None, f"worker process died: {err}"
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def parser(prog: str = "benchmark.py") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="Benchmark: ASLA against a random builder and AGOX's RSS, "
                                 "basin hopping and GOFEE, all counted alike.")
    ap.add_argument("--problems", nargs="+", default=list(PROBLEMS),
                    help=f"shipped problem names or problem YAML paths, `suite` for the untuned suite "
                         f"({' '.join(SUITE)}) (default: {' '.join(PROBLEMS)})")
    ap.add_argument("--methods", nargs="+", default=list(bm.METHODS), help=f"default: {' '.join(bm.METHODS)}")
    ap.add_argument("--recipe", help="ASLA's recipe YAML for every problem (default: configs/<name>.yaml of a shipped "
                    "problem, else the default recipe derived from the problem: asla.agents.defaults)")
    ap.add_argument("--surrogate-recipe", help="the recipe of asla-surrogate and asla-transfer-surrogate for every "
                    "problem (default: configs/<name>-surrogate.yaml of a shipped problem; else those are skipped)")
    ap.add_argument("--zero-shot", metavar="AGENT", help="the pretrained agent (shipped name or path) asla-zeroshot "
                    "builds with on every problem (default: the shipped problems' pairs, e.g. pd100-oxide-3x3 on "
                    "the 2x2 cell)")
    ap.add_argument("--transfer-from", metavar="AGENT", help="the pretrained agent asla-transfer fine-tunes on every "
                    "problem (default: pd100-oxide-3x3 on pd100-oxide-5x5)")
    ap.add_argument("--seeds", type=int, help="seeds 0..N-1 per (problem, method) (default 10)")
    ap.add_argument("--from-seed", type=int, default=0,
                    help="run seeds FROM_SEED..N-1 only (two jobs on one row; the report still covers 0..N-1)")
    ap.add_argument("--budget", type=int, help="evaluations per run for every method but gofee and the surrogate "
                    "methods (default per problem: the committed report's, else 10000)")
    ap.add_argument("--surrogate-budget", type=int, help="real evaluations per run of the surrogate methods (default "
                    f"per problem: {SURROGATE_BUDGET}, else {DEFAULT_SURROGATE_BUDGET})")
    ap.add_argument("--gofee-budget", type=int, help=f"evaluations per GOFEE run (default per problem: {GOFEE_BUDGET}, "
                    f"else {DEFAULT_GOFEE_BUDGET})")
    ap.add_argument("--window", type=float,
                    help="relax only best-energy improvements within this many eV of the reference ('inf': all; "
                         f"default {DEFAULT_WINDOW}, per problem: {', '.join(f'{k} {v}' for k, v in WINDOW.items())}); "
                         "a finished record "
                         "judged with another window is judged again from its trace structures, not run again")
    ap.add_argument("--out", default="docs", help="where benchmarks.md, benchmarks.json and the plots go")
    ap.add_argument("--results", default="runs/benchmarks", help="one JSON per finished run (resume from these)")
    ap.add_argument("--quick", action="store_true",
                    help=f"each method briefly: {QUICK['problems']}, {QUICK['seeds']} seed, budget {QUICK['budget']} "
                         f"(GOFEE {QUICK['gofee_budget']}, the surrogate methods {QUICK['surrogate_budget']})")
    ap.add_argument("--checkpoint-every", type=int, default=bm.CHECKPOINT_EVERY,
                    help=f"episodes between an ASLA training run's checkpoints (default {bm.CHECKPOINT_EVERY}); "
                         "a killed benchmark resumes its training run from the last one")
    ap.add_argument("--stop-when-found", nargs="?", const="basin", choices=("basin", "strict"),
                    help="end each run at its first improvement that relaxes into the minimum's basin (checked on "
                         "the improvements within the window, a local relaxation's steps by its start and end; off "
                         "the clock): the success curves are the same, found runs cost less; `strict`: at its first "
                         "that relaxes into the reference structure itself (both criteria's curves stay the same)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="runs at a time, each in its own process (default 1); sets OMP_NUM_THREADS=1 unless set")
    ap.add_argument("--report-only", action="store_true", help="remake the report from finished runs; run nothing")
    ap.add_argument("--restore-from", metavar="BENCHMARKS_JSON",
                    help="first copy the finished runs of a report's benchmarks.json (e.g. docs/benchmarks.json) "
                         "into RESULTS where RESULTS has none, so a new machine extends the committed report")
    ap.add_argument("--strict-from", metavar="RESULTS",
                    help="give records whose trace keeps no structures the strict verdict on their first hit from "
                         "the records in RESULTS of the same runs that reached the same first hit (e.g. reproduced "
                         "with --stop-when-found)")
    ap.add_argument("--import-runs", nargs="+", default=[], metavar="METHOD=RUN_DIR_PATTERN",
                    help="judge ASLA training runs made elsewhere as this method's runs, e.g. "
                         "asla=runs/transfer/scratch-s{seed} (with one --problems); run nothing else")
    return ap


def main(argv: list[str] | None = None, prog: str = "python scripts/benchmark.py") -> int:
    ap = parser(prog.split()[-1] if prog.startswith("python ") else prog)
    args = ap.parse_args(argv)
    args.command = f"{prog} " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        return _main(ap, args)
    except AslaError as err:  # a bad problem, recipe or agent: one line naming the field, exit status 2
        print(f"{ap.prog}: error: {err}", file=sys.stderr)
        return 2


def _main(ap: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.quick:
        if args.problems == list(PROBLEMS):
            args.problems = QUICK["problems"]
        args.seeds = args.seeds or QUICK["seeds"]
        args.budget = args.budget or QUICK["budget"]
        args.gofee_budget = args.gofee_budget or QUICK["gofee_budget"]
        args.surrogate_budget = args.surrogate_budget or QUICK["surrogate_budget"]
    if args.jobs < 1:
        ap.error(f"--jobs: expected a number of runs at a time >= 1, got {args.jobs}")
    if args.jobs > 1:  # N runs with N threads each would fight over the cores
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    for m in args.methods:
        if m not in bm.METHODS:
            ap.error(f"--methods: unknown method {m!r}; allowed: {', '.join(bm.METHODS)}")
    args.problems = expand_suite(args.problems)
    problems = [bench_problem(p, args.recipe, args.transfer_from, args.zero_shot, args.surrogate_recipe)
                for p in args.problems]
    if len({p.slug for p in problems}) != len(problems):
        ap.error("--problems: a problem is given twice")
    seeds = list(range(args.seeds or 10))
    results = Path(args.results)
    if args.restore_from:
        print(f"restored {restore_records(Path(args.restore_from), results)} finished runs from {args.restore_from}",
              flush=True)
    if args.strict_from:
        adopted = adopt_strict(problems, args.methods, seeds, results, Path(args.strict_from))
        print(f"strict verdicts taken from {args.strict_from} for {adopted} records", flush=True)
    skips: dict[tuple[str, str], str] = {}
    for p in problems:  # a problem without a reference minimum cannot be judged: reported, not run
        if p.load().reference_energy is None:
            print(f"{p.slug}: no reference energy yet (scripts/reference_minima.py); its runs are skipped", flush=True)
            skips.update({(p.slug, m): "skipped: the problem has no reference energy yet" for m in args.methods})
    if args.import_runs:
        _import_runs(ap, args, problems, seeds, results)
        args.report_only = True
    failures = 0
    jobs = [(p, m, s) for p in problems for m in args.methods for s in seeds if s >= args.from_seed]
    todo = []
    for n, (p, m, s) in enumerate(jobs, 1):
        if args.report_only or (p.slug, m) in skips or record_stands(args, p, m, s, f"[{n}/{len(jobs)}]"):
            continue
        todo.append((n, p, m, s))
    for (n, p, m, s), rec, error in run_jobs(args, todo, skips):
        if rec is None and error is None:  # another command's run (attempt): nothing to write here
            continue
        if error is not None:  # one failed run must not lose the others; reported, exit status 1
            failures += 1
            print(f"[{n}/{len(jobs)}] {p.slug} {m} seed {s}: FAILED\n{error}", file=sys.stderr, flush=True)
            continue
        if rec["status"] != "done":
            skips[(p.slug, m)] = rec["status"]
            print(f"[{n}/{len(jobs)}] {p.slug} {m}: {rec['status']}", flush=True)
            continue
        path = record_path(results, p.slug, m, s)
        write_json(path, rec)
        shutil.rmtree(f"{path.with_suffix('')}.work", ignore_errors=True)  # a resumable run's state: done with
        print(f"[{n}/{len(jobs)}] {p.slug} {m} seed {s}: {rec['evaluations_spent']} evaluations in "
              f"{rec['wall_seconds']:.1f} s; best {rec['best_energy']:.4f} eV "
              f"(relaxed {rec['best_relaxed_energy']:.4f}, "
              f"reference {rec['reference_energy']:.4f}); found {_hit(rec['found_at_evaluations'])}, strict "
              f"{_hit(rec['strict_found_at_evaluations'])} (basin check {rec['basin_check']['seconds']:.1f} s)",
              flush=True)
    for p in problems:  # skip reasons for the report, also when every run was already finished
        for m in args.methods:
            if (p.slug, m) not in skips and not any(
                    record_path(results, p.slug, m, s).exists() for s in seeds):
                try:
                    bm.applicable(m, p)
                except bm.Skipped as skip:
                    skips[(p.slug, m)] = str(skip)
    make_report(Path(args.out), problems, args.methods, seeds, skips, results)
    print(f"wrote {Path(args.out) / 'benchmarks.md'} and benchmarks.json", flush=True)
    return 1 if failures else 0


def adopt_strict(problems: list[BenchProblem], methods: list[str], seeds: list[int], results: Path,
                 source: Path) -> int:
    """`--strict-from`: asla.bench.records.adopt_first_hit_verdict for every record of these runs."""
    adopted = 0
    for p in problems:
        for m in methods:
            for s in seeds:
                path = record_path(results, p.slug, m, s)
                record = load_record(path)
                other = load_record(record_path(source, p.slug, m, s))
                new = adopt_first_hit_verdict(record, other) if record else None
                if new is not None:
                    write_json(path, new)
                    adopted += 1
    return adopted


def _import_runs(ap: argparse.ArgumentParser, args: argparse.Namespace, problems: list[BenchProblem],
                 seeds: list[int], results: Path) -> None:
    if len(problems) != 1:
        ap.error("--import-runs: give exactly one problem with --problems")
    problem = problems[0]
    for item in args.import_runs:
        method, _, pattern = item.partition("=")
        if method not in bm.ASLA_METHODS or "{seed}" not in pattern:
            ap.error(f"--import-runs: expected METHOD=PATTERN with {{seed}}, METHOD one of "
                     f"{', '.join(bm.ASLA_METHODS)}; got {item!r}")
        for s in seeds:
            run_dir = Path(pattern.format(seed=s))
            if (run_dir / "summary.json").exists():
                with resumable_relaxations(judge_store(args, problem, problem.load())):
                    rec = import_training_run(problem, method, s, run_dir, results, window_for(args, problem),
                                              args.command, machine()["cpu"])
                write_json(record_path(results, problem.slug, method, s), rec)
                print(f"imported {run_dir} as {method} seed {s}: found {_hit(rec['found_at_evaluations'])}",
                      flush=True)
