"""Property-based fuzzing (hypothesis) of what a user hands asla: problems, recipes, --set values, agent cards and
weights. Each either loads, and then satisfies the invariants the schema states, or is refused with an AslaError
(the CLI's one line, exit status 2); no other exception, and no example runs past a few seconds. The examples are
bounded so that the file runs in well under a minute."""
from __future__ import annotations

import copy
import json
import math
import os
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from asla import AslaError, load_problem
from asla.problem import MAX_GRID_POINTS, shipped_problem_dir

# ASLA_FUZZ_EXAMPLES=2000 ASLA_FUZZ_SEED=random searches further than CI's fixed 150 examples per test
EXAMPLES = int(os.environ.get("ASLA_FUZZ_EXAMPLES", 150))
hypothesis_settings = settings(max_examples=EXAMPLES, deadline=None,
                               derandomize=os.environ.get("ASLA_FUZZ_SEED") != "random", database=None,
                               suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
SECONDS = 10  # per example: a hang fails the test instead of stalling the suite

BASE_PROBLEM = yaml.safe_load((shipped_problem_dir() / "tiny-pd2o.yaml").read_text())

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from([10**400, -10**400, 2**63, 0, -1, 1, 3, 0.001, 1e-9, 1e9, "1e-3", "abc",
                                           "yes", "nan", "-1", "Pd", "O", "emt", "lj", "fcc100", "cuda", "mps"]),
)
weird = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=8)
plausible = st.one_of(st.integers(-2, 8), st.floats(-1.0, 5.0), st.booleans(), st.none(),
                      st.lists(st.integers(-1, 4), min_size=1, max_size=3))  # near the edge of what is allowed
values = st.one_of(plausible, weird)

# Every problem field, some sub-fields and a few unknown ones. template.file is left out: a text such as "-" would
# make ase.io.read read standard input (a user's own file is the user's to choose).
PROBLEM_KEYS = [
    "name", "description", "cell", "cell.a", "cell.b", "cell.c", "cell.gamma", "pbc", "template", "template.surface",
    "template.symbol", "template.size", "template.a", "template.vacuum", "template.atoms", "bag", "bag.Pd", "bag.O",
    "bag.X", "sequence", "region", "region.above_template", "region.z", "region.layers", "grid", "grid.spacing",
    "grid.divisions", "grid.shape", "rules", "rules.c_min", "rules.c_max", "calculator", "calculator.name",
    "calculator.asap_cutoff", "reference", "reference.energy", "reference.note", "reference.relaxed", "relax",
    "relax.steps", "relax.fmax", "relax.optimizer", "faults", "faults.on_error", "faults.timeout", "faults.retries",
    "faults.retry_settings", "observation", "observation.template_channels", "observation.smear", "cache", "extra",
]
RECIPE_KEYS = [
    "seed", "episodes", "n_builders", "device", "torch_threads", "network", "network.width", "network.depth",
    "network.kernel", "network.dilation", "network.global_branch", "epsilon.start", "epsilon.end",
    "epsilon.decay_episodes", "temperature.start", "learning.target", "learning.lr", "learning.batch_size",
    "learning.grad_steps_per_episode", "learning.loss", "learning.replay_capacity", "learning.n_best",
    "learning.best_fraction", "learning.reward_quantile", "learning.weight_decay", "learning.warmup_episodes",
    "learning.reward", "learning.reward_resolution", "augment.exact", "checkpoint_every", "log_images_every",
    "record_evaluations", "max_evaluations", "executor", "workers", "problem_overrides", "problem_overrides.relax",
    "stop_at_reference", "learning.unknown", "nonsense",
]


@contextmanager
def time_limit(seconds: int = SECONDS):
    def hang(signum, frame):
        raise TimeoutError(f"an example ran past {seconds} s")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def refused(exc: AslaError) -> None:
    """A refusal is one line; `pytest --hypothesis-show-statistics` counts the outcomes (docs/reliability.md)."""
    assert "\n" not in str(exc) and str(exc)
    event(f"refused ({type(exc).__name__})")


def accepted(load, *args):  # any loader, whatever it returns
    """`load(*args)` within the time limit: its result, or None after checking that a refusal is one line."""
    with time_limit():
        try:
            return load(*args)
        except AslaError as exc:
            refused(exc)
            return None


def set_dotted(data: dict, key: str, value: object) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


mutations = st.lists(st.tuples(st.sampled_from(PROBLEM_KEYS), values), min_size=1, max_size=3)


def check_problem_invariants(p) -> None:  # a Problem
    """What an accepted problem promises, whatever the input was."""
    assert isinstance(p.faults.retries, int) and p.faults.retries >= 0
    assert isinstance(p.relax.steps, int) and p.relax.steps >= 0 and p.relax.fmax > 0
    assert p.faults.timeout is None or p.faults.timeout > 0
    assert all(isinstance(v, bool) for v in p.pbc)
    assert p.grid.na * p.grid.nb * p.grid.n_layers <= MAX_GRID_POINTS
    assert all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in p.bag.values())
    assert 0 < p.rules.c_min < p.rules.c_max
    assert all(math.isfinite(x) for x in p.cell.ravel())
    assert isinstance(p.calculator.get("name"), str)


