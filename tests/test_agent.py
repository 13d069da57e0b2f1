"""Q-network, augmentation, checkpoints, resume, TensorBoard tags and CLI of the agent."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from asla import CheckpointError, ConfigError, load_problem
from asla.agents import augmentation
from asla.agents.agent import Agent
from asla.agents.callbacks import StopAfterEpisodes
from asla.agents.config import load_config
from asla.agents.qnetwork import NetworkConfig, QNetwork
from asla.agents.training import latest_checkpoint, train
from asla.builder import (
    BuildState,
    atoms_from_actions,
    encode_action,
    encode_observation,
    observation_shape,
    random_build,
)
from asla.reward import EnergyEvaluator
from tests.recipes import TINY, tiny_cfg


def test_same_weights_run_on_3x3_and_5x5():
    p3, p5 = load_problem("pd100-oxide-3x3"), load_problem("pd100-oxide-5x5")
    agent = Agent.for_problem(p3, NetworkConfig(width=8, depth=2, kernel=3))
    agent.check_compatible(p5)  # same species, spacing, layers, channels
    for p in (p3, p5):
        q = agent.q_values(BuildState(p).observation()[None])
        assert q.shape == (1, p.n_species * p.grid.n_layers * p.grid.n_points)
        assert np.all(np.isfinite(q))
    assert p3.grid.n_points != p5.grid.n_points


def test_network_is_translation_equivariant_with_periodic_padding():
    torch.manual_seed(0)
    net = QNetwork(3, 2, NetworkConfig(width=8, depth=2, kernel=3))
    x = torch.rand(1, 3, 12, 12)
    shifted = torch.roll(x, shifts=(5, 7), dims=(2, 3))
    q = net(x).reshape(1, 2, 12, 12)
    q_shifted = net(shifted).reshape(1, 2, 12, 12)
    assert torch.allclose(torch.roll(q, shifts=(5, 7), dims=(2, 3)), q_shifted, atol=1e-5)


@pytest.mark.parametrize("name", ["pd100-oxide-2x2", "graphene-c24"])
def test_augmentation_gives_legal_equivalent_pair_with_same_energy(name):
    problem = load_problem(name)
    rng = np.random.default_rng(3)
    ev = EnergyEvaluator(problem, use_cache=False)
    for _ in range(3):
        state = random_build(problem, rng)
        n = len(state.actions)
        t = int(rng.integers(1, n))
        pts = [np.array(state.points[:t])]
        new_pts, new_act = augmentation.exact(problem.symmetry, rng, pts, np.array([state.points[t]]))
        # the transformed prefix, then the transformed action, is a legal build sequence
        replay = BuildState(problem)
        for s, layer, k in zip(state.species[:t], state.layers[:t], new_pts[0], strict=True):
            replay.place(encode_action(problem, s, layer, int(k)))
        assert replay.action_mask()[encode_action(problem, state.species[t], state.layers[t], int(new_act[0]))]
        # every atom stays on its species channel, the atom count is unchanged
        obs = encode_observation(problem, np.array(state.species[:t]), np.array(state.layers[:t]), new_pts[0])
        L = problem.grid.n_layers
        for s in range(problem.n_species):
            assert obs[s * L:(s + 1) * L].sum() == sum(1 for x in state.species[:t] if x == s)
        # the whole transformed structure has the same energy
        ms, ts = problem.symmetry.sample(rng, 1)
        full = problem.symmetry.apply(ms[0], ts[0], np.array(state.points))
        acts = [encode_action(problem, s, layer, int(k))
                for s, layer, k in zip(state.species, state.layers, full, strict=True)]
        e0 = ev.evaluate(state.atoms()).energy
        e1 = ev.evaluate(atoms_from_actions(problem, acts)).energy
        assert e1 == pytest.approx(e0, abs=1e-6)


def test_save_load_roundtrip_and_card(tmp_path):
    p = load_problem("tiny-pd2o")
    agent = Agent.for_problem(p, NetworkConfig(width=8, depth=2, kernel=3))
    obs = BuildState(p).observation()[None]
    agent.save(tmp_path / "a", episodes=7, best_energy=1.5)
    card = json.loads((tmp_path / "a.json").read_text())
    for key in ("species", "grid_spacing", "network", "problem", "episodes", "best_energy", "asla_version"):
        assert key in card
    loaded = Agent.load(tmp_path / "a.safetensors")
    assert np.array_equal(loaded.q_values(obs), agent.q_values(obs))
    assert loaded.card["episodes"] == 7


def _forward_from_card(card: dict, weights: dict, obs: np.ndarray) -> np.ndarray:
    """The Q-network rebuilt from the card's words and the weights alone (torch.nn.functional, not QNetwork)."""
    arch = card["architecture"]
    act = {"silu": F.silu}[arch["activation"]]

    def conv(x, name, spec):
        if spec.get("padding", 0):
            p = spec["padding"]
            x = F.pad(x, (p, p, p, p), mode="circular" if spec["padding_mode"] == "circular" else "constant")
        return F.conv2d(x, weights[f"{name}.weight"], weights[f"{name}.bias"], dilation=spec.get("dilation", 1))
    x = act(conv(torch.as_tensor(obs), "stem", arch["stem"]))
    blocks = arch["blocks"]
    for n in range(blocks["count"]):
        h = conv(x, f"blocks.{n}.conv", blocks)
        if blocks["global_branch"]:
            h = h + F.linear(x.mean(dim=(2, 3)), weights[f"blocks.{n}.glob.weight"],
                             weights[f"blocks.{n}.glob.bias"])[:, :, None, None]
        x = x + act(h)
    return F.conv2d(x, weights["head.weight"], weights["head.bias"]).flatten(1).numpy()


