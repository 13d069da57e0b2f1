"""Stable-Baselines3 out of the box: MaskablePPO's CnnPolicy with asla's PeriodicCnn on every shipped env, the
stationary reward modes, and the extractor's periodic padding."""
from __future__ import annotations

import dataclasses

import gymnasium as gym
import numpy as np
import pytest

import asla
from asla.errors import ConfigError
from asla.problem import list_problems, load_problem

pytest.importorskip("stable_baselines3")
sb3_contrib = pytest.importorskip("sb3_contrib")
torch = pytest.importorskip("torch")

from sb3_contrib import MaskablePPO  # noqa: E402 - after the importorskip that guards it
from sb3_contrib.common.wrappers import ActionMasker  # noqa: E402 - after the importorskip that guards it
from stable_baselines3.common.callbacks import BaseCallback  # noqa: E402 - after the importorskip that guards it

from asla.envs.sb3 import PeriodicCnn, maskable_ppo_policy_kwargs  # noqa: E402 - needs stable_baselines3

# Calculators too slow (xtb, DFT) or too heavy to load (an MLIP) for a few-step smoke test: these problems run with
# a cheap stand-in for the same elements; the env, its spaces and masks are the problem's own.
STAND_IN = {"tblite": {"name": "emt"}, "gpaw": {"name": "tersoff"}, "chgnet": {"name": "emt"}}


def make_env(name: str, **kwargs) -> gym.Env:
    problem = load_problem(name)
    stand_in = STAND_IN.get(problem.calculator["name"])
    if stand_in == {"name": "tersoff"} and set(problem.bag) != {"C"}:
        stand_in = {"name": "emt"}  # Tersoff is carbon's stand-in; EMT that of metals and their oxides (GPAW on Pd/O)
    if stand_in is not None:
        problem = dataclasses.replace(problem, calculator=stand_in)
    return gym.make(asla.envs.ENV_IDS[name], problem=problem, **kwargs)


class Builds(BaseCallback):
    """Counts illegal actions taken and the finished builds' energies (from info)."""

    def __init__(self) -> None:
        super().__init__()
        self.illegal = 0
        self.energies: list[float] = []

    def _on_step(self) -> bool:
        for info in self.locals["infos"]:
            self.illegal += bool(info.get("illegal_action"))
            if "energy" in info:
                self.energies.append(info["energy"])
        return True


def test_cnn_policy_learns_a_few_hundred_steps_on_tiny_pd2o_with_masks():
    env = gym.make("asla/tiny-pd2o-v0", reward_mode="fixed")
    model = MaskablePPO("CnnPolicy", env, policy_kwargs=maskable_ppo_policy_kwargs(env, features_dim=64),
                        n_steps=128, batch_size=64, n_epochs=2, seed=0)
    assert isinstance(model.policy.features_extractor, PeriodicCnn)
    builds = Builds()
    model.learn(384, callback=builds)
    assert model.num_timesteps >= 384
    assert builds.illegal == 0  # the env's action_masks() reached the policy
    assert len(builds.energies) >= 384 // env.unwrapped.problem.n_atoms // 2
    assert np.isfinite(builds.energies).all()
    assert min(builds.energies) >= env.unwrapped.problem.reference_energy - 1e-6  # the enumerated minimum


def test_action_masker_wrapper_works_too():
    env = ActionMasker(gym.make("asla/tiny-pd2o-v0"), lambda e: e.unwrapped.action_masks())
    model = MaskablePPO("CnnPolicy", env, policy_kwargs=maskable_ppo_policy_kwargs(env), n_steps=32, batch_size=16,
                        n_epochs=1, seed=0)
    builds = Builds()
    model.learn(32, callback=builds)
    assert builds.illegal == 0 and builds.energies


@pytest.mark.parametrize("name", list_problems())
def test_cnn_policy_runs_on_every_shipped_env(name):
    env = make_env(name)
    model = MaskablePPO("CnnPolicy", env, policy_kwargs=maskable_ppo_policy_kwargs(env), n_steps=16, batch_size=8,
                        n_epochs=1, seed=0)
    builds = Builds()
    model.learn(16, callback=builds)
    assert model.num_timesteps == 16 and builds.illegal == 0
    pbc = env.unwrapped.problem.pbc
    assert model.policy.features_extractor.cnn[0].periodic == (pbc[0], pbc[1])


# ---- stationary rewards ---------------------------------------------------------------------------------------------
def rollout(env: gym.Env, pick) -> tuple[float, dict]:
    """One episode choosing ``pick(legal actions)`` each step; the last reward and info."""
    _, info = env.reset(seed=0)
    while True:
        _, reward, term, trunc, info = env.step(int(pick(np.flatnonzero(info["action_mask"]))))
        if term or trunc:
            assert term, "the deterministic build hit a dead end"
            return reward, info


def first(legal):
    return legal[0]


def last(legal):
    return legal[-1]