@hypothesis_settings
@given(mutations)
def test_problems_load_or_are_refused_in_one_line(changes):
    data = copy.deepcopy(BASE_PROBLEM)
    for key, value in changes:
        set_dotted(data, key, value)
    problem = accepted(load_problem, data)
    if problem is not None:
        event("accepted")
        check_problem_invariants(problem)


@hypothesis_settings
@given(st.one_of(st.text(max_size=300), st.binary(max_size=200).map(lambda b: b.decode("latin-1"))),
       st.booleans())
def test_problem_files_of_any_text_or_bytes(text, as_bytes):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.yaml"
        if as_bytes:
            path.write_bytes(text.encode("latin-1", errors="replace"))
        else:
            path.write_text(yaml.safe_dump(BASE_PROBLEM) + text)  # valid YAML with anything appended
        problem = accepted(load_problem, path)
    if problem is not None:
        event("accepted")
        check_problem_invariants(problem)


def check_recipe_invariants(cfg: dict) -> None:
    learn, net = cfg["learning"], cfg["network"]
    assert learn["lr"] > 0 and learn["batch_size"] >= 1 and learn["replay_capacity"] >= 1
    assert 0 <= learn["grad_steps_per_episode"] <= 64
    assert net["kernel"] % 2 == 1 and 1 <= net["depth"] <= 64 and 1 <= net["width"] <= 1024
    assert cfg["seed"] >= 0 and cfg["episodes"] >= 1 and cfg["workers"] >= 1 and cfg["n_builders"] >= 1
    for schedule in ("epsilon", "fine_tune_epsilon"):
        assert 0 <= cfg[schedule]["start"] <= 1 and 0 <= cfg[schedule]["end"] <= 1
    assert cfg["device"] in (None, "cpu")  # no accelerator on the test machine: anything else is refused


@hypothesis_settings
@given(st.lists(st.tuples(st.sampled_from(RECIPE_KEYS), values), min_size=1, max_size=3))
def test_recipes_load_or_are_refused_in_one_line(changes):
    from asla.agents.config import load_config
    data = {"problem": "tiny-pd2o"}
    for key, value in changes:
        set_dotted(data, key, value)
    cfg = accepted(load_config, data)
    if cfg is not None:
        event("accepted")
        check_recipe_invariants(cfg)


@hypothesis_settings
@given(st.lists(st.tuples(st.sampled_from(RECIPE_KEYS + ["problem", "problem_overrides.grid.spacing"]),
                          st.text(max_size=20)), min_size=1, max_size=3))
def test_set_values_of_any_text(overrides):
    from asla.agents.config import load_config
    cfg = accepted(load_config, "tiny-pd2o", [f"{k}={v}" for k, v in overrides])
    if cfg is not None:
        event("accepted")
        check_recipe_invariants(cfg)


@pytest.fixture(scope="module")
def saved_agent(tmp_path_factory):
    from asla.agents.agent import Agent
    from asla.agents.qnetwork import NetworkConfig
    base = tmp_path_factory.mktemp("fuzz-agent") / "a"
    Agent.for_problem(load_problem("tiny-pd2o"), NetworkConfig(width=8, depth=2, kernel=3)).save(base)
    return base


CARD_KEYS = ["species", "grid_spacing", "n_layers", "in_channels", "network", "network.width", "network.depth",
             "network.kernel", "network.dilation", "network.global_branch", "network.periodic", "smear", "format",
             "problem", "card_version", "extra"]


@hypothesis_settings
@given(st.lists(st.tuples(st.sampled_from(CARD_KEYS), values), min_size=1, max_size=3))
def test_agent_cards_load_or_are_refused_in_one_line(saved_agent, changes):
    from asla.agents.agent import Agent
    card = json.loads(saved_agent.with_suffix(".json").read_text())
    for key, value in changes:
        set_dotted(card, key, value)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "a"
        base.with_suffix(".safetensors").write_bytes(saved_agent.with_suffix(".safetensors").read_bytes())
        base.with_suffix(".json").write_text(json.dumps(card))
        agent = accepted(Agent.load, base)
    if agent is None:
        return
    event("accepted")  # the network is what the weights file holds, its weights finite
    assert sum(p.numel() for p in agent.net.parameters()) == card.get("n_parameters")
    assert all(bool(p.isfinite().all()) for p in agent.net.parameters())


@hypothesis_settings
@given(st.binary(max_size=400), st.integers(0, 8000))
def test_weights_files_of_any_bytes(saved_agent, noise, cut):
    """Random bytes, and the real file truncated or with bytes overwritten: refused in one line or loaded."""
    from asla.agents.agent import Agent
    real = saved_agent.with_suffix(".safetensors").read_bytes()
    for data in (noise, real[:cut], real[:cut] + noise + real[cut + len(noise):]):
        with tempfile.TemporaryDirectory() as tmp:
            base = Path(tmp) / "a"
            base.with_suffix(".json").write_text(saved_agent.with_suffix(".json").read_text())
            base.with_suffix(".safetensors").write_bytes(data)
            agent = accepted(Agent.load, base)
            if agent is None:
                continue
            event("accepted")
            assert all(bool(p.isfinite().all()) for p in agent.net.parameters())