@pytest.mark.parametrize("periodic,global_branch", [(True, True), (False, False)])
def test_card_and_weights_alone_rebuild_the_q_values(tmp_path, periodic, global_branch):
    from safetensors import safe_open
    problem = load_problem("tiny-pd2o")
    agent = Agent.for_problem(problem, NetworkConfig(width=8, depth=2, kernel=3, dilation=2, periodic=periodic,
                                                     global_branch=global_branch))
    agent.save(tmp_path / "a")
    card = json.loads((tmp_path / "a.json").read_text())
    with safe_open(tmp_path / "a.safetensors", framework="pt") as f:
        meta = f.metadata()
        weights = {k: f.get_tensor(k) for k in f.keys()}  # safe_open has no iteration
    assert meta["format"] == "asla-agent" and meta["architecture"] == card["architecture"]["name"]
    assert json.loads(meta["network"]) == card["network"] and json.loads(meta["species"]) == problem.species
    rng = np.random.default_rng(0)
    state = random_build(problem, rng)
    obs = np.stack([BuildState(problem).observation(), state.observation()])
    assert np.allclose(_forward_from_card(card, weights, obs), agent.q_values(obs), atol=1e-5)
    # the card's layout: channel names in observation order, and the action index of (species, layer, point)
    assert len(card["observation_channels"]) == observation_shape(problem)[0]
    assert card["observation_channels"][0].startswith(f"{problem.species[0]} placed on build layer 0")
    assert card["observation_channels"][-1].startswith(f"{problem.species[-1]} still in the bag")
    sizes = {"species": len(card["action_order"]["species"]), "layer": card["action_order"]["n_layers"],
             "point": problem.grid.n_points}
    index = {"species": 1, "layer": 0, "point": 5}
    layout = card["action_order"]["layout"]
    flat = np.ravel_multi_index([index[k] for k in layout], [sizes[k] for k in layout])
    assert flat == encode_action(problem, 1, 0, 5)


