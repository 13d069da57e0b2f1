"""The benchmark (asla.bench, scripts/benchmark.py): every method runs, is counted within its budget, is judged by
the one definition of found, and reports."""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from ase.io import read

from asla import load_problem
from asla.bench import judge
from asla.bench import methods as bm
from asla.bench.judge import FoundCheck, first_in_basin, structure_key
from asla.bench.problems import BenchProblem, bench_problem
from asla.counting import Ledger

ROOT = Path(__file__).resolve().parents[1]
HANG = 600  # s: a guard against a hung subprocess, not a speed check (a shared machine can be several times slower)


def script(name: str) -> ModuleType:
    """A script of scripts/ loaded as a module from its file (nothing added to sys.path)."""
    spec = importlib.util.spec_from_file_location(f"asla_script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_basin_check_finds_the_reference_and_not_a_worse_structure():
    problem = load_problem("pd100-oxide-2x2")
    minimum = read(ROOT / "docs/reference/pd100-oxide-2x2.extxyz")
    worse = minimum.copy()
    worse.positions[-4:, 2] += 1.5  # the top Pd layer lifted off: relaxes elsewhere or back, judged by relaxing
    trace = [{"evaluations": 5, "seconds": 0.5, "energy": problem.reference_energy + 0.9, "atoms": worse},
             {"evaluations": 9, "seconds": 0.9, "energy": problem.reference_energy + 0.01, "atoms": minimum}]
    check = first_in_basin(problem, trace, window=5.0)
    assert check["found"] is not None
    assert check["found"]["evaluations"] in (5, 9)
    assert abs(check["found"]["relaxed_energy"] - problem.reference_energy) < 0.05
    far = first_in_basin(problem, trace[:1], window=0.5)  # outside the window: not relaxed, not found
    assert far["found"] is None and far["relaxations"] == 1  # only the final best, for best_relaxed_energy


def test_quick_benchmark_runs_every_method_within_budget_and_resumes(tmp_path):
    pytest.importorskip("agox")
    out, results = tmp_path / "docs", tmp_path / "runs"
    # two runs at a time, each in its own process, as the full benchmark runs on a 2-core machine
    cmd = [sys.executable, "scripts/benchmark.py", "--quick", "--jobs", "2",
           "--out", str(out), "--results", str(results)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=HANG)
    assert done.returncode == 0, done.stderr[-3000:]
    budgets = {"asla": 60, "asla-zeroshot": 60, "random": 60, "rss": 60, "bh": 60, "gofee": 6, "asla-surrogate": 40}
    records = {}
    for method, budget in budgets.items():
        path = results / "pd100-oxide-2x2" / f"{method}-s0.json"
        assert path.exists(), f"no record for {method}: {done.stdout[-2000:]}"
        rec = json.loads(path.read_text())
        records[method] = rec
        assert rec["budget"] == budget and rec["jobs"] == 2
        # a training run ends at the end of the batch that spends the budget (8 builds x 11 evaluations at most);
        # what it spends past the budget is counted but never judged
        slack = {"asla": 8 * 11, "asla-surrogate": 8}.get(method, 0)  # with the surrogate: one real point a build
        assert 0 < rec["evaluations_spent"] <= budget + slack
        assert rec["best_energy"] is not None and rec["best_relaxed_energy"] <= rec["best_energy"] + 1e-6
        assert rec["trace"] and rec["trace"][-1][0] <= min(rec["evaluations_spent"], budget)
        assert rec["found_at_evaluations"] is None or rec["found_at_evaluations"] <= budget
    assert records["gofee"]["settings"]["iterations"] >= 2
    surrogate = records["asla-surrogate"]["settings"]
    assert surrogate["recipe"] == "configs/pd100-oxide-2x2-surrogate.yaml" and surrogate["surrogate"]["enabled"]
    assert records["asla"]["settings"]["surrogate"]["enabled"] is False
    assert (results / "pd100-oxide-2x2" / "asla-s0-agent.safetensors").exists()  # the trained agent is kept
    md = (out / "benchmarks.md").read_text()
    for label in ("ASLA (scratch)", "ASLA + surrogate (scratch)", "random builder (floor)", "AGOX RSS",
                  "AGOX basin hopping", "AGOX GOFEE"):
        assert any(line.startswith(f"| {label}") for line in md.splitlines()), label
    assert records["asla-zeroshot"]["settings"]["agent"] == "pd100-oxide-3x3"  # an agent of another cell
    assert "skipped: no transfer source for pd100-oxide-2x2" in md
    assert "| ASLA + surrogate (transfer) | skipped: no transfer source" in md
    # the one command that finishes the protocol, then the commands the records were made by
    assert "--problems pd100-oxide-2x2 --seeds 10 --stop-when-found --jobs 2 --out docs`" in md
    assert "- `python scripts/benchmark.py --quick --jobs 2 --out" in md
    assert "agox 3." in md and (out / "benchmarks-pd100-oxide-2x2.png").stat().st_size > 10_000
    report = json.loads((out / "benchmarks.json").read_text())
    assert report["problems"]["pd100-oxide-2x2"]["reference_energy"] == load_problem("pd100-oxide-2x2").reference_energy

    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=HANG)  # resumes: runs nothing
    assert again.returncode == 0, again.stderr[-3000:]
    assert " seed 0:" not in again.stdout
    for method in budgets:
        rec = json.loads((results / "pd100-oxide-2x2" / f"{method}-s0.json").read_text())
        assert rec["finished"] == records[method]["finished"]

    # a new machine extends the committed report: its runs are restored as records, so nothing is rerun
    fresh = tmp_path / "fresh-runs"
    restored = subprocess.run(cmd[:-1] + [str(fresh), "--restore-from", str(out / "benchmarks.json")], cwd=ROOT,
                              capture_output=True, text=True, timeout=HANG)
    assert restored.returncode == 0, restored.stderr[-3000:]
    assert f"restored {len(budgets)} finished runs" in restored.stdout and " seed 0:" not in restored.stdout
    assert json.loads((fresh / "pd100-oxide-2x2" / "bh-s0.json").read_text()) == records["bh"]


