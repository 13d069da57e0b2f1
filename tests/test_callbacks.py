"""The training loop's callbacks (asla.agents.callbacks) and the state_dict of each stateful part: a callback that
stops the run, the evaluation budget as a callback, files added to a checkpoint before it is published, a probe that
changes nothing, and the checkpoint format that older run directories were written in."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from asla.agents.callbacks import BaseCallback, CheckpointHook, MaxEvaluations, ThroughputProbe
from asla.agents.training import TrainState, latest_checkpoint, train
from asla.reward import RewardScale
from tests.recipes import TINY, tiny_cfg


def without_seconds(history):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


class StopAfterIterations(BaseCallback):
    """Stops after `n` iterations and keeps a log of the hooks it saw."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.calls, self.energies = n, [], []

    def on_training_start(self) -> None:
        self.calls.append("start")

    def on_rollout_end(self, builds) -> None:
        self.calls.append(f"rollout:{len(builds)}")

    def on_evaluated(self, builds, atoms, evaluations) -> None:
        assert len(builds) == len(atoms) == len(evaluations) and all(b.done for b in builds)
        self.energies += [ev.energy for ev in evaluations]
        self.calls.append("evaluated")

    def on_iteration_end(self) -> bool:
        self.calls.append("end")
        return self.trainer.state.iterations < self.n

    def on_checkpoint(self, directory) -> None:
        self.calls.append("checkpoint")

    def on_training_end(self) -> None:
        self.calls.append("training_end")


def test_custom_callback_stops_the_run_and_sees_every_hook(tmp_path):
    stopper = StopAfterIterations(3)
    summary = train(tiny_cfg(episodes=400), run_dir=tmp_path / "run", progress=False, callbacks=stopper)
    assert summary["episodes"] == 3 * TINY["n_builders"]
    per_iteration = ["rollout:4", "evaluated", "end"]
    assert stopper.calls == ["start", *per_iteration * 3, "checkpoint", "training_end"]
    # the stop publishes a last checkpoint (checkpoint_on_stop), which a resume takes up from
    assert latest_checkpoint(tmp_path / "run").name == "ckpt-00000012"
    finite = [e for e in stopper.energies if math.isfinite(e)]
    assert summary["best_energy"] == min(finite)


def test_budget_callback_is_the_recipe_key_and_a_spent_budget_resumes_to_nothing(tmp_path):
    by_key = train(tiny_cfg(episodes=1000, max_evaluations=12), run_dir=tmp_path / "key", progress=False)
    by_callback = train(tiny_cfg(episodes=1000), run_dir=tmp_path / "cb", progress=False,
                        callbacks=[MaxEvaluations(12)])
    assert 12 <= by_key["energy_evaluations"] < 12 + TINY["n_builders"]
    assert by_key["episodes"] < 1000
    for k in ("episodes", "energy_evaluations", "best_energy", "best_actions"):
        assert by_key[k] == by_callback[k], k
    assert without_seconds(by_key["history"]) == without_seconds(by_callback["history"])
    resumed = train(None, run_dir=tmp_path / "key", resume=True, progress=False)
    assert resumed["episodes"] == by_key["episodes"]  # the budget stays spent: no further iteration
    assert resumed["energy_evaluations"] == by_key["energy_evaluations"]


def test_on_checkpoint_adds_a_file_inside_the_published_checkpoint(tmp_path):
    seen = []

    class Ledger(BaseCallback):
        def on_checkpoint(self, directory) -> None:
            # called before publication: 'latest' does not point here yet
            assert latest_checkpoint(self.trainer.run_dir) != directory
            (directory / "ledger.json").write_text(json.dumps({"episodes": self.trainer.state.episodes}))
            seen.append(directory.name)

    legacy = []
    train(tiny_cfg(episodes=40), run_dir=tmp_path / "run", progress=False, callbacks=[Ledger()],
          on_checkpoint=lambda d: legacy.append(d.name))  # the keyword from before callbacks still works
    latest = latest_checkpoint(tmp_path / "run")
    assert seen == legacy == ["ckpt-00000020", "ckpt-00000040"]
    assert json.loads((latest / "ledger.json").read_text()) == {"episodes": 40}
    assert CheckpointHook(print).checkpoint_on_stop  # a hook never decides about stopping


