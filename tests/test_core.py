"""Problems, grid, placement rules, rewards, environment: the core everything else stands on."""
from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes

import asla.envs
from asla import CalculatorError, ProblemError, list_problems, load_problem
from asla.builder import BuildState, encode_action, encode_observation, random_build
from asla.calculators import make_calculator, make_safe_tersoff
from asla.problem import covalent_radius
from asla.reward import EnergyEvaluator, RewardScale
from asla.storage import write_structures

SHIPPED = list_problems()


# ---- grid ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["pd100-oxide-3x3", "graphene-c24"])
def test_grid_round_trip_atom_pixel_atom(name):
    grid = load_problem(name).grid
    rng = np.random.default_rng(0)
    k = rng.integers(grid.n_points, size=50)
    for layer in range(grid.n_layers):
        xyz = grid.positions[layer, k]
        assert np.array_equal(grid.nearest_point(xyz), k)
        # shifted by whole cell vectors: the same point
        shifted = xyz + grid.cell[0] * 2 - grid.cell[1]
        assert np.array_equal(grid.nearest_point(shifted), k)
        assert grid.nearest_layer(xyz[0, 2])[0] == layer


@pytest.mark.parametrize("name", ["pd100-oxide-2x2", "graphene-c24"])
def test_min_image_distances_match_ase(name):
    p = load_problem(name)
    grid = p.grid
    rng = np.random.default_rng(1)
    pts = grid.positions.reshape(-1, 3)[rng.integers(grid.n_points * grid.n_layers, size=30)]
    ours = grid.min_image_distances(pts, pts)
    atoms = Atoms("H" * len(pts), positions=pts, cell=p.cell, pbc=p.pbc)
    assert np.allclose(ours, atoms.get_all_distances(mic=True), atol=1e-9)


def test_symmetry_groups():
    pd = load_problem("pd100-oxide-3x3")
    assert len(pd.symmetry.matrices) == 8  # D4
    assert pd.symmetry.size == 8 * 9       # x the 3x3 surface translations
    g = load_problem("graphene-c24")
    assert len(g.symmetry.matrices) == 12  # D6
    assert g.symmetry.size == 12 * g.grid.n_points
    # every operation maps the template onto itself
    t = pd.template
    ms, ts = pd.symmetry.all_ops()
    ij = pd.grid.pixel_coords(t.positions)
    for m, tr in zip(ms, ts):
        q = ij @ m.T + tr
        xyz = np.column_stack([(q / [pd.grid.na, pd.grid.nb]) @ pd.grid.ab, t.positions[:, 2]])
        d = pd.grid.min_image_distances(xyz, t.positions)
        assert np.all(d.min(axis=1) < 1e-6)


# ---- problems and their errors ------------------------------------------------------------

def test_every_shipped_problem_loads():
    assert {"tiny-pd2o", "pd100-oxide-2x2", "pd100-oxide-3x3", "pd100-oxide-5x5", "graphene-c24"} <= set(SHIPPED)
    for name in SHIPPED:
        p = load_problem(name)
        assert p.n_atoms == sum(p.bag.values()) > 0


BASE = {"template": {"surface": "fcc100", "symbol": "Pd", "size": [2, 2, 2], "a": 3.8787, "vacuum": 6.0},
        "bag": {"Pd": 2, "O": 1}, "region": {"above_template": [1.2]}, "grid": {"spacing": 0.686, "divisions": [2, 2]},
        "rules": {"c_min": 0.7, "c_max": 1.4}, "calculator": {"name": "emt"}}


