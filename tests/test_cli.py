"""What a user sees: the asla command's output, help texts, and the files a run or a build writes."""
from __future__ import annotations

import argparse
import contextlib
import io
import json

import pytest
from ase.db import connect
from ase.io import read

from asla.cli import main

TINY = ["--set", "episodes=24", "--set", "network.width=8", "--set", "network.depth=2", "--set",
        "checkpoint_every=12", "--set", "learning.warmup_episodes=4"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny training run through the command line, with a status line per iteration."""
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["train", "configs/tiny-pd2o.yaml", "--run-dir", str(run_dir), "--no-progress",
                     "--status-every", "0", *TINY]) == 0
    return run_dir, out.getvalue()


def test_no_progress_prints_status_lines_and_the_final_line_says_what_the_best_is(run):
    run_dir, text = run
    status = [line for line in text.splitlines() if line.startswith("episode ")]
    assert len(status) == 6  # 24 episodes, 4 builds per iteration, one line each
    assert status[-1].startswith("episode 24/24: best ")
    final = next(line for line in text.splitlines() if line.startswith("run "))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert f"best energy {summary['best_energy']:.4f} eV (single point" in final
    assert f"relaxed {summary['best_relaxed_energy']:.4f} eV" in final
    assert summary["best_energy_kind"] == "single point" and summary["best_relaxed_energy"] < summary["best_energy"]
    assert summary["best_in_reference_basin"] is None  # tiny-pd2o's reference is on the grid: no basin to judge
    assert f"tensorboard --logdir {run_dir}\n" in text  # the run directory itself


def test_episodes_are_counted_from_one_in_the_database_summary_and_best_file(run):
    run_dir, _ = run
    summary = json.loads((run_dir / "summary.json").read_text())
    db = connect(str(run_dir / "evaluations.db"))
    assert db.metadata["episodes"] == "1-based" and summary["episode_numbering"] == "1-based"
    rows = {row.episode: row.energy for row in db.select()}
    assert min(rows) >= 1 and max(rows) <= 24
    for h in summary["history"]:  # each improvement is the database row of the same episode
        if h["episode"] in rows:
            assert rows[h["episode"]] == pytest.approx(h["energy"], abs=1e-9)
    first = summary["history"][0]
    assert first["episode"] in rows  # the run's first improvement was evaluated, not cached
    best = read(run_dir / "best.extxyz", index=0)
    assert best.info["episode"] == summary["history"][-1]["episode"]


def test_written_structures_fix_the_template_and_name_the_calculator(run, tmp_path):
    from asla import load_problem
    n_template = len(load_problem("tiny-pd2o").template)
    run_dir, _ = run
    row = next(connect(str(run_dir / "evaluations.db")).select())
    assert row.calculator == "emt"
    assert list(row.constraints[0].index) == list(range(n_template))
    best = read(run_dir / "best.extxyz", index=0)
    assert list(best.constraints[0].index) == list(range(n_template))
    out = tmp_path / "built.db"
    assert main(["build", str(run_dir), "--out", str(out)]) == 0
    built = next(connect(str(out)).select())
    assert built.calculator == "emt" and list(built.constraints[0].index) == list(range(n_template))


def test_old_databases_keep_their_zero_based_episodes_on_resume(tmp_path):
    from ase.build import fcc100
    from ase.calculators.singlepoint import SinglePointCalculator

    from asla.storage import episode_base
    old = tmp_path / "old.db"
    a = fcc100("Pd", (2, 2, 1))
    a.calc = SinglePointCalculator(a, energy=1.0)
    with connect(str(old)) as db:  # as asla wrote it before: no numbering in the metadata
        db.write(a, episode=0)
    assert episode_base(old) == 0 and episode_base(tmp_path / "new.db") == 1


def test_build_relaxes_and_labels_single_point_and_relaxed_energies(capsys):
    assert main(["build", "pd100-oxide-3x3", "--relax"]) == 0
    text = capsys.readouterr().out
    assert "reference 5.8420 eV (relaxed)" in text and "single point, as built on the grid" in text
    header, row = text.splitlines()[2:4]
    assert "single pt (eV)" in header and "relaxed (eV)" in header and "basin" in header
    cells = row.split()
    single, relaxed = float(cells[1]), float(cells[3])
    assert single == pytest.approx(58.6003, abs=1e-3)  # the README's shipped-agent row, as built
    assert relaxed == pytest.approx(5.8471, abs=1e-3) and cells[4] == "+0.0050" and cells[5] == "yes"
    assert main(["build", "pd100-oxide-3x3"]) == 0  # without --relax: the single point only, labelled
    assert "relaxed (eV)" not in capsys.readouterr().out
    from asla.agents.agent import Agent
    result = Agent.load("pd100-oxide-3x3").build("pd100-oxide-3x3", relax_steps=1000)[0]  # the same in Python
    assert result.relaxed_energy == pytest.approx(relaxed, abs=1e-4) and result.in_reference_basin is True
    assert Agent.load("pd100-oxide-3x3").build("pd100-oxide-3x3")[0].relaxed_energy is None


def test_build_on_a_run_without_an_agent_yet_says_so(tmp_path, capsys):
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "config.yaml").write_text("checkpoint_every: 200\n")
    assert main(["build", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no agent yet" in err and "every 200 episodes" in err


def test_check_prints_rounded_numbers(capsys):
    assert main(["check", "pd100-oxide-2x2"]) == 0
    text = capsys.readouterr().out
    assert "z=[13.079, 13.779, 14.879] A" in text and "13.078699999999998" not in text
    assert "reference 2.4374 eV (relaxed)" in text


def test_every_argument_has_help_text():
    import asla.cli as cli
    captured = {}
    real = argparse.ArgumentParser.parse_args

    def grab(self, args=None, namespace=None):  # argparse's own signature
        captured["parser"] = self
        raise SystemExit(0)
    argparse.ArgumentParser.parse_args = grab
    try:
        with pytest.raises(SystemExit):
            cli.main(["problems"])
    finally:
        argparse.ArgumentParser.parse_args = real
    sub = next(a for a in captured["parser"]._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {action.dest}" for name, p in sub.choices.items() for action in p._actions
               if not isinstance(action, argparse._HelpAction) and not action.help]
    assert missing == []


def _relaxed_reference_run(tmp_path, name: str, energy: float, relaxed: bool) -> dict:
    from asla.agents.training import train

    from .test_agent import tiny_cfg
    cfg = tiny_cfg(episodes=16, problem_overrides={"reference": {"energy": energy, "relaxed": relaxed}})
    return train(cfg, run_dir=tmp_path / name, progress=False)


def test_found_reference_at_for_a_relaxed_reference(tmp_path):
    base = _relaxed_reference_run(tmp_path, "base", 100.0, False)
    best = base["best_energy"]
    near = _relaxed_reference_run(tmp_path, "near", best - 0.04, True)  # within the basin tolerance of 0.05 eV
    first = next(h for h in near["history"] if h["energy"] <= best - 0.04 + 0.05)
    assert near["found_reference_at"] == {"episode": first["episode"], "evaluations": first["evaluations"]}
    assert near["history"] == [dict(h, seconds=n["seconds"]) for h, n in zip(base["history"], near["history"])]
    assert _relaxed_reference_run(tmp_path, "far", best - 0.06, True)["found_reference_at"] is None
    assert _relaxed_reference_run(tmp_path, "grid", best - 0.04, False)["found_reference_at"] is None
    from asla.agents.training import train

    from .test_agent import tiny_cfg
    stopped = train(tiny_cfg(episodes=16, stop_at_reference=True,
                             problem_overrides={"reference": {"energy": best - 0.04, "relaxed": True}}),
                    run_dir=tmp_path / "stop", progress=False)
    assert stopped["episodes"] == -(-near["found_reference_at"]["episode"] // 4) * 4  # the end of that iteration


def test_train_labels_an_energy_after_the_rewards_relaxation(tmp_path, capsys):
    assert main(["train", "configs/tiny-pd2o.yaml", "--run-dir", str(tmp_path / "r"), "--no-progress", "--no-relax",
                 "--set", "problem_overrides.relax.steps=3", *TINY[:2], *TINY[2:4]]) == 0
    final = capsys.readouterr().out.splitlines()[-2]
    assert "(after 3 LBFGS relaxation steps, " in final and "relaxed" not in final.split("steps, ")[1]
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["best_energy_kind"] == "after 3 LBFGS relaxation steps" and "best_relaxed_energy" not in summary