def test_a_killed_asla_benchmark_run_resumes_from_its_checkpoint_with_the_same_trace(tmp_path):
    """kill -9 during training, run the same command again: the run goes on from its last checkpoint, counted and
    judged as if it had not been interrupted (same evaluations, same best energies at the same counts)."""
    import os
    import signal
    import time

    def cmd(results):
        return [sys.executable, "scripts/benchmark.py", "--quick", "--methods", "asla", "--budget", "300",
                "--checkpoint-every", "8", "--out", str(tmp_path / "out"), "--results", str(results)]

    whole = subprocess.run(cmd(tmp_path / "whole"), cwd=ROOT, capture_output=True, text=True, timeout=HANG)
    assert whole.returncode == 0, whole.stderr[-3000:]
    work = tmp_path / "cut" / "pd100-oxide-2x2" / "asla-s0.work" / "asla" / "checkpoints"
    proc = subprocess.Popen(cmd(tmp_path / "cut"), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not list(work.glob("ckpt-00000016/ledger.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "cut" / "pd100-oxide-2x2" / "asla-s0.json").exists()
    again = subprocess.run(cmd(tmp_path / "cut"), cwd=ROOT, capture_output=True, text=True, timeout=HANG)
    assert again.returncode == 0, again.stderr[-3000:]
    a = json.loads((tmp_path / "whole" / "pd100-oxide-2x2" / "asla-s0.json").read_text())
    b = json.loads((tmp_path / "cut" / "pd100-oxide-2x2" / "asla-s0.json").read_text())
    assert any(note.startswith("resumed from its checkpoint") for note in b["notes"])
    assert b["evaluations_spent"] == a["evaluations_spent"]
    assert [(e, round(en, 6)) for e, _, en in b["trace"]] == [(e, round(en, 6)) for e, _, en in a["trace"]]
    assert [t for _, t, _ in b["trace"]] == sorted(t for _, t, _ in b["trace"])  # the clock went on, not restarted
    assert not (tmp_path / "cut" / "pd100-oxide-2x2" / "asla-s0.work").exists()  # checkpoints gone with the record


class Killed(BaseException):
    """A kill in the middle of a run (a BaseException, as a signal: AGOX and the benchmark catch Exception)."""


def test_a_killed_gofee_benchmark_run_resumes_from_its_database_counting_each_evaluation_once(tmp_path, monkeypatch):
    """Killed in the middle of an iteration (one evaluation after the last saved state), run again: the run goes on
    from its work dir's saved state, so it spends only the rest of its budget, keeps the improvements found before
    the kill, and its record says it was resumed."""
    pytest.importorskip("agox")
    from asla.bench import agox, command
    from asla.counting import Ledger

    monkeypatch.setattr(agox, "SAVE_EVERY_S", 0.0)  # the state after every iteration (EMT iterations take a second)

    monkeypatch.chdir(tmp_path)  # paths relative to where the command runs, as the docs' commands give them
    results = Path("runs")
    argv = ["--quick", "--methods", "gofee", "--gofee-budget", "12", "--out", "out", "--results", str(results)]
    work, record = results / "pd100-oxide-2x2" / "gofee-s0.work", results / "pd100-oxide-2x2" / "gofee-s0.json"
    charge, session = Ledger.charge, {"resumed": False, "charged": 0}

    def charge_or_die(self):
        if not session["resumed"] and self.count == 7:  # the first session's 8th evaluation: killed before it
            raise Killed
        charge(self)
        session["charged"] += session["resumed"]

    monkeypatch.setattr(Ledger, "charge", charge_or_die)
    with pytest.raises(Killed):
        command.main(argv)
    assert not record.exists()
    saved = json.loads((work / "agox-state.json").read_text())
    assert saved["ledger"]["count"] == 6 and saved["iteration"] == 3  # GOFEE stores 2 evaluations an iteration
    before = [(row["evaluations"], round(row["energy"], 6)) for row in saved["ledger"]["trace"]]
    assert before
    # rows written after a saved state (a kill between AGOX's commit and the state's write) are dropped on a resume
    from agox.databases import Database

    from asla.bench.agox import _restore_database
    (db_file,) = work.glob("db-*.db")
    copy = Database(str(shutil.copyfile(db_file, tmp_path / "copy.db")))
    assert len(copy.get_all_structures_data()) == saved["rows"] == 6
    _restore_database(copy, {"rows": 4, "iteration": 2})
    assert len(copy) == len(copy.get_all_structures_data()) == 4
    assert max(copy.read_all_key_value_pairs()) == 4

    session["resumed"] = True  # from here on every evaluation charged is counted
    assert command.main(argv) == 0
    rec = json.loads(record.read_text())
    assert session["charged"] == 12 - 6  # only what was left of the budget: the 7th evaluation redone, none twice
    assert rec["evaluations_spent"] == 12 and rec["trace"][-1][0] <= 12
    assert [(e, round(en, 6)) for e, _, en in rec["trace"][:len(before)]] == before
    assert [t for _, t, _ in rec["trace"]] == sorted(t for _, t, _ in rec["trace"])  # the clock went on
    assert rec["wall_seconds"] >= saved["ledger"]["seconds"]
    assert any(note.startswith("resumed from its work dir at 6 evaluations") for note in rec["notes"])
    assert rec["settings"]["iterations"] > saved["iteration"]  # AGOX's iterations went on from the saved one
    assert not work.exists()  # the work dir goes once the record is written


def test_an_agox_run_killed_after_its_budget_was_spent_is_not_searched_again(tmp_path, monkeypatch):
    """Killed while judging (after the search spent its budget, before the record): run again, it searches nothing
    and has the same count and trace."""
    pytest.importorskip("agox")
    from asla.counting import Ledger

    problem = bench_problem("pd100-oxide-2x2")
    first = bm.run_method("bh", problem, seed=0, budget=30, work_dir=tmp_path)
    assert json.loads((tmp_path / "agox-state.json").read_text())["finished"]
    charge, charged = Ledger.charge, []
    monkeypatch.setattr(Ledger, "charge", lambda self: (charged.append(1), charge(self)))
    again = bm.run_method("bh", problem, seed=0, budget=30, work_dir=tmp_path)
    assert not charged and again.ledger.count == first.ledger.count == 30
    assert [(r["evaluations"], r["energy"]) for r in again.ledger.trace] == \
        [(r["evaluations"], r["energy"]) for r in first.ledger.trace]
    assert again.notes[0].startswith("resumed from its work dir at 30 evaluations")
    assert again.settings["iterations"] == first.settings["iterations"]


def test_a_run_stopped_when_found_has_the_same_first_hit_as_the_run_to_its_budget(tmp_path):
    problem = load_problem("pd100-oxide-2x2")
    judged = {}
    for stop in (False, True):
        check = FoundCheck(problem) if stop else None
        outcome = bm.run_method("asla-zeroshot", bench_problem("pd100-oxide-2x2"), seed=1, budget=400,
                                work_dir=tmp_path / str(stop),
                                stop_when=check)
        found = first_in_basin(problem, outcome.ledger.trace)["found"]
        assert found is not None
        judged[stop] = (found["evaluations"], outcome.ledger.count, outcome.ledger.stopped)
    # The offline judgement reuses the online check's relaxations: the same verdict, the hit's relaxation not redone.
    reusing = first_in_basin(problem, outcome.ledger.trace, known=check.relaxed)
    assert reusing["found"] == found
    # Online every improvement within the window was relaxed, and the stop made the hit the final best: none anew.
    assert reusing["reused"] == reusing["relaxations"] >= 1
    assert judged[True][0] == judged[False][0]  # the same first hit: the success curve does not change
    assert judged[False][1:] == (400, False)
    assert judged[True][1] == judged[True][0] and judged[True][2]  # and nothing spent after it


def test_online_check_relaxes_a_descent_by_its_start_and_its_end_and_the_offline_verdict_agrees(monkeypatch):
    problem = load_problem("pd100-oxide-2x2")
    ref = problem.reference_energy
    base = read(ROOT / "docs/reference/pd100-oxide-2x2.extxyz")
    start = base.copy()
    start.positions[:, 2] += 2.0  # a new structure; then three steps of its local relaxation, 0.1 A each
    steps = [start.copy() for _ in range(3)]
    for k, atoms in enumerate(steps):
        atoms.positions[:, 2] -= 0.1 * (k + 1)
    elsewhere = base.copy()
    elsewhere.positions[:, 0] += 1.0
    in_basin_key = structure_key(steps[-1])  # only the descent's end relaxes into the basin
    relaxed = []

    def fake_relax(problem, atoms):
        relaxed.append(structure_key(atoms))
        done = atoms.copy()
        done.info["relaxed_energy"] = ref if relaxed[-1] == in_basin_key else ref + 1.0
        return done

    monkeypatch.setattr(judge, "relax", fake_relax)
    check = FoundCheck(problem, window=5.0)
    sequence = [start, *steps]
    assert [check(a, ref + 1.0 - 0.1 * k) for k, a in enumerate(sequence)] == [False] * 4
    assert relaxed == [structure_key(start)]  # the start at once, the steps not yet
    assert check(elsewhere, ref + 0.5)  # the descent ended: its lowest point is in the basin, the run stops here
    assert relaxed == [structure_key(start), in_basin_key]
    # Offline the same trace gives the first hit in that descent, the online relaxations reused.
    trace = [{"evaluations": 10 + k, "seconds": 0.1 * k, "energy": ref + 1.0 - 0.1 * k, "atoms": a}
             for k, a in enumerate(sequence)]
    trace.append({"evaluations": 20, "seconds": 2.0, "energy": ref + 0.5, "atoms": elsewhere})
    verdict = first_in_basin(problem, trace, window=5.0, known=check.relaxed)
    assert verdict["found"]["evaluations"] == 13
    assert verdict["reused"] == 2


def test_profile_of_a_run_names_where_its_time_goes_and_writes_nothing_but_its_profile(tmp_path, monkeypatch):
    profile_method = script("profile_method")

    cwd, out = tmp_path / "cwd", tmp_path / "out"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # a run directory or record written relative to the working directory would land here
    assert profile_method.main(["--method", "random", "--problem", "pd100-oxide-2x2", "--budget", "40",
                                "--top", "15", "--out", str(out)]) == 0
    prof = json.loads((out / "profile.json").read_text())
    assert prof["evaluations"] == 40 and prof["wall_seconds"] > 0
    top = prof["top"]
    assert len(top) == 15 and top[0]["cumulative_seconds"] >= top[-1]["cumulative_seconds"]
    assert any("run_method" in r["function"] for r in top)  # the run itself is listed
    assert any(r["function"].startswith("calculator.py") for r in top)  # and the calculator's share
    assert (out / "profile.prof").stat().st_size > 0
    assert sorted(p.name for p in out.iterdir()) == ["profile.json", "profile.prof"]
    assert not any(cwd.iterdir())


def test_summary_counts_a_final_best_in_the_basin_that_the_window_skipped():
    """A run whose grid-built best lay outside the window is not found on the curve, but its final best, relaxed in
    every record, lands in the basin: the table's by-the-end column counts it, and only it."""
    from asla.bench import report as benchmark
    ref = -10.0
    run = {"budget": 100, "tol": 0.05, "evaluations_spent": 100, "wall_seconds": 50.0}
    runs = [{**run, "found_at_evaluations": 40, "found_at_seconds": 20.0, "best_relaxed_energy": ref},
            {**run, "found_at_evaluations": None, "found_at_seconds": None, "best_relaxed_energy": ref - 0.3},
            {**run, "found_at_evaluations": None, "found_at_seconds": None, "best_relaxed_energy": ref + 0.06},
            {**run, "found_at_evaluations": None, "found_at_seconds": None, "best_relaxed_energy": None}]
    s = benchmark.summary_row(runs, ref)
    assert (s["n"], s["found"], s["found_by_end_any_window"]) == (4, 1, 2)
    assert benchmark.summary_row(runs, None)["found_by_end_any_window"] == 1  # no reference: only a real hit
    # at equal evaluations (the smallest budget of the problem's methods): only hits by then count
    assert [benchmark.summary_row(runs, ref, w)["found_within"] for w in (39, 40)] == [0, 1]
    assert s["found_within"] is None


def test_a_record_judged_with_another_window_is_judged_from_its_trace_as_a_new_run_would_be(tmp_path):
    """Records keep their trace structures: a new window judges them again without running, with the same result
    as a run judged with that window from the start."""
    def cmd(results, window):
        return [sys.executable, "scripts/benchmark.py", "--quick", "--methods", "random", "--budget", "120",
                "--window", window, "--out", str(tmp_path / "out"), "--results", str(results)]

    narrow = subprocess.run(cmd(tmp_path / "a", "-100"), cwd=ROOT, capture_output=True, text=True, timeout=HANG)
    assert narrow.returncode == 0, narrow.stderr[-3000:]
    path = tmp_path / "a" / "pd100-oxide-2x2" / "random-s0.json"
    first = json.loads(path.read_text())
    trace = read(path.with_name("random-s0-trace.extxyz"), index=":")
    saw = [[e, en] for e, _, en in first["trace"]]
    assert [[a.info["evaluations"], a.get_potential_energy()] for a in trace] == saw
    assert first["window"] == -100 and first["basin_check"]["relaxations"] == 1  # only the final best

    again = subprocess.run(cmd(tmp_path / "a", "inf"), cwd=ROOT, capture_output=True, text=True, timeout=HANG)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "judged again with window inf" in again.stdout
    rejudged = json.loads(path.read_text())
    assert rejudged["window"] is None and rejudged["finished"] == first["finished"]  # not run again
    assert rejudged["basin_check"]["relaxations"] > 1

    fresh = subprocess.run(cmd(tmp_path / "b", "inf"), cwd=ROOT, capture_output=True, text=True, timeout=HANG)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    direct = json.loads((tmp_path / "b" / "pd100-oxide-2x2" / "random-s0.json").read_text())
    assert [r[::2] for r in direct["trace"]] == [r[::2] for r in first["trace"]]  # same builds (the clock differs)
    for key in ("found_at_evaluations", "found_energy", "window"):
        assert rejudged[key] == direct[key], key
    assert [e for e, _ in rejudged["basin_check"]["relaxed"]] == [e for e, _ in direct["basin_check"]["relaxed"]]
    assert rejudged["best_relaxed_energy"] == pytest.approx(direct["best_relaxed_energy"], abs=1e-6)


def test_basin_odds_relaxes_random_builds_and_none_lands_below_the_reference(tmp_path):
    basin_odds = script("basin_odds")
    assert basin_odds.wilson(0, 20)[0] == 0.0 < basin_odds.wilson(0, 20)[1] < 0.2  # no hit still bounds the odds
    lo, hi = basin_odds.wilson(5, 10)
    assert lo < 0.5 < hi
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "basin_odds.py"), "--problem", "pd100-oxide-2x2",
                          "--builds", "4", "--builder", "random", "untrained-agent", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "basin-odds.json").read_text())["results"]
    assert [r["builder"] for r in results] == ["random", "untrained-agent"]
    for result in results:
        rows = result["rows"]
        assert result["relaxed"] == len(rows) == 4 and result["in_basin"] <= 4
        assert result["in_basin"] == sum(r["relaxed_above_reference"] <= result["tol"] for r in rows)
        # The reference is the global minimum: no relaxed build ends below it, and relaxing never raises the energy.
        assert all(r["relaxed_above_reference"] >= -result["tol"] for r in rows)
        assert all(r["relaxed_above_reference"] <= r["built_above_reference"] + 1e-6 for r in rows)
    # Different builders build differently: not the same structures under another name.
    built = [[r["built_above_reference"] for r in result["rows"]] for result in results]
    assert built[0] != built[1]
    report = (tmp_path / "basin-odds.md").read_text()
    assert "| pd100-oxide-2x2 | random | 4 |" in report and "| pd100-oxide-2x2 | untrained-agent | 4 |" in report
    # Extended to more builds in the same place, it relaxes only the new ones and keeps the other measurement.
    more = subprocess.run([sys.executable, str(ROOT / "scripts" / "basin_odds.py"), "--problem", "pd100-oxide-2x2",
                           "--builds", "6", "--builder", "random", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert more.returncode == 0, more.stderr[-3000:]
    extended = json.loads((tmp_path / "basin-odds.json").read_text())["results"]
    assert sorted(r["builder"] for r in extended) == ["random", "untrained-agent"]
    grown = next(r for r in extended if r["builder"] == "random")
    assert grown["relaxed"] == 6 and grown["reused_rows"] == 4 and grown["rows"][:4] == results[0]["rows"]


def test_report_names_the_machines_its_runs_were_made_on_and_flags_rows_that_mix_them():
    """Records restored from another machine keep its CPU: wall times across CPUs are not comparable, so say so."""
    from asla.bench import report as benchmark
    run = {"budget": 100, "tol": 0.05, "evaluations_spent": 100, "wall_seconds": 50.0, "window": 5.0,
           "found_at_evaluations": None, "found_at_seconds": None, "best_relaxed_energy": 1.0}
    report = {"tol": 0.05, "versions": {"asla": "0"}, "commands": [],
              "machine": {"cpu": "CPU C", "logical_cpus": 2, "memory_gib": 1.0, "system": "Linux"},
              "problems": {"p": {"reference_energy": 0.0, "reference_method": "m", "methods": {
                  "random": {"status": "done", "runs": [{**run, "machine": "CPU A"}, {**run, "machine": "CPU B"}]},
                  "bh": {"status": "done", "runs": [{**run, "machine": "CPU A"}, {**run}]}}}}}
    md = benchmark.markdown(report)
    assert "Runs made on CPU A (2 runs), CPU B (1 run), unknown (1 run); this report was made on CPU C" in md
    note = next(line for line in md.splitlines() if line.startswith("Wall-time columns"))
    assert "random builder (floor): CPU A (1 run), CPU B (1 run)" in note and "unknown (1 run)" in note
    report["problems"]["p"]["methods"]["random"]["runs"][1]["machine"] = "CPU A"
    report["problems"]["p"]["methods"]["bh"]["runs"][1]["machine"] = "CPU A"
    assert "Wall-time columns" not in benchmark.markdown(report)  # one machine: nothing to flag


def test_report_flags_runs_judged_against_another_reference_energy():
    """A reference lowered after its runs were judged (as the 5x5 oxide's was) leaves their verdicts stale: the table
    must say which runs, not present them as judged against the new value."""
    from asla.bench import report as benchmark
    run = {"budget": 100, "tol": 0.05, "evaluations_spent": 100, "wall_seconds": 50.0, "window": 5.0,
           "found_at_evaluations": None, "found_at_seconds": None, "best_relaxed_energy": 1.0, "machine": "CPU A",
           "reference_energy": 0.0}
    report = {"tol": 0.05, "versions": {"asla": "0"}, "commands": [],
              "machine": {"cpu": "CPU A", "logical_cpus": 2, "memory_gib": 1.0, "system": "Linux"},
              "problems": {"p": {"reference_energy": 0.0, "reference_method": "m", "methods": {
                  "random": {"status": "done", "runs": [{**run, "seed": 0}, {**run, "seed": 1}]}}}}}
    assert "another reference energy" not in benchmark.markdown(report)
    report["problems"]["p"]["methods"]["random"]["runs"][1]["reference_energy"] = 0.0087
    note = next(line for line in benchmark.markdown(report).splitlines() if "another reference energy" in line)
    assert "random builder (floor): seed 1 (0.0087 eV)" in note and "seed 0" not in note


def test_parallel_jobs_report_a_failed_run_and_still_finish_the_others(tmp_path):
    """--jobs runs each run in its own process: a failure there comes back as its traceback, not a lost batch."""
    import argparse

    from asla.bench import command as benchmark
    args = argparse.Namespace(results=str(tmp_path), quick=True, budget=20, gofee_budget=None, window=None,
                              checkpoint_every=10, stop_when_found=False, command="test", jobs=2)
    missing = BenchProblem(spec="no-such-problem", slug="no-such-problem", recipe=None, transfer_from=None,
                           zero_shot=None)
    todo = [(1, missing, "random", 0), (2, bench_problem("pd100-oxide-2x2"), "random", 0)]
    done = {job: (rec, error) for job, rec, error in benchmark.run_jobs(args, todo, {})}
    assert set(done) == set(todo)
    rec, error = done[todo[0]]
    assert rec is None and "no-such-problem" in error and "Traceback" in error
    rec, error = done[todo[1]]
    assert error is None and rec["status"] == "done" and rec["jobs"] == 2
    assert 0 < rec["evaluations_spent"] <= 20 and rec["trace"]


def test_a_run_another_command_finished_or_holds_meanwhile_is_left_to_it(tmp_path, capsys):
    """Two benchmark commands on one results folder (one from seed 0, one --from-seed 5) each list their runs at
    start: a run the other finished since is not redone (its record kept as it is), one it holds is not failed."""
    import argparse

    from asla.bench import command as benchmark
    from asla.lock import RunLock
    args = argparse.Namespace(results=str(tmp_path), quick=True, budget=20, gofee_budget=None, surrogate_budget=None,
                              window=None, checkpoint_every=10, stop_when_found=False, command="test", jobs=1)
    job = (1, bench_problem("pd100-oxide-2x2"), "random", 0)
    [(_, rec, error)] = list(benchmark.run_jobs(args, [job], {}))  # the other command's run, finished
    assert error is None and rec["status"] == "done"
    path = tmp_path / "pd100-oxide-2x2" / "random-s0.json"
    benchmark.write_json(path, rec)
    before = path.read_text()
    assert list(benchmark.run_jobs(args, [job], {})) == [(job, None, None)]  # this command's stale list
    assert path.read_text() == before
    assert "finished meanwhile by another benchmark command" in capsys.readouterr().out

    held = (2, bench_problem("pd100-oxide-2x2"), "asla", 0)  # a training run: its work dir is locked while it runs
    work = tmp_path / "pd100-oxide-2x2" / "asla-s0.work" / "asla"
    work.mkdir(parents=True)
    with RunLock(work):
        outcome = list(benchmark.run_jobs(args, [held], {}))
    assert outcome == [(held, None, None)] and not (tmp_path / "pd100-oxide-2x2" / "asla-s0.json").exists()
    assert "held by another benchmark command" in capsys.readouterr().out


def _problem_outside(tmp_path: Path) -> tuple[Path, Path]:
    """The 2x2 oxide as a user's own problem: its YAML, reference structure and recipe in a folder of their own."""
    folder = tmp_path / "my chemistry"
    folder.mkdir()
    text = (ROOT / "configs/problems/pd100-oxide-2x2.yaml").read_text()
    (folder / "oxide.yaml").write_text(text.replace("docs/reference/pd100-oxide-2x2.extxyz", "minimum.extxyz"))
    (folder / "minimum.extxyz").write_text((ROOT / "docs/reference/pd100-oxide-2x2.extxyz").read_text())
    recipe = (ROOT / "configs/pd100-oxide-2x2.yaml").read_text().replace("problem: pd100-oxide-2x2", "problem: x")
    (folder / "recipe.yaml").write_text(recipe)
    return folder / "oxide.yaml", folder / "recipe.yaml"


def test_benchmark_runs_on_a_problem_file_outside_the_repository_and_writes_nothing_into_it(tmp_path, monkeypatch):
    """A new chemistry as a user brings it: a YAML path, its own recipe, a shipped agent zero-shot; asla, random,
    basin hopping and the zero-shot agent run on it, records named by a slug, nothing written into the repo."""
    pytest.importorskip("agox")
    from asla.bench.command import main
    problem, recipe = _problem_outside(tmp_path)
    before = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=ROOT, capture_output=True,
                            text=True).stdout
    monkeypatch.chdir(tmp_path)
    out, results = tmp_path / "report", tmp_path / "runs"
    assert main(["--problems", str(problem), "--recipe", str(recipe), "--zero-shot", "pd100-oxide-3x3",
                 "--methods", "asla", "random", "bh", "asla-zeroshot", "--seeds", "1", "--budget", "40",
                 "--out", str(out), "--results", str(results)]) == 0
    slug = bench_problem(str(problem)).slug
    assert slug.startswith("oxide-") and " " not in slug and "/" not in slug
    for method in ("asla", "random", "bh", "asla-zeroshot"):
        rec = json.loads((results / slug / f"{method}-s0.json").read_text())
        assert rec["status"] == "done" and rec["problem"] == slug and rec["problem_file"] == str(problem)
        assert 0 < rec["evaluations_spent"] and rec["trace"] and rec["strict_judged"] is True
        assert rec["found_at_evaluations"] is None or rec["found_at_evaluations"] <= 40
        # strict implies the basin criterion, never earlier than its first hit
        strict, hit = rec["strict_found_at_evaluations"], rec["found_at_evaluations"]
        assert strict is None or (hit is not None and strict >= hit)
        assert (rec["first_hit_is_reference"] is None) == (hit is None)
    assert json.loads((results / slug / "asla-s0.json").read_text())["settings"]["recipe"] == str(recipe)
    assert json.loads((results / slug / "asla-zeroshot-s0.json").read_text())["settings"]["agent"] == "pd100-oxide-3x3"
    md = (out / "benchmarks.md").read_text()
    assert f"## {slug}" in md and (out / f"benchmarks-{slug}.png").exists()
    for label in ("ASLA (scratch)", "random builder (floor)", "AGOX basin hopping", "ASLA (pretrained, zero-shot)"):
        assert any(line.startswith(f"| {label} | 40 | 1 |") for line in md.splitlines()), label
    after = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=ROOT, capture_output=True,
                           text=True).stdout
    assert after == before