@pytest.mark.parametrize("change, field, words", [
    ({"bag": {"Xx": 1}}, "bag.Xx", "unknown element"),
    ({"colour": "red"}, "colour", "allowed"),
    ({"calculator": {"name": "vasp-magic"}}, "calculator.name", "allowed: emt"),
    ({"cell": [[1, 0, 0], [2, 0, 0], [0, 0, 1]], "template": None}, "cell", "linearly dependent"),
    ({"bag": {"Pd": 40}}, "bag", "cannot fit"),
    ({"sequence": ["Pd", "Pd", "Pd"]}, "sequence", "must use each bag atom once"),
    ({"sequence": ["Pd", "Au", "O"]}, "sequence[1]", "not in the bag"),
    ({"rules": {"c_min": 1.5, "c_max": 1.4}}, "rules.c_max", "must exceed"),
    ({"grid": {"spacing": -1}}, "grid.spacing", "positive"),
    ({"bag": {"C": 3}}, "calculator.name", "EMT is wrong for carbon"),
    ({"template": {"surface": "fcc999", "symbol": "Pd"}}, "template.surface", "allowed: fcc100"),
    ({"relax": {"optimizer": "Newton"}}, "relax.optimizer", "allowed: BFGS"),
])
def test_bad_problem_gives_one_line_error_naming_the_field(change, field, words):
    data = {**BASE, **change}
    with pytest.raises(ProblemError) as err:
        load_problem(data)
    msg = str(err.value)
    assert msg.startswith(field + ":"), msg
    assert words in msg and "\n" not in msg


def test_yaml_file_and_overrides(tmp_path):
    import yaml
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(BASE))
    p = load_problem(path, **{"rules.c_min": 0.65})
    assert p.name == "mine" and p.rules.c_min == 0.65
    (tmp_path / "broken.yaml").write_text("bag: {Pd: [")
    with pytest.raises(ProblemError, match="not valid YAML"):
        load_problem(tmp_path / "broken.yaml")
    with pytest.raises(ProblemError, match="unknown problem 'nope'"):
        load_problem("nope")


# ---- placement rules ------------------------------------------------------------------------

@pytest.mark.parametrize("name", SHIPPED)
def test_random_builds_obey_the_rules_including_images(name):
    p = load_problem(name)
    rng = np.random.default_rng(7)
    n_t = len(p.template)
    for _ in range(5 if p.n_atoms < 30 else 2):
        state = random_build(p, rng)
        atoms = state.atoms()
        d = atoms.get_all_distances(mic=True)
        r = np.array([covalent_radius(s) for s in atoms.get_chemical_symbols()])
        lim = r[:, None] + r[None, :]
        for i in range(n_t, len(atoms)):
            others = np.arange(i) if i else np.array([], int)
            assert np.all(d[i, others] >= p.rules.c_min * lim[i, others] - 1e-9)
            if len(others):
                assert np.any(d[i, others] <= p.rules.c_max * lim[i, others] + 1e-9)


def test_periodic_image_blocks_a_point_across_the_cell_edge():
    p = load_problem({**BASE, "template": None, "cell": {"a": 6.0, "c": 10.0}, "pbc": [True, True, False],
                      "region": {"z": 5.0}, "grid": {"shape": [20, 20]}, "bag": {"Pd": 2}})
    s = BuildState(p)
    s.place(encode_action(p, 0, 0, p.grid.point_index(0, 0)))
    mask = s.action_mask().reshape(p.grid.na, p.grid.nb)
    dmin = p.rules.c_min * 2 * covalent_radius("Pd")
    # the point one pixel "below" the origin is 0.3 A away only through the periodic image
    assert not mask[p.grid.na - 1, 0]
    far = int(math.ceil(dmin / p.grid.spacing[0]))
    assert mask[far + 1, 0] or mask[far + 2, 0]


def test_forced_sequence_masks_other_species():
    p = load_problem({**BASE, "sequence": ["O", "Pd", "Pd"]})
    s = BuildState(p)
    L, N = p.grid.n_layers, p.grid.n_points
    m = s.action_mask().reshape(p.n_species, L * N)
    assert not m[p.species.index("Pd")].any() and m[p.species.index("O")].any()


# ---- rewards ---------------------------------------------------------------------------------

