"""Learning that works: on the tiny problem a trained agent's greedy build is the enumerated global
minimum, in whatever order the species are forced, while a random builder given the same number of energy
evaluations mostly is not."""
from __future__ import annotations

import numpy as np

from asla import load_problem
from asla.agents.agent import Agent
from asla.agents.config import load_config
from asla.agents.training import train
from asla.builder import random_build


def test_agent_beats_random_builder_on_tiny_problem(tmp_path):
    problem = load_problem("tiny-pd2o")
    ref = problem.reference_energy
    cfg = load_config("configs/tiny-pd2o.yaml", ["seed=0", "record_evaluations=false"])
    summary = train(cfg, run_dir=tmp_path / "run", progress=False)
    budget = summary["energy_evaluations"]
    assert summary["found_reference_at"] is not None
    agent = Agent.load(tmp_path / "run")
    greedy = agent.build(problem, n=1)[0]
    assert abs(greedy.energy - ref) < 1e-6, f"greedy build {greedy.energy:.4f} eV, minimum {ref:.4f} eV"
    # order-free targets teach every build order: forcing another order of the species still gives the minimum
    # (with as-built targets and the linear reward, 2 of 4 seeds missed it in some forced order: docs/tuning.md)
    for order in (["O", "Pd", "Pd"], ["Pd", "O", "Pd"], ["Pd", "Pd", "O"]):
        forced = agent.build(load_problem("tiny-pd2o", sequence=order), n=1)[0]
        assert abs(forced.energy - ref) < 1e-6, f"forced order {order}: {forced.energy:.4f} eV"

    # a random builder with the same budget of distinct evaluated structures, over 20 seeds
    successes = 0
    for seed in range(20):
        rng = np.random.default_rng(100 + seed)
        seen: set = set()
        hit = False
        while len(seen) < budget:
            state = random_build(problem, rng)
            key = state.canonical_key()
            if key in seen:
                continue
            seen.add(key)
            e = problem.__dict__.setdefault("_e", {}).get(key)
            if e is None:
                from asla.reward import EnergyEvaluator
                e = EnergyEvaluator(problem, use_cache=False).evaluate(state.atoms()).energy
                problem.__dict__["_e"][key] = e
            hit |= abs(e - ref) < 1e-6
        successes += hit
    assert successes <= 10, f"random builder reached the minimum in {successes}/20 runs with {budget} evaluations"