def test_bad_benchmark_input_is_one_line_naming_the_option(tmp_path, capsys):
    from asla.bench.command import main
    for argv, field in ((["--problems", "no-such-problem"], "problem: unknown problem 'no-such-problem'"),
                        (["--problems", str(tmp_path / "none.yaml")], "does not exist"),
                        (["--problems", "pd100-oxide-2x2", "--recipe", str(tmp_path / "r.yaml")], "--recipe: file")):
        assert main([*argv, "--report-only", "--out", str(tmp_path / "out"), "--results",
                     str(tmp_path / "runs")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and field in err[0] and err[0].startswith("scripts/benchmark.py: error: ")
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


def test_every_script_and_the_report_judge_by_the_one_definition_of_found(monkeypatch):
    """One relaxation, one criterion: the benchmark's records, its online check, the training-run scripts'
    first_found and basin_odds all go through asla.bench.judge (replaced here, so each one's verdict follows it)."""
    import asla.basin
    from asla.bench.problems import bench_problem
    from asla.bench.records import judgement
    assert not hasattr(asla.basin, "first_found")  # the second definition is gone
    for name in ("transfer", "learning_curves", "judge_surrogate_run"):
        assert script(name).first_found is judge.first_found
    assert script("basin_odds").relax is judge.relax and script("basin_odds").TOL == judge.TOL
    problem = load_problem("pd100-oxide-2x2")
    ref = problem.reference_energy
    minimum = read(ROOT / "docs/reference/pd100-oxide-2x2.extxyz")
    calls = []

    def fake_relax(problem, atoms):  # every verdict is "in the basin", at ref + 0.01
        calls.append(len(atoms))
        done = minimum.copy()
        done.info["relaxed_energy"] = ref + 0.01
        return done

    monkeypatch.setattr(judge, "relax", fake_relax)
    far = minimum.copy()
    far.positions[-1, 2] += 3.0  # would never relax into the basin with EMT
    trace = [{"evaluations": 7, "seconds": 0.1, "energy": ref + 2.0, "atoms": far}]
    rec = judgement(bench_problem("pd100-oxide-2x2"), trace, window=5.0)
    assert rec["found_at_evaluations"] == 7 and rec["strict_found_at_evaluations"] == 7 and calls
    assert FoundCheck(problem)(far, ref + 2.0)
    history = [{"energy": ref + 2.0, "evaluations": 7, "actions": []}]
    monkeypatch.setattr("asla.builder.atoms_from_actions", lambda p, actions: far)
    assert judge.first_found(problem, history, window=5.0)["relaxed_energy"] == ref + 0.01


def test_strict_criterion_tells_a_distinct_arrangement_inside_the_energy_window_from_the_reference(monkeypatch):
    """The basin criterion counts anything that relaxes within 0.05 eV; the strict one only the reference
    structure, up to the problem's symmetry. A distinct arrangement 0.017 eV above is found by the first only."""
    problem = load_problem("pd100-oxide-2x2")
    ref = problem.reference_energy
    minimum = read(ROOT / "docs/reference/pd100-oxide-2x2.extxyz")
    n_t = len(problem.template)
    # The reference's symmetric images are the same structure: a rotation of the whole slab by 90 degrees about the
    # origin (a symmetry of the square Pd(100) cell), a shift by one surface repeat, and a relaxation's jitter.
    image = minimum.copy()
    image.positions = minimum.positions @ np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]]).T
    image.positions[:, :2] += minimum.cell[0, :2] / 2
    jitter = minimum.copy()
    jitter.positions[n_t:] += np.random.default_rng(0).normal(0, 0.03, (len(minimum) - n_t, 3))
    assert judge.same_structure(problem, image, minimum) and judge.same_structure(problem, jitter, minimum)
    # A distinct arrangement: one O moved from its top site to a neighbouring bridge site (half a surface repeat).
    distinct = minimum.copy()
    o = [i for i in range(n_t, len(minimum)) if minimum[i].symbol == "O"][0]
    distinct.positions[o, 0] += minimum.cell[0, 0] / 4
    assert not judge.same_structure(problem, distinct, minimum)

    def fake_relax(problem, atoms):  # the trace's rows relax to themselves
        done = atoms.copy()
        done.info["relaxed_energy"] = ref + (0.017 if atoms is distinct else 0.0)
        return done

    monkeypatch.setattr(judge, "relax", fake_relax)
    trace = [{"evaluations": 5, "seconds": 0.5, "energy": ref + 0.5, "atoms": distinct},
             {"evaluations": 30, "seconds": 3.0, "energy": ref + 0.2, "atoms": image}]
    check = first_in_basin(problem, trace, window=5.0, strict=judge.StrictCheck(problem))
    assert check["found"]["evaluations"] == 5  # the basin criterion: within 0.05 eV, found
    assert check["strict_judged"] and check["first_hit_is_reference"] is False  # strict: not the reference itself
    assert check["strict_found"]["evaluations"] == 30  # the reference's own structure came later
    only_distinct = first_in_basin(problem, trace[:1], window=5.0, strict=judge.StrictCheck(problem))
    assert only_distinct["found"] is not None and only_distinct["strict_found"] is None
    reference_first = first_in_basin(problem, trace[1:], window=5.0, strict=judge.StrictCheck(problem))
    assert reference_first["first_hit_is_reference"] is True
    # Online, `--stop-when-found strict` does not stop at the distinct arrangement, only at the reference itself.
    basin_stop, strict_stop = FoundCheck(problem), FoundCheck(problem, strict=judge.StrictCheck(problem))
    assert basin_stop(distinct, ref + 0.5) and not strict_stop(distinct, ref + 0.5)
    assert strict_stop(image, ref + 0.2)