def test_energy_matches_direct_ase_calculation():
    for name in ("pd100-oxide-2x2", "graphene-c24"):
        p = load_problem(name)
        state = random_build(p, np.random.default_rng(2))
        atoms = state.atoms()
        ours = EnergyEvaluator(p).evaluate(atoms).energy
        direct = atoms.copy()
        direct.calc = make_calculator(p.calculator)
        assert ours == pytest.approx(direct.get_potential_energy(), abs=1e-9)


def test_tersoff_one_neighbour_case():
    from ase.calculators.tersoff import Tersoff
    cell = [[10, 0, 0], [0, 10, 0], [0, 0, 10]]
    dimer = Atoms("C2", positions=[[0, 0, 0], [1.4, 0, 0]], cell=cell, pbc=True)
    chain = Atoms("C3", positions=[[0, 0, 0], [1.4, 0, 0], [2.6, 0.8, 0]], cell=cell, pbc=True)
    plain = Tersoff(parameters=make_safe_tersoff().parameters)
    d = dimer.copy()
    d.calc = plain
    with pytest.raises(ZeroDivisionError):
        d.get_potential_energy()  # why we patch: ASE 3.29 divides by zero for one neighbour
    for atoms in (dimer, chain):
        a = atoms.copy()
        a.calc = make_safe_tersoff()
        e, f = a.get_potential_energy(), a.get_forces()
        assert np.isfinite(e) and np.all(np.isfinite(f))
        h = 1e-5
        for i in range(len(a)):  # forces agree with finite differences of the energy
            for c in range(3):
                b = a.copy()
                b.calc = make_safe_tersoff()
                b.positions[i, c] += h
                ep = b.get_potential_energy()
                b.positions[i, c] -= 2 * h
                em = b.get_potential_energy()
                assert -(ep - em) / (2 * h) == pytest.approx(f[i, c], abs=1e-4)


class Broken(Calculator):
    implemented_properties = ["energy"]

    def __init__(self, mode: str = "raise", **kw):
        super().__init__(**kw)
        self.mode = mode

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        if self.mode == "raise":
            raise RuntimeError("SCF did not converge")
        self.results = {"energy": float("nan")}


@pytest.mark.parametrize("mode", ["raise", "nan"])
def test_failing_calculator_gives_flagged_worst_outcome_or_error(tmp_path, mode):
    spec = {"name": "tests.test_core:Broken", "mode": mode}
    p = load_problem({**BASE, "calculator": spec})
    atoms = random_build(p, np.random.default_rng(0)).atoms()
    ev = EnergyEvaluator(p, failure_dir=tmp_path / "failures")
    res = ev.evaluate(atoms)
    assert not res.ok and math.isnan(res.energy)
    assert ("SCF did not converge" if mode == "raise" else "non-finite energy") in res.error
    assert len(list((tmp_path / "failures").glob("failed-*.extxyz"))) == 1
    assert RewardScale()([res.energy])[0] == -1.0
    strict = load_problem({**BASE, "calculator": spec, "faults": {"on_error": "raise"}})
    with pytest.raises(CalculatorError):
        EnergyEvaluator(strict).evaluate(atoms)


def test_cache_answers_symmetry_equivalent_builds():
    p = load_problem("pd100-oxide-2x2")
    state = random_build(p, np.random.default_rng(4))
    ev = EnergyEvaluator(p)
    first = ev.evaluate(state.atoms(), key=state.canonical_key())
    ms, ts = p.symmetry.sample(np.random.default_rng(5), 1)
    moved = p.symmetry.apply(ms[0], ts[0], np.array(state.points))
    other = BuildState(p)
    for s, layer, k in zip(state.species, state.layers, moved):
        other.place(encode_action(p, s, layer, int(k)))
    assert other.canonical_key() == state.canonical_key()
    second = ev.evaluate(other.atoms(), key=other.canonical_key())
    assert second.cached and ev.n_calls == 1 and second.energy == first.energy
    direct = EnergyEvaluator(p, use_cache=False).evaluate(other.atoms()).energy
    assert direct == pytest.approx(first.energy, abs=1e-6)