def test_load_refuses_mismatch_and_corrupt_files(tmp_path):
    p = load_problem("tiny-pd2o")
    agent = Agent.for_problem(p, NetworkConfig(width=8, depth=2, kernel=3))
    agent.save(tmp_path / "a")
    loaded = Agent.load(tmp_path / "a")
    with pytest.raises(CheckpointError, match="species mismatch"):
        loaded.check_compatible(load_problem("graphene-c24"))
    other_spacing = load_problem("tiny-pd2o", **{"grid.spacing": 0.457})
    with pytest.raises(CheckpointError, match="grid spacing mismatch"):
        loaded.check_compatible(other_spacing)
    (tmp_path / "a.safetensors").write_bytes(b"\x80\x04garbage-pickle-like-bytes")
    with pytest.raises(CheckpointError, match="safetensors"):
        Agent.load(tmp_path / "a")
    (tmp_path / "b.json").write_text('{"format": "something-else"}')
    (tmp_path / "b.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="not an asla-agent card"):
        Agent.load(tmp_path / "b")
    with pytest.raises(CheckpointError, match="no agent"):
        Agent.load(tmp_path / "missing")


def test_resume_after_interruption_is_bit_for_bit(tmp_path):
    full = train(tiny_cfg(episodes=48, seed=5), run_dir=tmp_path / "full", progress=False)
    part = train(tiny_cfg(episodes=48, seed=5), run_dir=tmp_path / "part", progress=False,
                 callbacks=[StopAfterEpisodes(28)])  # stops as a kill would: no checkpoint at 28
    assert part["episodes"] == 28  # checkpoint at 20, then 8 episodes that the resume must redo
    assert latest_checkpoint(tmp_path / "part").name == "ckpt-00000020"
    resumed = train(None, run_dir=tmp_path / "part", resume=True, progress=False)
    assert resumed["episodes"] == 48
    assert resumed["best_energy"] == full["best_energy"]
    assert resumed["energy_evaluations"] == full["energy_evaluations"]
    assert resumed["history"] == [dict(h, seconds=r["seconds"])
                                  for h, r in zip(full["history"], resumed["history"], strict=True)]
    a, b = Agent.load(tmp_path / "full"), Agent.load(tmp_path / "part")
    for (k, va), (_, vb) in zip(a.net.state_dict().items(), b.net.state_dict().items(), strict=True):
        assert torch.equal(va, vb), k
    from ase.db import connect
    episodes = [row.episode for row in connect(str(tmp_path / "part" / "evaluations.db")).select()]
    assert len(episodes) == len(set(episodes)) == resumed["structures_evaluated"]


def test_run_dir_holds_tensorboard_tags_and_outputs(tmp_path):
    train(tiny_cfg(episodes=40), run_dir=tmp_path / "run", progress=False)
    run = tmp_path / "run"
    for f in ("config.yaml", "problem.yaml", "agent.safetensors", "agent.json", "best.extxyz", "summary.json",
              "evaluations.db", "checkpoints/latest"):
        assert (run / f).exists(), f
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run), size_guidance={"images": 0, "histograms": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("charts/episode_energy", "charts/best_energy", "charts/epsilon", "charts/episodes_per_second",
                "charts/energy_evaluations", "losses/q_loss", "losses/q_mean"):
        assert tag in tags["scalars"], tag
    assert "structures/best" in tags["images"]
    assert any(t.startswith("q_values/") for t in tags["images"])
    assert "charts/episode_energies" in tags["histograms"]
    assert any("hyperparameters" in t for t in tags["tensors"])
    # the HParams tab: the recipe's scalars, with the run's charts as metrics
    from tensorboard.plugins.hparams import plugin_data_pb2
    content = acc.PluginTagToContent("hparams")
    exp = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in exp.metric_infos} >= {"charts/best_energy", "charts/energy_evaluations"}
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["learning.lr"].number_value == pytest.approx(tiny_cfg()["learning"]["lr"])
    assert start.hparams["problem"].string_value == "tiny-pd2o" and start.hparams["seed"].number_value == 0
    from ase.io import read
    best = read(run / "best.extxyz", index=":")
    energies = [a.get_potential_energy() for a in best]
    assert energies == sorted(energies)


def test_existing_run_dir_is_not_overwritten_and_bad_recipe_is_refused(tmp_path):
    train(tiny_cfg(episodes=20), run_dir=tmp_path / "run", progress=False)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(tiny_cfg(episodes=20), run_dir=tmp_path / "run", progress=False)
    with pytest.raises(ConfigError, match="learning.lr_typo"):
        load_config({"problem": "tiny-pd2o", "learning": {"lr_typo": 1}})
    with pytest.raises(ConfigError, match="learning.loss"):
        load_config({"problem": "tiny-pd2o"}, ["learning.loss=l1"])


def test_init_from_with_mismatched_species_is_refused(tmp_path):
    p = load_problem("graphene-c24")
    Agent.for_problem(p, NetworkConfig(width=8, depth=2, kernel=3)).save(tmp_path / "carbon")
    with pytest.raises(CheckpointError, match="species mismatch"):
        train(tiny_cfg(episodes=8), run_dir=tmp_path / "run", init_from=tmp_path / "carbon", progress=False)