def test_reference_minima_on_a_problem_file_writes_where_told_and_rewrites_the_yaml_only_when_asked(tmp_path):
    problem, _ = _problem_outside(tmp_path)
    original = problem.read_text()
    tiny = tmp_path / "tiny.yaml"  # Pd2O on Pd(100) with one build layer: the overlayer motif does not apply
    tiny.write_text((ROOT / "configs/problems/tiny-pd2o.yaml").read_text())

    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "scripts" / "reference_minima.py"), "--problems",
                               str(problem), str(tiny), "--minutes", "0.01", "--motif-top-k", "2", "--out",
                               str(tmp_path / "out"), *extra], cwd=tmp_path, capture_output=True, text=True,
                              timeout=HANG)

    done = run()
    assert done.returncode == 0, done.stderr[-3000:]
    oxide, small = bench_problem(str(problem)).slug, bench_problem(str(tiny)).slug
    assert f"{oxide}: motif search: Pd in all 4 hollow sites" in done.stdout
    refusal = next(line for line in done.stdout.splitlines() if line.startswith(f"{small}: motif search not"))
    assert "bag" in refusal  # one line, saying why; basin hopping ran all the same
    results = json.loads((tmp_path / "out" / "reference-minima.json").read_text())
    assert set(results) == {oxide, small} and (tmp_path / "out" / "reference" / f"{oxide}.extxyz").exists()
    assert problem.read_text() == original  # never rewritten unless asked
    assert load_problem("pd100-oxide-2x2").reference_energy == 2.4374  # nor the shipped problem
    (tmp_path / "out" / "reference-minima.json").unlink()
    asked = run("--update-yaml")
    assert asked.returncode == 0, asked.stderr[-3000:]
    updated = load_problem(str(problem))
    assert updated.reference_energy == pytest.approx(json.loads(
        (tmp_path / "out" / "reference-minima.json").read_text())[oxide]["energy"], abs=1e-6)
    assert Path(updated.reference["structure"]).exists()