def test_structures_written_with_ase_keep_energies(tmp_path):
    from ase.db import connect
    from ase.io import read
    p = load_problem("tiny-pd2o")
    ev = EnergyEvaluator(p)
    frames = [ev.evaluate(random_build(p, np.random.default_rng(i)).atoms()).atoms for i in range(3)]
    write_structures(tmp_path / "s.extxyz", frames)
    write_structures(tmp_path / "s.db", frames)
    back = read(tmp_path / "s.extxyz", index=":")
    rows = list(connect(str(tmp_path / "s.db")).select())
    want = [a.get_potential_energy() for a in frames]
    assert [a.get_potential_energy() for a in back] == pytest.approx(want)
    assert [r.energy for r in rows] == pytest.approx(want)


def test_database_write_is_not_blocked_by_a_killed_writers_lock_file(tmp_path):
    """SIGKILL mid-write leaves ASE's `<db>.lock` behind; a resumed run's writes must not wait on it forever."""
    import threading

    from asla.storage import append_db, open_db
    p = load_problem("tiny-pd2o")
    frames = [EnergyEvaluator(p).evaluate(random_build(p, np.random.default_rng(0)).atoms()).atoms]
    db = tmp_path / "evaluations.db"
    append_db(db, frames, run="a")
    (tmp_path / "evaluations.db.lock").write_text("")  # what a writer killed inside ASE's lock leaves
    writer = threading.Thread(target=append_db, args=(db, frames), kwargs={"run": "b"}, daemon=True)
    writer.start()
    writer.join(timeout=30)
    assert not writer.is_alive(), "append_db waits on a stale lock file"
    assert [r.run for r in open_db(db).select()] == ["a", "b"]


# ---- environment ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", SHIPPED)
def test_env_checker_and_random_rollout(name):
    from gymnasium.utils.env_checker import check_env
    env = gym.make(asla.envs.ENV_IDS[name], render_mode="rgb_array")
    check_env(env.unwrapped)
    obs, info = env.reset(seed=0)
    rng = np.random.default_rng(0)
    done, reward = False, 0.0
    while not done:
        assert env.observation_space.contains(obs)
        a = int(rng.choice(np.flatnonzero(info["action_mask"])))
        assert np.array_equal(info["action_mask"], env.unwrapped.action_masks())
        obs, reward, term, trunc, info = env.step(a)
        done = term or trunc
    assert -1.0 <= reward <= 1.0
    if term:
        p = env.unwrapped.problem
        assert np.isfinite(info["energy"]) and len(info["atoms"]) == len(p.template) + p.n_atoms
    img = env.render()
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3


@pytest.mark.parametrize("name,smear", [("pd100-oxide-3x3", 0.0), ("pd100-oxide-3x3", 0.4), ("graphene-c24", 0.4)])
def test_observation_transforms_with_the_lattice_symmetry(name, smear):
    p = load_problem(name, **{"observation.smear": smear})
    state = random_build(p, np.random.default_rng(3))
    ms, ts = p.symmetry.sample(np.random.default_rng(9), 4)
    for m, t in zip(ms, ts):
        moved = p.symmetry.apply(m, t, np.array(state.points))
        obs_moved = encode_observation(p, np.array(state.species), np.array(state.layers), moved)
        obs = state.observation()
        # permuting the pixels of the original image by the same operation gives the new image
        perm = p.symmetry.apply(m, t, np.arange(p.grid.n_points))
        expected = np.empty_like(obs).reshape(obs.shape[0], -1)
        expected[:, perm] = obs.reshape(obs.shape[0], -1)
        assert np.allclose(expected.reshape(obs.shape), obs_moved, atol=1e-5)


