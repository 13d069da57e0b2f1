"""Parallel evaluation (process pool, Ray local mode), dead workers, kill -9 and resume, databases."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from asla import load_problem
from asla.agents.config import load_config
from asla.agents.training import train
from asla.builder import random_build
from asla.executor import ProcessExecutor, make_executor
from asla.reward import EnergyEvaluator


def _cfg(executor: str, **extra):
    return load_config({"problem": "tiny-pd2o", "episodes": 24, "network": {"width": 8, "depth": 2, "kernel": 3},
                        "executor": executor, "workers": 2, "learning": {"batch_size": 16, "warmup_episodes": 4},
                        **extra})


@pytest.mark.parametrize("executor", ["process", "ray"])
def test_parallel_training_matches_serial(tmp_path, executor):
    if executor == "ray":
        pytest.importorskip("ray")
    serial = train(_cfg("serial"), run_dir=tmp_path / "serial", progress=False)
    parallel = train(_cfg(executor), run_dir=tmp_path / executor, progress=False)
    assert parallel["history"]
    assert [h["actions"] for h in parallel["history"]] == [h["actions"] for h in serial["history"]]
    assert parallel["energy_evaluations"] == serial["energy_evaluations"]
    assert parallel["best_energy"] == serial["best_energy"]


def test_dead_worker_task_is_retried():
    problem = load_problem("tiny-pd2o", **{"calculator": {"name": "sleep", "seconds": 1.0}})
    rng = np.random.default_rng(0)
    builds = [random_build(problem, rng) for _ in range(4)]
    atoms = [b.atoms() for b in builds]
    keys = [b.canonical_key() for b in builds]
    expected = [EnergyEvaluator(load_problem("tiny-pd2o"), use_cache=False).evaluate(a).energy for a in atoms]
    ex = ProcessExecutor(problem, workers=2)
    evaluator = EnergyEvaluator(problem)

    def kill_one():
        time.sleep(0.5)
        os.kill(ex.pids()[0], signal.SIGKILL)

    ex._pool()  # start workers so there is a pid to kill
    killer = threading.Thread(target=kill_one)
    killer.start()
    results = ex.evaluate_many(evaluator, atoms, keys)
    killer.join()
    ex.close()
    assert [r.energy for r in results] == pytest.approx(expected)
    assert all(r.ok for r in results)


def test_unknown_executor_is_refused():
    from asla import ConfigError
    with pytest.raises(ConfigError, match="executor"):
        make_executor(load_problem("tiny-pd2o"), "mpi")


def test_kill_minus_9_then_resume_loses_nothing(tmp_path):
    run = tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({"problem": "tiny-pd2o", "episodes": 400, "checkpoint_every": 8,
                                  "network": {"width": 8, "depth": 2, "kernel": 3},
                                  "learning": {"batch_size": 16, "warmup_episodes": 4}}))
    cmd = [sys.executable, "-m", "asla.cli", "train", str(recipe), "--run-dir", str(run), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        latest = run / "checkpoints" / "latest"
        if latest.exists() and int(latest.read_text().split("-")[1]) >= 24:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (run / "checkpoints" / "latest").exists()
    # the run directory is intact and loadable as it stands
    from asla.agents.agent import Agent
    Agent.load(run)
    done = subprocess.run([sys.executable, "-m", "asla.cli", "train", "--resume", str(run), "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["episodes"] == 400
    from ase.db import connect
    episodes = [row.episode for row in connect(str(run / "evaluations.db")).select()]
    assert len(episodes) == len(set(episodes)) == summary["structures_evaluated"]


def test_seed_from_database(tmp_path):
    from ase.db import connect

    from asla.agents.training import demonstrations_from_db
    from asla.builder import atoms_from_actions
    train(_cfg("serial"), run_dir=tmp_path / "a", progress=False)
    db = tmp_path / "a" / "evaluations.db"
    problem = load_problem("tiny-pd2o")
    demos = demonstrations_from_db(problem, str(db))
    rows = list(connect(str(db)).select())
    assert len(demos) == len(rows) > 0
    for ep, row in zip(demos, rows):
        assert ep.energy == pytest.approx(row.energy)
        rebuilt = atoms_from_actions(problem, ep.actions)
        original = row.toatoms()
        assert sorted(rebuilt.get_chemical_symbols()) == sorted(original.get_chemical_symbols())
        assert np.allclose(np.sort(rebuilt.positions, axis=0), np.sort(original.positions, axis=0), atol=1e-6)
    seeded = train(_cfg("serial", seed_from_db=str(db), episodes=4), run_dir=tmp_path / "b", progress=False)
    assert seeded["episodes"] == 4