def test_a_record_without_structures_takes_the_strict_verdict_only_from_a_run_with_the_same_first_hit():
    from asla.bench.records import adopt_first_hit_verdict
    record = {"problem": "p", "method": "random", "seed": 3, "budget": 100, "found_at_evaluations": 40,
              "found_at_seconds": 2.0, "found_energy": 1.25}
    again = {**record, "strict_judged": True, "strict_tol": 0.2, "first_hit_is_reference": False,
             "command": "python scripts/benchmark.py --stop-when-found"}
    adopted = adopt_first_hit_verdict(record, again)
    assert adopted["strict_judged"] and adopted["first_hit_is_reference"] is False
    assert "--stop-when-found" in adopted["strict_judged_from"] and adopted["strict_found_at_evaluations"] is None
    reference = adopt_first_hit_verdict(record, {**again, "first_hit_is_reference": True})
    assert reference["strict_found_at_evaluations"] == 40
    for other in ({**again, "found_energy": 1.26}, {**again, "found_at_evaluations": 41}, {**again, "seed": 4},
                  {**again, "strict_judged": False}, None):
        assert adopt_first_hit_verdict(record, other) is None  # not the same hit: nothing taken
    assert adopt_first_hit_verdict(adopted, again) is None  # a verdict already there is kept