@pytest.mark.parametrize("name", ["graphene-c24", "benzene-xtb"])
def test_smeared_observation_is_a_gaussian_of_the_given_width(name):
    width = 0.4
    p = load_problem(name, **{"observation.smear": width})
    grid = p.grid
    k = grid.point_index(grid.na // 2, grid.nb // 2)
    obs = encode_observation(p, np.array([0]), np.array([0]), np.array([k]))[0].reshape(-1)
    d = grid.min_image_distances(grid.positions[0], grid.positions[0, [k]])[:, 0]
    expected = np.where(d <= 3 * width, np.exp(-0.5 * (d / width) ** 2), 0.0)
    assert obs[k] == pytest.approx(1.0, abs=1e-6) and np.allclose(obs, expected, atol=1e-5)
    with pytest.raises(ProblemError, match="observation.smear"):
        load_problem(name, **{"observation.smear": -1})


def test_illegal_action_places_nothing_and_is_not_punished():
    env = gym.make("asla/tiny-pd2o-v0").unwrapped
    obs, info = env.reset(seed=0)
    illegal = int(np.flatnonzero(~info["action_mask"])[0])
    obs2, r, term, trunc, info2 = env.step(illegal)
    assert info2["illegal_action"] and r == 0.0 and not term and not trunc
    assert np.array_equal(obs, obs2)


def test_maskable_ppo_drives_the_env_unchanged():
    sb3c = pytest.importorskip("sb3_contrib")
    from sb3_contrib.common.wrappers import ActionMasker
    env = gym.make("asla/tiny-pd2o-v0")
    env = ActionMasker(env, lambda e: e.unwrapped.action_masks())
    model = sb3c.MaskablePPO("MlpPolicy", env, n_steps=60, batch_size=30, n_epochs=2, seed=0, verbose=0,
                             policy_kwargs={"net_arch": [32]})
    model.learn(total_timesteps=300)
    obs, info = env.reset(seed=1)
    finished = 0
    for _ in range(30):
        action, _ = model.predict(obs, action_masks=env.unwrapped.action_masks(), deterministic=False)
        assert env.unwrapped.action_masks()[int(action)]
        obs, r, term, trunc, info = env.step(int(action))
        if term or trunc:
            finished += term
            obs, info = env.reset()
    assert finished >= 3


def test_cli_problems_check_random_and_errors(tmp_path, capsys):
    from ase.io import read

    from asla.cli import main
    assert main(["problems"]) == 0
    assert "pd100-oxide-3x3" in capsys.readouterr().out
    assert main(["check", "graphene-c24"]) == 0
    assert "symmetry operations 6912" in capsys.readouterr().out
    out = tmp_path / "r.extxyz"
    assert main(["random", "tiny-pd2o", "--episodes", "5", "--out", str(out)]) == 0
    frames = read(out, index=":")
    assert len(frames) == 5 and all(np.isfinite(a.get_potential_energy()) for a in frames)
    bad = tmp_path / "bad.yaml"
    bad.write_text("bag: {Xx: 1}\ncell: {a: 5, c: 10}\n")
    capsys.readouterr()  # drop the progress bar of the random run
    assert main(["check", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("asla: error: bag.Xx: unknown element") and "\n" not in err


@pytest.mark.parametrize("name", ["pd100-oxide-2x2", "graphene-c24", "tiny-pd2o"])
def test_is_legal_agrees_with_the_mask(name):
    p = load_problem({**load_problem(name).to_dict(), "sequence": None} if name != "tiny-pd2o" else
                     {**load_problem(name).to_dict(), "sequence": ["O", "Pd", "Pd"]})
    rng = np.random.default_rng(0)
    state = BuildState(p)
    for _ in range(min(p.n_atoms, 6)):
        mask = state.action_mask()
        probe = np.concatenate([rng.integers(len(mask), size=200), np.flatnonzero(mask)[:20], [-1, len(mask)]])
        for a in probe:
            assert state.is_legal(int(a)) == (0 <= a < len(mask) and bool(mask[a]))
        state.place(int(rng.choice(np.flatnonzero(mask))))