def test_a_probe_that_stops_nothing_leaves_the_run_unchanged(tmp_path):
    plain = train(tiny_cfg(episodes=32, seed=3), run_dir=tmp_path / "plain", progress=False)
    probe = ThroughputProbe()
    probed = train(tiny_cfg(episodes=32, seed=3), run_dir=tmp_path / "probed", progress=False, callbacks=[probe])
    for k in ("episodes", "energy_evaluations", "structures_evaluated", "best_energy", "best_actions"):
        assert plain[k] == probed[k], k
    assert without_seconds(plain["history"]) == without_seconds(probed["history"])
    # single points: one calculator call per structure the calculator saw (cache hits left out)
    assert len(probe.evaluated) == probed["structures_evaluated"]
    assert sum(calls for _, _, calls in probe.evaluated) == probed["energy_evaluations"]
    assert all(a is not None and len(a) > 0 for a, _, _ in probe.evaluated)
    assert 0 < probe.calculator_seconds <= probed["timing_seconds"]["calculator"]
    assert [ep for ep, _ in probe.iterations] == list(range(4, 33, 4))


def test_reward_scale_and_train_state_round_trip_through_json():
    scale = RewardScale(quantile=0.8, kind="log", resolution=0.02)
    fresh = RewardScale(quantile=0.8, kind="log", resolution=0.02)
    fresh.load_state_dict(json.loads(json.dumps(RewardScale().state_dict())))
    assert fresh.low == math.inf and fresh.energies == [] and fresh.bounds() == (0.0, 1.0)
    scale.update([3.0, float("nan"), 1.5, 7.0, 2.25])
    copy = RewardScale(quantile=0.8, kind="log", resolution=0.02)
    copy.load_state_dict(json.loads(json.dumps(scale.state_dict())))
    assert copy.energies == scale.energies == [3.0, 1.5, 7.0, 2.25] and copy.low == 1.5
    assert copy.bounds() == scale.bounds()
    energies = np.array([1.5, 2.0, 9.0, np.nan])
    assert np.array_equal(copy(energies), scale(energies))

    state = TrainState(episodes=12, best_energy=1.5, best_actions=[3, 1], history=[{"episode": 4}])
    state.timing["learn"] = 0.25
    back = TrainState()
    back.load_state_dict(json.loads(json.dumps(state.state_dict())))
    assert back == state
    old = state.state_dict()
    old["timing"] = {k: v for k, v in old["timing"].items() if k != "rollout_forward"}  # an older checkpoint
    back.load_state_dict(old)
    assert back.timing["rollout_forward"] == 0.0 and back.timing["learn"] == 0.25


def test_checkpoint_keeps_the_format_older_run_directories_hold(tmp_path):
    from safetensors.torch import load_file
    train(tiny_cfg(episodes=20), run_dir=tmp_path / "run", progress=False)
    latest = latest_checkpoint(tmp_path / "run")
    meta = json.loads((latest / "trainer.json").read_text())
    assert list(meta) == ["format", "optimizer", "replay", "evaluator", "scale", "state", "rng"]
    assert meta["format"] == "asla-trainer"
    assert set(meta["optimizer"]) == {"param_groups", "scalars"} and set(meta["scale"]) == {"energies", "low"}
    assert meta["rng"]["bit_generator"] == "PCG64"
    tensors = load_file(latest / "trainer.safetensors")
    assert "torch_rng" in tensors and {k.split(".")[2] for k in tensors if k.startswith("opt.")} == \
        {"step", "exp_avg", "exp_avg_sq"}


def test_a_callback_stop_at_iteration_start_checkpoints_nothing(tmp_path):
    class Never(BaseCallback):
        def on_iteration_start(self) -> bool:
            return False

    summary = train(tiny_cfg(episodes=40), run_dir=tmp_path / "run", progress=False, callbacks=[Never()])
    assert summary["episodes"] == 0 and latest_checkpoint(tmp_path / "run") is None
    with pytest.raises(Exception, match="no checkpoint yet"):
        train(None, run_dir=tmp_path / "run", resume=True, progress=False)