def test_a_run_resumed_with_a_stop_rule_asks_it_of_the_improvements_made_before(tmp_path):
    """A DFT run started without --stop-when-found and resumed with it: the restored improvements are judged too,
    in order, and a hit among them ends the run without training further."""
    problem = bench_problem("tiny-pd2o")
    first = bm.run_method("asla", problem, seed=0, budget=40, work_dir=tmp_path, checkpoint_every=8)
    before = [(row["evaluations"], row["energy"]) for row in first.ledger.trace]
    assert len(before) >= 2
    asked = []

    def second_improvement_is_a_hit(atoms, energy):
        asked.append(energy)
        return len(asked) == 2

    again = bm.run_method("asla", problem, seed=0, budget=40, work_dir=tmp_path, checkpoint_every=8,
                          stop_when=second_improvement_is_a_hit)
    assert asked == [energy for _, energy in before[:2]]
    assert again.ledger.stopped and again.ledger.limit == before[1][0]
    assert again.ledger.count == first.ledger.count  # nothing evaluated after the resume
    assert any(note.startswith("found before its checkpoint") for note in again.notes)


def test_an_agox_run_resumed_with_a_stop_rule_asks_it_of_the_improvements_made_before(tmp_path, monkeypatch):
    pytest.importorskip("agox")
    from asla.bench import agox
    from asla.counting import Ledger

    monkeypatch.setattr(agox, "SAVE_EVERY_S", 0.0)
    problem = bench_problem("pd100-oxide-2x2")
    charge, session = Ledger.charge, {"resumed": False, "charged": 0}

    def charge_or_die(self):
        if not session["resumed"] and self.count == 150:
            raise Killed
        charge(self)
        session["charged"] += session["resumed"]

    monkeypatch.setattr(Ledger, "charge", charge_or_die)
    with pytest.raises(Killed):
        bm.run_method("bh", problem, seed=0, budget=400, work_dir=tmp_path)
    saved = json.loads((tmp_path / "agox-state.json").read_text())["ledger"]
    assert saved["trace"]
    session["resumed"] = True
    asked = []
    again = bm.run_method("bh", problem, seed=0, budget=400, work_dir=tmp_path,
                          stop_when=lambda atoms, energy: asked.append(energy) or True)
    assert asked == [saved["trace"][0]["energy"]]  # the first restored improvement, a hit by this rule
    assert again.ledger.stopped and session["charged"] == 0 and again.ledger.count == saved["count"]
    assert any(note.startswith("found before the kill") for note in again.notes)