@pytest.mark.parametrize("mode", ["energy", "fixed"])
def test_stationary_reward_is_the_same_for_the_same_build_in_two_episodes(mode):
    env = gym.make("asla/tiny-pd2o-v0", reward_mode=mode)
    r1, info1 = rollout(env, first)
    rollout(env, last)  # another build in between, which would move the scaled reward's bounds
    r2, info2 = rollout(env, first)
    assert r1 == r2 and info1["energy"] == info2["energy"]
    p = env.unwrapped.problem
    if mode == "energy":
        assert r1 == -info1["energy"]
    else:
        assert r1 == pytest.approx(np.clip(1 - (info1["energy"] - p.reference_energy) / p.n_atoms, -1, 1))


def test_scaled_reward_moves_between_episodes_and_stays_the_default():
    env = gym.make("asla/tiny-pd2o-v0")
    assert env.unwrapped.reward_mode == "scaled"
    energies = {}
    rewards = {}
    for name, pick in [("a", first), ("b", last), ("a2", first)]:
        rewards[name], info = rollout(env, pick)
        energies[name] = info["energy"]
    assert energies["a"] != energies["b"]  # two different structures, so the scale's bounds move
    assert rewards["a"] != rewards["a2"]


def test_fixed_reward_hits_one_at_the_reference_and_failures_get_the_floor():
    env = gym.make("asla/tiny-pd2o-v0", reward_mode="fixed").unwrapped
    ref = env.problem.reference_energy
    assert env._reward(ref, True) == 1.0
    assert env._reward(ref + env.problem.n_atoms, True) == pytest.approx(0.0)
    assert env._reward(float("nan"), False) == -1.0
    energy_env = gym.make("asla/tiny-pd2o-v0", reward_mode="energy").unwrapped
    assert energy_env.failure_reward < -(ref + env.problem.n_atoms)  # below every build the fixed mode resolves


def test_bad_reward_mode_and_missing_reference_are_one_clear_error():
    with pytest.raises(ConfigError, match="reward_mode: unknown 'raw'; allowed: scaled, energy, fixed"):
        gym.make("asla/tiny-pd2o-v0", reward_mode="raw")
    with pytest.raises(ConfigError, match="fixed_scale"):
        gym.make("asla/tiny-pd2o-v0", reward_mode="fixed", fixed_scale=0.0)
    no_reference = dataclasses.replace(make_env("tiny-pd2o").unwrapped.problem, reference={})
    assert no_reference.reference_energy is None
    with pytest.raises(ConfigError, match="needs the problem's reference energy"):
        gym.make("asla/AtomBuild-v0", problem=no_reference, reward_mode="fixed")


# ---- the extractor's padding ----------------------------------------------------------------------------------------
def extractor(periodic, shape=(5, 9, 7)) -> PeriodicCnn:
    torch.manual_seed(0)
    space = gym.spaces.Box(0.0, 1.0, shape=shape, dtype=np.float32)
    return PeriodicCnn(space, features_dim=16, periodic=periodic).double()


def test_periodic_padding_makes_pooled_features_invariant_to_whole_pixel_shifts():
    x = torch.rand(2, 5, 9, 7, dtype=torch.float64)
    net = extractor((True, True))
    shifted = torch.roll(x, shifts=(3, -2), dims=(2, 3))
    assert torch.allclose(net.pooled(x), net.pooled(shifted), atol=1e-10)
    assert torch.allclose(net(x), net(shifted), atol=1e-10)
    # and the convolution maps are shifted with the input (equivariance), pixel for pixel
    assert torch.allclose(torch.roll(net.cnn(x), shifts=(3, -2), dims=(2, 3)), net.cnn(shifted), atol=1e-10)


def test_zero_padding_along_non_periodic_axes():
    x = torch.rand(2, 5, 9, 7, dtype=torch.float64)
    along_a = torch.roll(x, shifts=3, dims=2)
    along_b = torch.roll(x, shifts=3, dims=3)
    net = extractor((True, False))
    assert torch.allclose(net.pooled(x), net.pooled(along_a), atol=1e-10)
    assert not torch.allclose(net.pooled(x), net.pooled(along_b), atol=1e-6)
    molecule = extractor((False, False))
    assert not torch.allclose(molecule.pooled(x), molecule.pooled(along_a), atol=1e-6)


def test_the_extractor_runs_on_any_grid_size():
    net = extractor((True, True), shape=(5, 8, 8))
    for h, w in [(8, 8), (12, 12), (30, 18)]:
        assert net(torch.rand(1, 5, h, w, dtype=torch.float64)).shape == (1, 16)


@pytest.mark.parametrize("mode", ["energy", "fixed"])
def test_stationary_modes_pass_gymnasiums_env_checker(mode):
    from gymnasium.utils.env_checker import check_env
    check_env(gym.make("asla/tiny-pd2o-v0", reward_mode=mode).unwrapped)
