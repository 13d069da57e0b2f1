"""Shipped pretrained agents: they load by short name, build on their own problem and on a larger cell, and their
greedy build on the training problem lands in the documented reference minimum (basin criterion)."""
from __future__ import annotations

import json

import pytest

from asla import CheckpointError, load_problem
from asla.agents.agent import PRETRAINED_DIR, Agent, list_pretrained
from asla.basin import relaxed_energy

SHIPPED = list_pretrained()


def test_the_promised_agents_are_shipped_with_a_card():
    assert {"pd100-oxide-3x3", "pd100-oxide-5x5"} <= set(SHIPPED)
    assert any(name.startswith("graphene") for name in SHIPPED)
    for name in SHIPPED:
        card = json.loads((PRETRAINED_DIR / f"{name}.json").read_text())
        assert card["format"] == "asla-agent" and card["trained_with"].startswith("asla train")
        assert (PRETRAINED_DIR / f"{name}.safetensors").stat().st_size < 2_000_000
        agent = Agent.load(name)  # the shipped weights load as they are; the card's layout fields were added
        assert card["card_version"] == 2 and card["architecture"] == agent.layout_fields()["architecture"]
        assert len(card["observation_channels"]) == card["in_channels"]


@pytest.mark.parametrize("name", SHIPPED)
def test_greedy_build_on_its_training_problem_reaches_the_reference(name):
    agent = Agent.load(name)
    problem = load_problem(agent.card["problem"])
    result = agent.build(problem, n=1)[0]
    assert result.ok
    assert relaxed_energy(problem, result.atoms) <= problem.reference_energy + 0.05


def test_3x3_agent_builds_the_5x5_cell_unchanged():
    agent = Agent.load("pd100-oxide-3x3")
    results = agent.build("pd100-oxide-5x5", n=2, greedy=False, epsilon=0.1, seed=1)
    p5 = load_problem("pd100-oxide-5x5")
    for r in results:
        assert r.ok and len(r.atoms) == len(p5.template) + p5.n_atoms


def test_cli_build_with_a_pretrained_name(tmp_path, capsys):
    from asla.cli import main
    out = tmp_path / "built.extxyz"
    assert main(["build", "pd100-oxide-3x3", "--problem", "pd100-oxide-5x5", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "vs reference" in text and out.exists()


def test_foreign_or_corrupt_agent_files_are_refused_without_unpickling(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    (tmp_path / "x.safetensors").write_bytes(b"\x80\x04K\x01.")  # a pickle, never loaded
    with pytest.raises(CheckpointError, match="not valid JSON"):
        Agent.load(tmp_path / "x")
    (tmp_path / "x.json").write_text(json.dumps({"format": "asla-agent", "species": ["Pd"]}))
    with pytest.raises(CheckpointError, match="safetensors"):
        Agent.load(tmp_path / "x")
    with pytest.raises(CheckpointError, match="pretrained name"):
        Agent.load("no-such-agent")
