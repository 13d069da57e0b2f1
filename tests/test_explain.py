"""Relevance maps (asla.agents.explain): what LRP promises on small networks, on a shipped agent, and the command."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from asla.agents.explain import explain, explain_build, relevance
from asla.agents.qnetwork import NetworkConfig, QNetwork
from asla.cli import main


def tiny_net(seed: int = 0, zero_bias: bool = False, **cfg) -> QNetwork:
    torch.manual_seed(seed)
    net = QNetwork(3, 2, NetworkConfig(**{"width": 4, "depth": 2, "kernel": 3, **cfg}))
    if zero_bias:
        for m in net.modules():
            if getattr(m, "bias", None) is not None:
                torch.nn.init.zeros_(m.bias)
    return net


def dense_obs(shape=(3, 6, 8), seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random(shape) + 0.05


@pytest.mark.parametrize("cfg", [{}, {"global_branch": False}, {"periodic": False}, {"dilation": 2}])
def test_epsilon_rule_with_zero_biases_sums_to_q(cfg):
    net = tiny_net(zero_bias=True, **cfg)
    for action in (0, 17, 95):
        r, q = relevance(net, dense_obs(), action, "epsilon", epsilon=1e-9)
        assert abs(q) > 1e-4
        assert r.sum() == pytest.approx(q, rel=1e-5, abs=0)
        assert (r > 0).any() and (r < 0).any()  # signed: epsilon LRP is not a plain positive share


def test_epsilon_rule_leaves_the_bias_share_unassigned():
    """Only the head has a bias b: the input relevances sum to Q - b, the share the bias took."""
    net = tiny_net(seed=3, zero_bias=True)
    torch.nn.init.constant_(net.head.bias, 0.25)
    r, q = relevance(net, dense_obs(), 17, "epsilon", epsilon=1e-9)
    with torch.no_grad():
        assert q == pytest.approx(float(net(torch.as_tensor(dense_obs()[None], dtype=torch.float32))[0, 17]),
                                  abs=1e-5)
    assert r.sum() == pytest.approx(q - 0.25, rel=1e-5)


def test_epsilon_rule_matches_the_written_out_formula():
    """A stem + head network (depth 0) by hand, loops and periodic indices: R_i = sum_j x_i w_ij / z_j R_j."""
    torch.manual_seed(5)
    net = QNetwork(1, 1, NetworkConfig(width=2, depth=0, kernel=3, global_branch=False)).double()
    x = np.random.default_rng(2).random((1, 4, 5))
    n, m, eps = 4, 5, 1e-9
    w1, b1 = net.stem.weight.detach().numpy(), net.stem.bias.detach().numpy()
    w2, b2 = net.head.weight.detach().numpy()[0, :, 0, 0], float(net.head.bias.detach())
    z1 = np.zeros((2, n, m))
    for c in range(2):
        for i in range(n):
            for j in range(m):
                z1[c, i, j] = b1[c] + sum(w1[c, 0, di + 1, dj + 1] * x[0, (i + di) % n, (j + dj) % m]
                                          for di in (-1, 0, 1) for dj in (-1, 0, 1))
    a1 = z1 / (1 + np.exp(-z1))
    pi, pj = 2, 3
    q = float(w2 @ a1[:, pi, pj] + b2)
    r1 = np.zeros((2, n, m))
    r1[:, pi, pj] = a1[:, pi, pj] * w2 / (q + eps * np.sign(q)) * q  # head; SiLU passes it unchanged
    expected = np.zeros((1, n, m))
    for c in range(2):
        for i in range(n):
            for j in range(m):
                if r1[c, i, j] == 0:
                    continue
                for di in (-1, 0, 1):
                    for dj in (-1, 0, 1):
                        ii, jj = (i + di) % n, (j + dj) % m
                        expected[0, ii, jj] += (x[0, ii, jj] * w1[c, 0, di + 1, dj + 1]
                                                / (z1[c, i, j] + eps * np.sign(z1[c, i, j])) * r1[c, i, j])
    r, q_lrp = relevance(net, x, pi * m + pj, "epsilon", epsilon=eps)
    assert q_lrp == pytest.approx(q, abs=1e-12)
    np.testing.assert_allclose(r, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_zplus_rule_conserves_q_with_biases_and_keeps_its_sign(seed):
    net = tiny_net(seed=seed, width=16)  # at width 4 a head pixel can have no positive input (its share is dropped)
    for action in (3, 40, 90):
        r, q = relevance(net, dense_obs(seed=seed), action, "zplus")
        assert r.sum() == pytest.approx(q, rel=1e-9, abs=1e-12)
        assert np.all(r * np.sign(q) >= 0)


@pytest.mark.parametrize("rule", ["epsilon", "zplus"])
def test_pixels_without_input_get_no_relevance(rule):
    obs = np.zeros((3, 6, 8))
    obs[0, 1, 2] = obs[0, 4, 5] = obs[1, 2, 2] = 1.0  # three atoms
    obs[2] = 0.5  # a bag plane
    r, q = relevance(tiny_net(seed=4), obs, 2 * 8 + 3, rule)
    assert np.all(r[obs == 0] == 0)
    assert np.count_nonzero(r[:2]) == 3  # the atoms' pixels carry relevance


@pytest.mark.parametrize("rule", ["epsilon", "zplus"])
def test_rolling_the_input_rolls_the_map(rule):
    net, obs = tiny_net(seed=2), dense_obs()
    i, j, shift = 1, 6, (2, 3)
    r, q = relevance(net, obs, 1 * 48 + i * 8 + j, rule)
    moved = ((i + shift[0]) % 6) * 8 + (j + shift[1]) % 8
    r2, q2 = relevance(net, np.roll(obs, shift, axis=(1, 2)), 1 * 48 + moved, rule)
    assert q2 == pytest.approx(q, abs=1e-12)
    np.testing.assert_allclose(r2, np.roll(r, shift, axis=(1, 2)), rtol=1e-9, atol=1e-12)


def test_bad_rule_and_action_are_refused_in_one_line():
    from asla.errors import AslaError
    with pytest.raises(AslaError, match="^rule: must be one of epsilon, zplus"):
        relevance(tiny_net(), dense_obs(), 0, "lrp0")
    with pytest.raises(AslaError, match="^action: must be in 0..95"):
        relevance(tiny_net(), dense_obs(), 96)


def test_shipped_agent_maps_are_finite_image_shaped_and_explain_its_own_q():
    from asla.agents.agent import Agent
    from asla.problem import load_problem
    agent, problem = Agent.load("pd100-oxide-3x3", device="cpu"), load_problem("pd100-oxide-3x3")
    before = {k: v.clone() for k, v in agent.net.state_dict().items()}
    steps = list(explain_build(agent, problem, steps=3))
    assert [s.index for s in steps] == [0, 1, 2] and len(steps[2].actions) == 2
    built = agent.build(problem)[0].actions
    for step in steps:
        e = step.explanation
        assert e.relevance.shape == step.observation.shape == (10, 18, 18)
        assert np.isfinite(e.relevance).all() and np.abs(e.relevance).max() > 0
        assert np.all(e.relevance[step.observation == 0] == 0)
        assert e.action == built[step.index]  # the greedy build asla build makes
        assert e.q == pytest.approx(float(step.q_maps[e.species, e.layer].reshape(-1)[e.point]), abs=1e-4)
        assert sum(e.shares(2, 3).values()) == pytest.approx(e.q, abs=1e-9)
    assert steps[2].explanation.shares(2, 3)["placed"] != 0  # two atoms placed by then
    assert all(torch.equal(before[k], v) for k, v in agent.net.state_dict().items())
    zplus = explain(agent, steps[2].observation, steps[2].explanation.action, rule="zplus")
    assert zplus.total == pytest.approx(zplus.q, rel=1e-6)
    explored = [s.explanation.action for s in explain_build(agent, problem, epsilon_greedy=0.5, seed=1)]
    assert explored == agent.build(problem, greedy=False, epsilon=0.5, seed=1)[0].actions != built


def test_explain_command_writes_a_picture_per_step(tmp_path, capsys):
    out = tmp_path / "maps"
    assert main(["explain", "pd100-oxide-3x3", "--problem", "pd100-oxide-3x3", "--out", str(out),
                 "--steps", "2"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["step_000.png", "step_001.png", "steps.json"]
    assert (out / "step_001.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((out / "steps.json").read_text())
    assert record["rule"] == "epsilon" and [s["step"] for s in record["steps"]] == [0, 1]
    first = record["steps"][0]
    assert first["species"] in ("Pd", "O") and first["point"] == first["i"] * 18 + first["j"]
    assert "2 steps explained" in capsys.readouterr().out


@pytest.mark.parametrize("args, field", [
    (["--steps", "0"], "--steps"), (["--rule", "alpha"], "--rule"), (["--epsilon", "1.5"], "--epsilon"),
    (["--problem", "graphene-c6"], "species mismatch"), (["--problem", "no-such-problem"], "no-such-problem"),
])
def test_explain_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, field):
    out = tmp_path / "maps"
    assert main(["explain", "pd100-oxide-3x3", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("asla: error: ") and field in err and "\n" not in err
    assert not out.exists()


def test_relevance_images_in_tensorboard_leave_the_run_unchanged(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from asla.agents.checkpoint import load_tensors
    from asla.agents.training import train

    from .recipes import tiny_cfg
    plain = train(tiny_cfg(episodes=24), run_dir=tmp_path / "plain", progress=False)
    logged = train(tiny_cfg(episodes=24, log_relevance=True), run_dir=tmp_path / "logged", progress=False)
    for key in ("best_energy", "best_actions", "energy_evaluations", "episodes"):
        assert logged[key] == plain[key], key
    a, _ = load_tensors(tmp_path / "plain" / "agent")
    b, _ = load_tensors(tmp_path / "logged" / "agent")
    assert all(torch.equal(a[k], b[k]) for k in a)
    tags = {run: EventAccumulator(str(tmp_path / run), size_guidance={"images": 0}).Reload().Tags()["images"]
            for run in ("plain", "logged")}
    assert {"relevance/step0", "relevance/best_last_step"} <= set(tags["logged"])
    assert not any(t.startswith("relevance/") for t in tags["plain"])