def test_an_agox_work_dir_in_use_is_refused(tmp_path):
    pytest.importorskip("agox")
    from asla.lock import RunLock, RunLockedError

    with RunLock(tmp_path), pytest.raises(RunLockedError):
        bm.run_method("bh", bench_problem("pd100-oxide-2x2"), seed=0, budget=30, work_dir=tmp_path)
    assert not (tmp_path / "agox-state.json").exists()  # nothing searched, nothing written
    done = bm.run_method("bh", bench_problem("pd100-oxide-2x2"), seed=0, budget=30, work_dir=tmp_path)
    assert done.ledger.count == 30 and not (tmp_path / ".asla.lock").exists()  # released at the end


def test_online_check_judges_a_small_move_that_is_not_the_next_evaluation_at_once(monkeypatch):
    """A mutant of the best build (one atom moved a little, agents/mutation.py) comes evaluations after it: it is
    a new build, not a step of the best's descent, and is judged when it comes, as the offline judge does."""
    problem = load_problem("pd100-oxide-2x2")
    ref = problem.reference_energy
    base = read(ROOT / "docs/reference/pd100-oxide-2x2.extxyz")
    best, moved = base.copy(), base.copy()
    best.positions[:, 2] += 2.0
    moved.positions[:, 2] += 2.0
    moved.positions[-1, 0] += 0.3  # within a descent step's 0.5 A
    relaxed = []

    def fake_relax(problem, atoms):
        relaxed.append(structure_key(atoms))
        done = atoms.copy()
        done.info["relaxed_energy"] = ref if relaxed[-1] == structure_key(moved) else ref + 1.0
        return done

    monkeypatch.setattr(judge, "relax", fake_relax)
    for gap, judged_now in ((1, False), (40, True)):
        relaxed.clear()
        check = FoundCheck(problem, window=5.0)
        best.info["evaluations"], moved.info["evaluations"] = 100, 100 + gap
        assert not check(best, ref + 1.0)
        assert check(moved, ref + 0.9) is judged_now
        assert (structure_key(moved) in relaxed) is judged_now
    ledger = Ledger(budget=10)  # the ledger gives its improvements their evaluation counts
    ledger.count = 7
    ledger.observe(best, ref + 1.0)
    assert ledger.trace[-1]["atoms"].info["evaluations"] == 7
    restored = Ledger(budget=10)
    restored.load_state_dict(ledger.state_dict())
    assert restored.trace[-1]["atoms"].info["evaluations"] == 7