def test_cli_train_and_build(tmp_path, capsys):
    from asla.cli import main
    assert main(["train", "configs/tiny-pd2o.yaml", "--run-dir", str(tmp_path / "r"), "--no-progress",
                 "--set", "episodes=24", "--set", "network.width=8"]) == 0
    out = tmp_path / "built.extxyz"
    assert main(["build", str(tmp_path / "r"), "--episodes", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "single pt (eV)" in text and "vs reference" in text and out.exists()
    assert main(["build", str(tmp_path / "r"), "--problem", "graphene-c24"]) == 2
    assert "species mismatch" in capsys.readouterr().err
    assert observation_shape(load_problem("tiny-pd2o"))[0] == Agent.load(tmp_path / "r").in_channels


def test_arbitrary_rotation_option_regrids_onto_the_grid_and_trains(tmp_path):
    problem = load_problem("graphene-c24")
    rng = np.random.default_rng(0)
    state = random_build(problem, rng)
    pts = [np.array(state.points[:10])]
    new_pts, new_act = augmentation.arbitrary_rotation(problem.symmetry, rng, pts, np.array([state.points[10]]))
    assert len(new_pts[0]) == 10 and 0 <= new_act[0] < problem.grid.n_points
    assert np.all((0 <= new_pts[0]) & (new_pts[0] < problem.grid.n_points))
    # a 60 degree rotation about a grid point is exact on the hexagonal grid: distances are preserved
    grid = problem.grid
    rotated = augmentation.rotate_points(grid, pts[0], np.pi / 3, int(pts[0][0]))
    d0 = grid.min_image_distances(grid.positions[0, pts[0]], grid.positions[0, pts[0]])
    d1 = grid.min_image_distances(grid.positions[0, rotated], grid.positions[0, rotated])
    assert np.allclose(d0, d1, atol=1e-6)
    # any other angle snaps each atom to within half the longer pixel diagonal of its exactly rotated position
    theta, centre = 0.4, int(pts[0][3])
    snapped = augmentation.rotate_points(grid, pts[0], theta, centre)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    c = grid.positions[0, centre, :2]
    exact_xy = (grid.positions[0, pts[0], :2] - c) @ rot.T + c
    exact_xyz = np.column_stack([exact_xy, np.full(len(exact_xy), grid.layer_z[0])])
    err = [grid.min_image_distances(grid.positions[0, [k]], x[None])[0, 0]
           for k, x in zip(snapped, exact_xyz, strict=True)]
    half_diagonal = max(np.linalg.norm(grid.pixel[0] + grid.pixel[1]),
                        np.linalg.norm(grid.pixel[0] - grid.pixel[1])) / 2
    assert 0 < max(err) <= half_diagonal + 1e-9
    summary = train(tiny_cfg(episodes=12, augment={"exact": True, "arbitrary_rotation": True}),
                    run_dir=tmp_path / "rot", progress=False)
    assert summary["episodes"] == 12


def test_recipe_can_add_relaxation_before_the_reward(tmp_path):
    cfg = load_config({"problem": "tiny-pd2o", **TINY, "episodes": 8}, ["problem_overrides.relax.steps=3"])
    assert cfg["problem_overrides"] == {"relax": {"steps": 3}}
    summary = train(cfg, run_dir=tmp_path / "run", progress=False)
    # every structure costs the single point plus up to three relaxation steps
    assert summary["structures_evaluated"] < summary["energy_evaluations"] <= 4 * summary["structures_evaluated"]
    import yaml
    assert yaml.safe_load((tmp_path / "run" / "problem.yaml").read_text())["relax"]["steps"] == 3


def test_evaluation_budget_stops_training_and_fractional_gradient_steps(tmp_path):
    summary = train(tiny_cfg(episodes=1000, max_evaluations=12, learning={**tiny_cfg()["learning"],
                                                                          "grad_steps_per_episode": 0.5}),
                    run_dir=tmp_path / "run", progress=False)
    assert 12 <= summary["energy_evaluations"] < 12 + TINY["n_builders"]
    assert summary["episodes"] < 1000
    assert (tmp_path / "run" / "checkpoints" / "latest").exists()  # the last state is saved when the budget ends
    meta = json.loads((tmp_path / "run" / "checkpoints" / (tmp_path / "run" / "checkpoints" / "latest")
                       .read_text().strip() / "trainer.json").read_text())
    assert meta["state"]["grad_credit"] in (0.0, 0.5)
