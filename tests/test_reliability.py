"""Reliability and security (issue 23): agent files run no code, a run directory has one trainer, a worker that
dies on a structure is a failed evaluation, a full disk leaves the last checkpoint and no temporary files."""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from asla import CalculatorError, load_problem
from asla.agents import checkpoint
from asla.agents.agent import Agent
from asla.agents.qnetwork import NetworkConfig
from asla.cli import main
from asla.lock import LOCK_NAME, RunLock, RunLockedError
from asla.problem import shipped_problem_dir

TINY_PROBLEM = yaml.safe_load((shipped_problem_dir() / "tiny-pd2o.yaml").read_text())


def cli(*argv: str, seconds: int = 60) -> tuple[int, str, str]:
    """`asla ARGV` in this process: (exit status, stdout, stderr); a hang fails the test after `seconds`."""
    out, err = io.StringIO(), io.StringIO()

    def hang(signum, frame):
        raise TimeoutError(f"asla {' '.join(argv)} still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(list(argv))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return rc, out.getvalue(), err.getvalue()


def refused(rc: int, err: str, *words: str) -> None:
    """Exit status 2 and one line `asla: error: ...` holding each of `words`."""
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("asla: error: "), err
    for w in words:
        assert w in lines[0], (w, lines[0])


# ---- agent files never run code ---------------------------------------------------------------------------

@pytest.fixture
def agent_files(tmp_path):
    """A small saved agent for tiny-pd2o: (base path, card dict)."""
    agent = Agent.for_problem(load_problem("tiny-pd2o"), NetworkConfig(width=8, depth=2, kernel=3))
    agent.save(tmp_path / "a")
    return tmp_path / "a", json.loads((tmp_path / "a.json").read_text())


@pytest.fixture
def evil_module(tmp_path, monkeypatch):
    """An importable module whose import and whose calculator each leave a marker file: the proof of code run."""
    mod = tmp_path / "mods"
    mod.mkdir()
    marker = tmp_path / "marker"
    (mod / "evilcalc.py").write_text(textwrap.dedent(f"""
        from pathlib import Path
        Path({str(marker)!r}).write_text("imported")
        from asla.emt import EMT

        class Evil(EMT):
            def __init__(self, **kw):
                Path({str(marker)!r}).write_text("ran")
                super().__init__(**kw)
    """))
    monkeypatch.syspath_prepend(str(mod))
    return marker


def _with_card(base: Path, card: dict) -> None:
    base.with_suffix(".json").write_text(json.dumps(card))


@pytest.mark.parametrize("where", ["calculator", "calculator-string", "retry_settings", "inner", "yaml-path"])
def test_a_card_with_an_import_path_calculator_runs_nothing(agent_files, evil_module, tmp_path, where):
    base, card = agent_files
    problem = json.loads(json.dumps(TINY_PROBLEM))
    if where == "calculator":
        problem["calculator"] = {"name": "evilcalc:Evil"}
    elif where == "calculator-string":
        problem["calculator"] = "evilcalc.Evil"
    elif where == "retry_settings":
        problem["faults"] = {"retries": 1, "retry_settings": {"name": "evilcalc:Evil"}}
    elif where == "inner":
        problem["calculator"] = {"name": "sleep", "seconds": 0, "inner": "evilcalc:Evil"}
    if where == "yaml-path":
        problem["calculator"] = {"name": "evilcalc:Evil"}
        (tmp_path / "p.yaml").write_text(yaml.safe_dump(problem))
        card["problem"] = str(tmp_path / "p.yaml")
    else:
        card["problem"] = problem
    _with_card(base, card)
    rc, _, err = cli("build", str(base))
    refused(rc, err, "--trust-card")
    assert not evil_module.exists(), "the card's calculator was imported or run"


def test_trust_card_loads_the_cards_problem_as_given(agent_files, evil_module):
    base, card = agent_files
    card["problem"] = {**TINY_PROBLEM, "calculator": {"name": "evilcalc:Evil"}}
    _with_card(base, card)
    rc, out, err = cli("build", str(base), "--trust-card")
    assert rc == 0, err
    assert evil_module.read_text() == "ran"  # the flag is what lets a card's import path run


def test_a_card_with_plain_data_builds_without_the_flag(agent_files):
    base, card = agent_files
    card["problem"] = TINY_PROBLEM  # inline data with a built-in calculator
    _with_card(base, card)
    rc, out, err = cli("build", str(base))
    assert rc == 0, err
    assert "reference 8.1101 eV (on the grid)" in out  # the card's inline problem, with its reference
    card["problem"] = {**TINY_PROBLEM, "calculator": {"name": "gpaw", "txt": "/tmp/overwritten.txt"}}
    _with_card(base, card)
    refused(*cli("build", str(base))[::2], "file path", "calculator.txt")
    card["problem"] = "no-such-problem"
    _with_card(base, card)
    refused(*cli("build", str(base))[::2], "not a shipped problem", "--problem")


def test_weights_that_are_not_a_regular_file_are_refused_without_reading(agent_files):
    base, _ = agent_files
    weights = base.with_suffix(".safetensors")
    weights.unlink()
    os.mkfifo(weights)  # reading a FIFO with no writer blocks forever
    refused(*cli("build", str(base), "--problem", "tiny-pd2o", seconds=30)[::2], "not a regular file",
            str(weights))
    weights.unlink()
    weights.symlink_to("/dev/zero")  # reads without end
    refused(*cli("build", str(base), "--problem", "tiny-pd2o", seconds=30)[::2], "not a regular file")
    card = base.with_suffix(".json")
    card.rename(base.with_suffix(".real.json"))
    card.symlink_to("/dev/zero")
    refused(*cli("build", str(base), "--problem", "tiny-pd2o", seconds=30)[::2], "not a regular file", str(card))


def test_files_above_the_size_limits_are_refused_before_reading(agent_files, monkeypatch):
    base, card = agent_files
    monkeypatch.setattr(checkpoint, "MAX_WEIGHTS_BYTES", 1000)
    refused(*cli("build", str(base), "--problem", "tiny-pd2o")[::2], "above the limit of 1,000",
            "ASLA_MAX_WEIGHTS_BYTES", "a.safetensors")
    monkeypatch.undo()
    card["padding"] = "x" * (checkpoint.MAX_CARD_BYTES + 1)
    _with_card(base, card)
    refused(*cli("build", str(base), "--problem", "tiny-pd2o")[::2], "above the limit", "ASLA_MAX_CARD_BYTES")
    card.pop("padding")
    text = json.dumps(card)
    base.with_suffix(".json").write_text(text[:-1] + ', "deep": ' + "[" * 100_000 + "]" * 100_000 + "}")
    refused(*cli("build", str(base), "--problem", "tiny-pd2o")[::2], "nested deeper")
    card["deep"] = [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[0]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]
    _with_card(base, card)
    refused(*cli("build", str(base), "--problem", "tiny-pd2o")[::2], "nested deeper than 32")


@pytest.mark.parametrize("field, value, words", [
    ("depth", 1e7, ["network.depth", "integer >= 1 and <= 64"]),
    ("depth", 10**7, ["network.depth", "<= 64"]),
    ("width", -1, ["network.width"]),
    ("kernel", 4, ["network.kernel", "odd"]),
    ("periodic", "yes", ["network.periodic"]),
    ("extra", 1, ["network.extra", "unknown key"]),
])
def test_absurd_network_values_are_refused_by_the_recipe_schema(agent_files, field, value, words):
    base, card = agent_files
    card["network"][field] = value
    _with_card(base, card)
    refused(*cli("build", str(base), "--problem", "tiny-pd2o")[::2], "a.json", *words)


@pytest.mark.parametrize("field, value, words", [
    ("species", ["Pd", "Xx"], ["species", "element symbols"]),
    ("species", [["Pd"], "O"], ["species"]),
    ("n_layers", 10**6, ["n_layers", "<= 64"]),
    ("in_channels", 10**9, ["in_channels"]),
    ("grid_spacing", [0.5, "abc"], ["grid_spacing"]),
    ("smear", "wide", ["smear"]),
])
def test_other_card_fields_are_checked(agent_files, field, value, words):
    base, card = agent_files
    card[field] = value
    _with_card(base, card)
    refused(*cli("build", str(base), "--problem", "tiny-pd2o")[::2], *words)


@pytest.mark.parametrize("kind", ["nan", "int", "shape", "missing"])
def test_weights_must_be_finite_floats_of_the_cards_shapes(agent_files, kind):
    base, _ = agent_files
    weights = base.with_suffix(".safetensors")
    tensors = load_file(str(weights))
    name = "stem.weight"
    if kind == "nan":
        tensors = {k: torch.full_like(v, float("nan")) for k, v in tensors.items()}
        words = ["non-finite"]
    elif kind == "int":
        tensors = {k: v.to(torch.int32) for k, v in tensors.items()}
        words = ["int32", "floating point"]
    elif kind == "shape":
        tensors[name] = torch.zeros(3, 3)
        words = [name, "shape (3, 3)"]
    else:
        del tensors[name]
        words = ["lacks", name]
    save_file(tensors, str(weights))
    refused(*cli("build", str(base), "--problem", "tiny-pd2o")[::2], str(weights), *words)


# ---- one trainer per run directory ------------------------------------------------------------------------

TINY_SET = ["--set", "network.width=8", "--set", "network.depth=2", "--set", "learning.warmup_episodes=4",
            "--set", "learning.batch_size=16"]
TINY_RECIPE = {"problem": "tiny-pd2o", "network": {"width": 8, "depth": 2, "kernel": 3}, "n_builders": 4,
               "learning": {"batch_size": 16, "warmup_episodes": 4}, "log_images_every": 1000}


def recipe(**extra) -> dict:
    """The tiny recipe, checked (a full recipe, as train() takes it)."""
    from asla.agents.config import load_config
    return load_config({**TINY_RECIPE, **extra})


def _hold_lock(run_dir: Path) -> subprocess.Popen:
    """Another process that takes the run directory's lock and keeps it."""
    script = "import sys, time; from asla.lock import RunLock; RunLock(sys.argv[1]).acquire(); print('held', " \
             "flush=True); time.sleep(300)"
    proc = subprocess.Popen([sys.executable, "-c", script, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_trainer_on_a_run_directory_gets_one_line(tmp_path):
    run = tmp_path / "run"
    rc, _, err = cli("train", "configs/tiny-pd2o.yaml", "--run-dir", str(run), "--no-progress", "--no-relax",
                     "--set", "episodes=8", "--set", "checkpoint_every=4", *TINY_SET)
    assert rc == 0, err
    assert not (run / LOCK_NAME).exists()  # released at the end
    before = sorted(p.name for p in run.iterdir())
    holder = _hold_lock(run)
    try:
        refused(*cli("train", "--resume", str(run), "--no-progress", "--no-relax")[::2], "in use by process",
                str(holder.pid))
        fresh = tmp_path / "fresh"
        fresh.mkdir()
        holder2 = _hold_lock(fresh)
        try:
            refused(*cli("train", "configs/tiny-pd2o.yaml", "--run-dir", str(fresh), "--no-progress",
                         *TINY_SET)[::2], "in use by process", str(holder2.pid))
            assert sorted(p.name for p in fresh.iterdir()) == [LOCK_NAME]  # nothing written
        finally:
            holder2.kill()
            holder2.wait()
    finally:
        holder.kill()  # SIGKILL: the lock stays behind, stale
        holder.wait()
    assert sorted(p.name for p in run.iterdir()) == sorted([*before, LOCK_NAME])
    rc, out, err = cli("train", "--resume", str(run), "--no-progress", "--no-relax", "--set", "episodes=12")
    assert rc == 0, err  # the dead holder's lock is taken over
    assert "12 episodes" in out and not (run / LOCK_NAME).exists()


def test_stale_and_foreign_locks(tmp_path, monkeypatch):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / LOCK_NAME
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": None}))
    with RunLock(tmp_path) as held:  # a dead process on this host: taken over
        assert held.holder()["pid"] == os.getpid()
    assert not lock.exists()
    # the id of a live process, but not the process that wrote the lock (its start time differs): stale
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": "1"}))
    RunLock(tmp_path).acquire().release()
    assert not lock.exists()
    lock.write_text(json.dumps({"host": "elsewhere.example", "pid": 1, "since": "2026-01-01T00:00:00Z"}))
    with pytest.raises(RunLockedError, match="on host elsewhere.example .* delete"):
        RunLock(tmp_path).acquire()
    assert json.loads(lock.read_text())["host"] == "elsewhere.example"  # left alone
    lock.unlink()
    first = RunLock(tmp_path).acquire()
    with pytest.raises(RunLockedError, match="in use by process"):  # also within one process
        RunLock(tmp_path).acquire()
    first.release()


def test_the_lock_is_released_when_setting_up_or_training_fails(tmp_path):
    from asla import CheckpointError
    from asla.agents.callbacks import BaseCallback
    from asla.agents.training import Trainer, train
    with pytest.raises(CheckpointError):
        Trainer(recipe(), run_dir=tmp_path / "a", init_from=tmp_path / "no-agent", progress=False)
    assert not (tmp_path / "a" / LOCK_NAME).exists()

    class Boom(BaseCallback):
        def on_iteration_end(self) -> bool:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        train(recipe(), run_dir=tmp_path / "b", progress=False, callbacks=[Boom()])
    assert not (tmp_path / "b" / LOCK_NAME).exists()


KILL_SCRIPT = """
import json, os, signal, sys
from asla.agents.callbacks import BaseCallback
from asla.agents.training import train

class Kill(BaseCallback):  # SIGKILL itself before the first checkpoint, as the OOM killer would
    def on_iteration_end(self):
        if self.trainer.state.episodes >= 12:
            os.kill(os.getpid(), signal.SIGKILL)
        return True

train(json.loads(sys.argv[1]), run_dir=sys.argv[2], progress=False, callbacks=[Kill()])
"""


def test_starting_afresh_after_a_kill_before_the_first_checkpoint_leaves_no_duplicate_rows(tmp_path):
    from ase.db import connect

    from asla.agents.training import train
    cfg = recipe(episodes=24, checkpoint_every=1000)
    killed = subprocess.run([sys.executable, "-c", KILL_SCRIPT, json.dumps(cfg), str(tmp_path / "run")],
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL
    run = tmp_path / "run"
    assert (run / LOCK_NAME).exists() and not (run / "checkpoints" / "latest").exists()
    rows_killed = connect(str(run / "evaluations.db")).count()
    assert rows_killed > 0  # the killed attempt's evaluations
    again = train(dict(cfg), run_dir=run, progress=False)  # the same fresh command, as the error advises
    whole = train(dict(cfg), run_dir=tmp_path / "whole", progress=False)
    episodes = [row.episode for row in connect(str(run / "evaluations.db")).select()]
    assert len(episodes) == len(set(episodes)) == again["structures_evaluated"]
    assert again["history"] == [dict(h, seconds=r["seconds"]) for h, r in zip(whole["history"], again["history"],
                                                                               strict=True)]
    assert again["energy_evaluations"] == whole["energy_evaluations"]
    assert len(list(run.glob("events.out.tfevents.*"))) == 1  # the killed attempt's curves are gone too
    assert not (run / LOCK_NAME).exists()


# ---- a structure that kills its worker ----------------------------------------------------------------------

CRASHY = '''
import faulthandler, os, signal, zlib
import numpy as np
from asla.emt import EMT

def chosen(atoms, every):
    """The structures this calculator dies on: info['crash'] names the signal, or every `every`-th by a hash."""
    if "crash" in atoms.info:
        return atoms.info["crash"]
    key = zlib.crc32(np.round(atoms.positions[-3:], 3).tobytes())
    return "SIGSEGV" if every and key % every == 0 else None

class Crashy(EMT):
    """EMT that segfaults or is SIGKILLed in the calculator on chosen structures (or raises, with mode raise)."""
    def __init__(self, every=0, mode="signal", **kw):
        super().__init__(**kw)
        self.every, self.mode = every, mode

    def calculate(self, atoms=None, properties=("energy",), system_changes=None):
        how = chosen(atoms if atoms is not None else self.atoms, self.every)
        if how and self.mode == "raise":
            raise RuntimeError("chosen structure")
        if how:
            faulthandler.disable()  # pytest's handler would print the worker's stack; the crash is the point
            os.kill(os.getpid(), getattr(signal, how))
        super().calculate(atoms, properties, system_changes or ["positions"])
'''


@pytest.fixture
def crashy(tmp_path, monkeypatch):
    mod = tmp_path / "crashmods"
    mod.mkdir()
    (mod / "crashy.py").write_text(CRASHY)
    monkeypatch.syspath_prepend(str(mod))  # forked workers inherit sys.path
    return "crashy:Crashy"


def test_a_structure_that_kills_its_worker_is_a_failed_evaluation(tmp_path, crashy):
    import numpy as np

    from asla.builder import random_build
    from asla.executor import ProcessExecutor
    from asla.reward import EnergyEvaluator
    problem = load_problem(TINY_PROBLEM | {"calculator": {"name": crashy}})
    rng = np.random.default_rng(0)
    atoms = [random_build(problem, rng).atoms() for _ in range(5)]
    atoms[1].info["crash"] = "SIGSEGV"
    atoms[3].info["crash"] = "SIGKILL"
    evaluator = EnergyEvaluator(problem, failure_dir=tmp_path / "failures")
    executor = ProcessExecutor(problem, workers=2)
    try:
        results = executor.evaluate_many(evaluator, atoms, [None] * len(atoms))
    finally:
        executor.close()
    serial = EnergyEvaluator(load_problem("tiny-pd2o"))
    for i in (0, 2, 4):  # the others are evaluated as in a serial run
        assert results[i].ok and results[i].energy == serial.evaluate(atoms[i]).energy
    for i, sig in ((1, "SIGSEGV"), (3, "SIGKILL")):
        assert not results[i].ok and np.isnan(results[i].energy)
        assert f"died ({sig})" in results[i].error and "3 times" in results[i].error
    assert evaluator.n_calls == 5 and evaluator.n_structures == 5  # a lost structure costs one, as an error does
    assert [Path(f["file"]).exists() for f in evaluator.failures] == [True, True]
    assert sorted(p.name for p in (tmp_path / "failures").iterdir()) == ["failed-00000.extxyz",
                                                                        "failed-00001.extxyz"]
    strict = load_problem(TINY_PROBLEM | {"calculator": {"name": crashy}, "faults": {"on_error": "raise"}})
    executor = ProcessExecutor(strict, workers=1, max_retries=0)
    try:
        with pytest.raises(CalculatorError, match="worker died"):  # the fault policy applies as to any failure
            executor.evaluate_many(EnergyEvaluator(strict), atoms[1:2], [None])
    finally:
        executor.close()


def test_training_goes_on_through_worker_crashes_as_through_calculator_errors(tmp_path, crashy):
    from asla.agents.training import train
    crashing = {"name": crashy, "every": 3}
    cfg = recipe(problem=TINY_PROBLEM | {"calculator": crashing}, episodes=24, checkpoint_every=12,
                 executor="process", workers=2)
    crashed = train(cfg, run_dir=tmp_path / "crashed", progress=False)
    raising = recipe(problem=TINY_PROBLEM | {"calculator": {**crashing, "mode": "raise"}}, episodes=24,
                     checkpoint_every=12)
    raised = train(raising, run_dir=tmp_path / "raised", progress=False)
    assert crashed["episodes"] == 24 and crashed["failures"] > 0
    assert crashed["failures"] == raised["failures"]  # the same structures failed, as a serial error would
    assert crashed["energy_evaluations"] == raised["energy_evaluations"]
    assert crashed["history"] == [dict(h, seconds=c["seconds"]) for h, c in zip(raised["history"],
                                                                               crashed["history"], strict=True)]
    (kind, count), = crashed["failure_summary"].items()
    assert "worker died (SIGSEGV)" in kind and count == crashed["failures"]
    assert len(list((tmp_path / "crashed" / "failures").glob("failed-*.extxyz"))) == crashed["failures"]


# ---- a full disk ----------------------------------------------------------------------------------------------

def _full_disk(monkeypatch, where: str) -> list[str]:
    """os.fsync raises ENOSPC for files whose path holds `where` (the data went to the page cache, the disk
    refuses it: how a full disk usually shows); returns the paths it refused."""
    import errno
    refused_paths: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        name = os.readlink(f"/proc/self/fd/{fd}")
        if where in name:
            refused_paths.append(name)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr("asla.storage.os.fsync", fsync)
    return refused_paths


def test_atomic_writes_on_a_full_disk_leave_the_old_file_and_no_temporary_file(tmp_path, monkeypatch):
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    from asla.storage import write_json, write_structures
    write_json(tmp_path / "summary.json", {"old": True})
    _full_disk(monkeypatch, "summary.json")
    with pytest.raises(OSError, match="No space left on device") as info:
        write_json(tmp_path / "summary.json", {"old": False})
    assert info.value.filename == str(tmp_path / "summary.json")  # the file meant, not the temporary one
    assert json.loads((tmp_path / "summary.json").read_text()) == {"old": True}
    atoms = Atoms("Pd", positions=[[0, 0, 0]], cell=[3, 3, 3])
    atoms.calc = SinglePointCalculator(atoms, energy=1.0)
    write_structures(tmp_path / "best.extxyz", [atoms])

    def no_space(*args, **kwargs):
        import errno
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("ase.io.write", no_space)
    with pytest.raises(OSError, match="No space"):
        write_structures(tmp_path / "best.extxyz", [atoms, atoms])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.extxyz", "summary.json"]
    assert "Pd" in (tmp_path / "best.extxyz").read_text()


@pytest.mark.parametrize("where", ["ckpt-00000016/.trainer.safetensors.", "ckpt-00000016/.agent.json.",
                                   "/.summary.json."])
def test_a_full_disk_stops_training_with_one_line_and_the_last_checkpoint_intact(tmp_path, monkeypatch, where):
    from asla.agents.training import latest_checkpoint
    run = tmp_path / "run"
    args = ["--no-progress", "--no-relax", "--set", "episodes=24", "--set", "checkpoint_every=8", *TINY_SET]
    refused_paths = _full_disk(monkeypatch, where)
    rc, _, err = cli("train", "configs/tiny-pd2o.yaml", "--run-dir", str(run), *args)
    assert refused_paths  # the disk filled where the test meant it to
    refused(rc, err, "No space left on device", "--resume")
    monkeypatch.undo()
    published = latest_checkpoint(run)  # the first checkpoint (the summary fails right after it, the second in it)
    assert published.name == "ckpt-00000008"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["ckpt-00000008", "latest"]  # none half
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]  # no orphan temporary files
    assert not (run / LOCK_NAME).exists()
    Agent.load(published / "agent")  # the last checkpoint reads back
    rc, out, err = cli("train", "--resume", str(run), *args)
    assert rc == 0, err
    whole = tmp_path / "whole"
    assert cli("train", "configs/tiny-pd2o.yaml", "--run-dir", str(whole), *args)[0] == 0
    a, b = (json.loads((d / "summary.json").read_text()) for d in (run, whole))
    assert a["energy_evaluations"] == b["energy_evaluations"] and a["best_energy"] == b["best_energy"]
    assert [h["actions"] for h in a["history"]] == [h["actions"] for h in b["history"]]


def test_a_database_that_cannot_grow_is_one_line(tmp_path, monkeypatch):
    import sqlite3

    def full(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr("asla.agents.training.append_db", full)
    rc, _, err = cli("train", "configs/tiny-pd2o.yaml", "--run-dir", str(tmp_path / "run"), "--no-progress",
                     "--set", "episodes=8", *TINY_SET)
    refused(rc, err, "evaluations database: database or disk is full")
    assert not (tmp_path / "run" / LOCK_NAME).exists()


# ---- counting -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode, retries, calls", [("nan", 0, 1), ("nan", 2, 3), ("raise", 0, 1), ("raise", 1, 2)])
def test_a_failed_evaluation_costs_one_evaluation_per_try(mode, retries, calls):
    """A NaN energy was counted twice (the call, then once more as a failure); each try is one evaluation."""
    import numpy as np

    from asla.builder import random_build
    from asla.reward import EnergyEvaluator
    problem = load_problem(TINY_PROBLEM | {"calculator": {"name": "tests.test_core:Broken", "mode": mode},
                                           "faults": {"retries": retries}})
    evaluator = EnergyEvaluator(problem)
    result = evaluator.evaluate(random_build(problem, np.random.default_rng(0)).atoms())
    assert not result.ok and result.n_calls == calls and evaluator.n_calls == calls


# ---- a hole of the potential ----------------------------------------------------------------------------------

HOLEY = '''
import numpy as np
from ase.calculators.calculator import Calculator
from asla.emt import EMT

class Holey(Calculator):
    """EMT for all atoms but the last, which sits in a hole 30 eV deep 0.3 A from the second-last atom (a spring
    pulls it there): such a hole as an ML potential can have."""
    implemented_properties = ["energy", "free_energy", "forces"]

    def calculate(self, atoms=None, properties=("energy",), system_changes=None):
        super().calculate(atoms, properties, system_changes or ["positions"])
        rest = self.atoms[:-1]
        rest.calc = EMT()
        forces = np.zeros((len(self.atoms), 3))
        forces[:-1] = rest.get_forces()
        v = self.atoms.get_distance(-2, -1, mic=True, vector=True)
        d = float(np.linalg.norm(v))
        grad = 20.0 * (d - 0.3) * v / d  # of the spring 10 (d - 0.3)^2 by the last atom's position
        forces[-1] -= grad
        forces[-2] += grad
        energy = rest.get_potential_energy() + 10.0 * (d - 0.3) ** 2 - 30.0
        self.results = {"energy": energy, "free_energy": energy, "forces": forces}
'''


def test_a_relaxation_into_a_hole_of_the_potential_is_a_failed_evaluation(tmp_path, monkeypatch):
    import numpy as np

    from asla.builder import random_build
    from asla.reward import EnergyEvaluator
    (tmp_path / "holey.py").write_text(HOLEY)
    monkeypatch.syspath_prepend(str(tmp_path))
    holey = TINY_PROBLEM | {"calculator": {"name": "holey:Holey"}, "relax": {"steps": 10},
                            "faults": {"retries": 2}}
    problem = load_problem(holey)
    atoms = random_build(problem, np.random.default_rng(3)).atoms()
    guarded = EnergyEvaluator(problem)
    ev = guarded.evaluate(atoms)
    assert not ev.ok and np.isnan(ev.energy)
    assert "collapsed two atoms" in ev.error and "covalent radii" in ev.error
    assert ev.n_calls == 11 and guarded.n_calls == 11  # the ten steps and the end point were spent; no retry
    open_hole = EnergyEvaluator(load_problem(holey | {"faults": {"retries": 2, "min_distance": 0}}))
    rewarded = open_hole.evaluate(atoms)  # with the guard off, the hole is the reward: far below any structure
    sound = EnergyEvaluator(load_problem(TINY_PROBLEM | {"relax": {"steps": 10}})).evaluate(atoms)
    assert rewarded.ok and sound.ok and rewarded.energy < sound.energy - 5.0
    assert sound.error is None  # plain EMT relaxes this build without a collapse
    with pytest.raises(CalculatorError, match="collapsed two atoms"):  # the fault policy applies as to any failure
        EnergyEvaluator(load_problem(holey | {"faults": {"on_error": "raise"}})).evaluate(atoms)
