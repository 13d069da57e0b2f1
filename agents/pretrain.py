"""Supervised pretraining: known structures, built in random orders, teach the Q-network before reinforcement.

Meldgaard et al. 2022 (and the group's talk: "1000 supervised episodes on (3x3), then reinforcement on (5x5)"):
a known structure, built atom by atom in any legal order, is a demonstration whose every step is worth the
structure's reward. Here the structures come from an extxyz file or an ase.db (another search method's database, a
previous run's evaluations.db, the problem's reference structure), and pretraining reads top to bottom:

1. read: every structure of the files, with its stored energy (`read_structures`), and optionally `random`
   uniformly random legal builds, evaluated as training evaluates them: the contrast a set of good structures lacks
   (without it nothing tells the network that the actions no demonstration takes are worse);
2. snap: each onto the problem's grid (`snap`): the template's atoms are recognised and dropped, each placed atom
   goes to its nearest grid point; a structure that does not fit (cell, template, composition, an atom farther
   than the tolerance from every grid point, two atoms on one point, the placement rules) is skipped with its
   reason, and the reasons are counted and reported;
3. orders: several random legal build orders per structure (`build_orders`), all ending in the same build;
4. energies: by default each snapped build is evaluated with the problem's calculator as the training loop's
   evaluator does (`asla.reward.EnergyEvaluator`: single point, or the recipe's relaxation steps), so a transition
   gets the reward reinforcement would give it; ``energy="stored"`` uses the file's energies instead (no
   calculator calls; those are the original, often relaxed, structures' energies);
5. learn: the orders go into the training loop's replay buffer (`asla.agents.replay.ReplayBuffer`) and the
   structures' energies into its reward scale (`asla.reward.RewardScale`), and the loop's own gradient step
   (`asla.agents.training._learn_step`: the recipe's target, loss, batch, best_fraction, order_free and symmetry
   augmentation) runs `steps` times;
6. save: the agent (safetensors + JSON card, as `Agent.save`), pretrain.json (what was used and skipped) and the
   TensorBoard events (losses/pretrain_q, losses/pretrain_q_mean) into the output folder, which
   ``asla train RECIPE --init-from FOLDER`` fine-tunes.

Everything is checked before anything is written; the same seed gives the same agent.
"""
from __future__ import annotations

import math
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from asla.builder import BuildState, atoms_from_actions, decode_action, encode_action
from asla.errors import ConfigError
from asla.problem import load_problem
from asla.reward import EnergyEvaluator, RewardScale
from asla.storage import write_json

from .agent import Agent
from .config import load_config
from .qnetwork import NetworkConfig
from .replay import Episode, ReplayBuffer

if TYPE_CHECKING:
    from ase import Atoms

    from asla.problem import Problem

PRETRAIN_FORMAT = "asla-pretrain"  # pretrain.json
DEFAULT_TOLERANCE = 0.5  # A: an atom farther than this from every grid point does not fit the grid
CELL_TOLERANCE = 0.01  # A: the structure's in-plane cell vectors must be the problem's
ENERGY_MODES = ("evaluate", "stored")
DATA_SUFFIXES = (".extxyz", ".xyz", ".traj", ".db", ".json")


class DoesNotFit(Exception):
    """A structure that cannot be a build of this problem; the message is the reason (first word: its kind)."""

    @property
    def kind(self) -> str:
        return str(self).split(":")[0]


@dataclass
class Known:
    """A structure read from a file: where it came from, the atoms and the energy stored with them (nan: none)."""

    source: str
    atoms: Atoms
    energy: float


@dataclass
class Demonstration:
    """A structure snapped onto the grid: its build orders (each a list of actions) and the energy they are worth."""

    source: str
    orders: list[list[int]]
    energy: float
    stored_energy: float
    key: tuple[int, ...]
    snap_distance: float  # A: the largest distance an atom moved to its grid point


@dataclass
class PretrainReport:
    """What pretraining used and skipped (pretrain.json)."""

    format: str = PRETRAIN_FORMAT
    problem: str = ""
    data: list[str] = field(default_factory=list)
    read: int = 0
    used: int = 0  # structures of the files used
    skipped: dict[str, int] = field(default_factory=dict)  # reason kind -> count
    skipped_examples: dict[str, str] = field(default_factory=dict)  # reason kind -> the first such reason in full
    duplicates: int = 0  # structures that snapped onto a build already used (symmetry included)
    random: int = 0  # uniformly random legal builds used besides them, as contrast
    orders: int = 0
    episodes: int = 0
    steps: int = 0
    energy: str = "evaluate"
    evaluations: int = 0  # calculator evaluations spent on the snapped builds (energy: evaluate)
    tolerance: float = DEFAULT_TOLERANCE
    seed: int = 0
    energies: dict[str, float] = field(default_factory=dict)  # lowest, median, highest of the used structures
    reward_bounds: list[float] = field(default_factory=list)  # the reward scale's (E_low, E_high)
    loss_first: float | None = None  # mean loss of the first and last tenth of the steps
    loss_last: float | None = None
    seconds: float = 0.0


# ---- 1. read ----------------------------------------------------------------------------------------

def read_structures(path: str | Path) -> list[Known]:
    """Every structure of an extxyz/xyz/traj file or an ase.db (.db, .json, or a database URL), with its energy.

    ASE reads them; trajectories are ASE's own format, never pickles. A file that cannot be read is a ConfigError
    naming --data."""
    name = str(path)
    is_db = "://" in name or Path(name).suffix in (".db", ".json")
    if "://" not in name:
        p = Path(name)
        if not p.is_file():
            raise ConfigError("--data", f"file {name!r} does not exist")
        if p.suffix not in DATA_SUFFIXES:
            raise ConfigError("--data", f"{name!r}: unknown kind of file; allowed: {', '.join(DATA_SUFFIXES)} or an "
                              "ase.db URL")
    try:
        if is_db:
            from asla.storage import open_db
            rows = [(row.id, row.toatoms(), row.get("energy")) for row in open_db(name).select()]
            return [Known(f"{name}@id={i}", a, math.nan if e is None else float(e)) for i, a, e in rows]
        from ase.io import read
        frames = read(name, index=":")
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad input file, reported in one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError("--data", f"cannot read {name!r}: {first[:200]}") from None
    return [Known(f"{name}@{n}", a, _stored_energy(a)) for n, a in enumerate(frames)]


def random_structures(problem: Problem, n: int, rng: np.random.Generator, evaluator: EnergyEvaluator) -> list[Known]:
    """`n` uniformly random legal builds (`asla.builder.random_build`; dead ends are drawn again, at most 10 n
    draws), each with its energy from `evaluator`, as the training loop's first, random, episodes get it."""
    from asla.builder import random_build
    out: list[Known] = []
    for _ in range(10 * n):
        if len(out) == n:
            break
        state = random_build(problem, rng)
        if state.done:
            # the grid build itself: the evaluator's atoms are relaxed when the problem relaxes before the reward
            ev = evaluator.evaluate(state.atoms(), key=state.canonical_key())
            out.append(Known(f"random-build@{len(out)}", state.atoms(), ev.energy if ev.ok else math.nan))
    return out


def _stored_energy(atoms: Atoms) -> float:
    if atoms.calc is not None and "energy" in getattr(atoms.calc, "results", {}):
        return float(atoms.calc.results["energy"])
    e = atoms.info.get("energy")
    return float(e) if isinstance(e, (int, float)) else math.nan


# ---- 2. snap ----------------------------------------------------------------------------------------

def snap(problem: Problem, atoms: Atoms, tolerance: float = DEFAULT_TOLERANCE) -> tuple[list[int], float]:
    """The build (actions, in the structure's atom order) that puts `atoms` on the problem's grid, and the largest
    distance an atom moved; DoesNotFit with the reason where it cannot.

    The template's atoms are found by position (the same element within `tolerance`, periodic images included,
    matched one to one) and dropped; the rest must be the bag, and each goes to the nearest (layer, grid point) in
    3D, which must lie within `tolerance`. Two atoms on one point, or a build that breaks the placement rules in
    every order, do not fit either (checked by `build_orders`)."""
    from scipy.optimize import linear_sum_assignment
    grid, template = problem.grid, problem.template
    cell = np.asarray(atoms.cell.array, dtype=float)
    if np.abs(cell[:2, :2] - np.asarray(problem.cell, dtype=float)[:2, :2]).max() > CELL_TOLERANCE:
        raise DoesNotFit(f"cell: the in-plane cell {np.round(cell[:2, :2], 3).tolist()} is not the problem's "
                         f"{np.round(np.asarray(problem.cell)[:2, :2], 3).tolist()}")
    rest = np.ones(len(atoms), dtype=bool)
    symbols = np.array(atoms.get_chemical_symbols())
    for sym in sorted(set(template.get_chemical_symbols())):
        t_idx = np.flatnonzero(np.array(template.get_chemical_symbols()) == sym)
        a_idx = np.flatnonzero(symbols == sym)
        if len(a_idx) < len(t_idx):
            raise DoesNotFit(f"template: the structure has {len(a_idx)} {sym}, the template alone {len(t_idx)}")
        d = grid.min_image_distances(template.positions[t_idx], atoms.positions[a_idx])
        rows, cols = linear_sum_assignment(d)
        worst = int(np.argmax(d[rows, cols]))
        if d[rows[worst], cols[worst]] > tolerance:
            raise DoesNotFit(f"template: template atom {int(t_idx[rows[worst]])} ({sym}) has no {sym} of the "
                             f"structure within {tolerance} A (nearest {d[rows[worst], cols[worst]]:.2f} A)")
        rest[a_idx[cols]] = False
    placed = np.flatnonzero(rest)
    have = Counter(symbols[placed].tolist())
    if have != Counter(problem.bag):
        formula = "".join(f"{s}{have[s]}" for s in sorted(have)) or "nothing"
        raise DoesNotFit(f"composition: besides the template the structure has {formula}, the bag is "
                         f"{''.join(f'{s}{n}' for s, n in problem.bag.items())}")
    flat = grid.positions.reshape(-1, 3)
    d = grid.min_image_distances(flat, atoms.positions[placed])  # (L * N, A)
    nearest = d.argmin(axis=0)
    moved = d[nearest, np.arange(len(placed))]
    if len(moved) and moved.max() > tolerance:
        i = int(np.argmax(moved))
        raise DoesNotFit(f"off-grid: atom {int(placed[i])} ({symbols[placed[i]]}) is {moved[i]:.2f} A from the "
                         f"nearest grid point (tolerance {tolerance} A)")
    seen: dict[int, int] = {}
    for i, k in enumerate(nearest.tolist()):
        if k in seen:
            raise DoesNotFit(f"overlap: atoms {int(placed[seen[k]])} and {int(placed[i])} snap to the same grid point")
        seen[k] = i
    n_points = grid.n_points
    actions = [encode_action(problem, problem.species.index(symbols[placed[i]]), k // n_points, k % n_points)
               for i, k in enumerate(nearest.tolist())]
    return actions, float(moved.max()) if len(moved) else 0.0


# ---- 3. orders --------------------------------------------------------------------------------------

def build_orders(problem: Problem, actions: list[int], n: int, rng: np.random.Generator) -> list[list[int]]:
    """`n` random legal orders of one build: at each step a uniform choice among its atoms that are legal now.

    The placement rules' lower bound (c_min) does not depend on the order and their upper bound (c_max) only grows
    with what is placed, so a build that is connected and free of clashes completes in every such order, and every
    order ends in the same build. DoesNotFit when it does not (a clash, or an atom out of reach of the rest)."""
    orders = []
    for _ in range(n):
        state, left = BuildState(problem), list(actions)
        while left:
            legal = [a for a in left if state.is_legal(a)]
            if not legal:
                raise DoesNotFit(_why_stuck(problem, state, left))
            a = legal[int(rng.integers(len(legal)))]
            state.place(a)
            left.remove(a)
        orders.append(list(state.actions))
    return orders


def _why_stuck(problem: Problem, state: BuildState, left: list[int]) -> str:
    for a in left:
        s, layer, k = decode_action(problem, a)
        if state.too_close[s, layer, k]:
            return (f"rules: a {problem.species[s]} sits closer than c_min={problem.rules.c_min} x (sum of covalent "
                    "radii) to another atom once on the grid")
    if problem.sequence is not None:
        return "rules: no order that the problem's sequence allows builds it"
    return (f"rules: an atom is farther than c_max={problem.rules.c_max} x (sum of covalent radii) from every other "
            "atom and the template (not connected)")


# ---- 4. demonstrations (snap, orders, energies) -----------------------------------------------------------

def demonstrations(problem: Problem, known: list[Known], orders: int, rng: np.random.Generator,
                   tolerance: float = DEFAULT_TOLERANCE, energy: str = "evaluate",
                   evaluator: EnergyEvaluator | None = None, report: PretrainReport | None = None
                   ) -> list[Demonstration]:
    """The structures that fit, each with `orders` build orders and its energy; the rest counted in `report`.

    Structures that snap onto the same build (up to the problem's symmetry) are one demonstration (with stored
    energies the lowest is kept)."""
    if energy not in ENERGY_MODES:
        raise ConfigError("--energy", f"must be one of {', '.join(ENERGY_MODES)}, got {energy!r}")
    report = report if report is not None else PretrainReport()
    evaluator = evaluator or EnergyEvaluator(problem)
    by_key: dict[tuple[int, ...], Demonstration] = {}
    for item in known:
        try:
            actions, moved = snap(problem, item.atoms, tolerance)
            built = build_orders(problem, actions, orders, rng)
            if energy == "stored" and not math.isfinite(item.energy):
                raise DoesNotFit("energy: the file stores no energy for it (use --energy evaluate)")
        except DoesNotFit as why:
            report.skipped[why.kind] = report.skipped.get(why.kind, 0) + 1
            report.skipped_examples.setdefault(why.kind, f"{item.source}: {why}")
            continue
        state = BuildState(problem)
        for a in built[0]:
            state.place(a)
        key = state.canonical_key()
        if key in by_key:
            report.duplicates += 1
            old = by_key[key]
            if energy == "stored" and item.energy < old.energy:
                old.energy = old.stored_energy = item.energy
            continue
        by_key[key] = Demonstration(item.source, built, item.energy, item.energy, key, moved)
    demos = list(by_key.values())
    if energy == "evaluate":
        for demo in demos:
            ev = evaluator.evaluate(atoms_from_actions(problem, demo.orders[0]), key=demo.key)
            demo.energy = ev.energy if ev.ok else math.nan
        failed = [d for d in demos if not math.isfinite(d.energy)]
        if failed:
            report.skipped["calculator"] = len(failed)
            report.skipped_examples["calculator"] = f"{failed[0].source}: the calculator failed on its grid build"
        demos = [d for d in demos if math.isfinite(d.energy)]
        report.evaluations = evaluator.n_calls
    return demos


# ---- 5. learn, 6. save -------------------------------------------------------------------------------

def pretrain(config: dict | str, data: list[str | Path], out: str | Path, steps: int = 1000, orders: int = 8,
             energy: str = "evaluate", tolerance: float = DEFAULT_TOLERANCE, random: int = 0,
             overrides: list[str] | None = None, progress: bool = False) -> PretrainReport:
    """Pretrain the recipe's Q-network on the structures of `data` and save it in the folder `out`.

    The recipe gives the problem (with its problem_overrides), the network, the learning options (target, loss, lr,
    batch_size, best_fraction, order_free, reward, reward_quantile, n_best), the augmentation and the seed, as for
    training. `random`: that many uniformly random legal builds join the structures (evaluated, and counted in the
    report's evaluations). The replay buffer holds every order of every structure. Returns the report (also
    out/pretrain.json).
    """
    t0 = time.perf_counter()
    cfg = load_config(config, overrides)
    _check_options(data, out, steps, orders, tolerance, energy, random)
    problem = load_problem(cfg["problem"], **cfg["problem_overrides"])
    torch.set_num_threads(int(cfg["torch_threads"]))
    rng = np.random.default_rng(cfg["seed"])
    torch.manual_seed(cfg["seed"])
    # the agent first, as the training loop builds it after seeding: the same seed gives the same initial network
    agent = Agent.for_problem(problem, NetworkConfig(**cfg["network"], periodic=bool(problem.pbc[0])),
                              device=cfg["device"])
    report = PretrainReport(problem=problem.name, data=[str(d) for d in data], orders=orders, steps=steps,
                            energy=energy, tolerance=tolerance, seed=int(cfg["seed"]), random=random)
    known = [k for path in data for k in read_structures(path)]
    report.read = len(known)
    evaluator = EnergyEvaluator(problem, use_cache=True)
    demos = demonstrations(problem, known, orders, rng, tolerance, energy, evaluator, report)
    if not demos:
        reasons = "; ".join(f"{n} {kind} ({report.skipped_examples[kind]})" for kind, n in report.skipped.items())
        raise ConfigError("--data", f"none of the {report.read} structures fits problem {problem.name}: "
                          f"{reasons or 'the files hold no structures'}")
    report.used = len(demos)
    if random:  # each evaluated once here; demonstrations() finds it in the evaluator's cache
        demos += demonstrations(problem, random_structures(problem, random, rng, evaluator), orders, rng, tolerance,
                                energy, evaluator, report)
        report.random = len(demos) - report.used
    report.evaluations = evaluator.n_calls
    learn_cfg = cfg["learning"]
    replay, scale = ReplayBuffer(sum(len(d.orders) for d in demos), learn_cfg["n_best"]), RewardScale(
        quantile=learn_cfg["reward_quantile"], kind=learn_cfg["reward"], resolution=learn_cfg["reward_resolution"])
    for demo in demos:
        for order in demo.orders:
            replay.add(Episode(order, demo.energy, demo.key, -1))
    scale.update([d.energy for d in demos])  # one energy per structure: the orders do not move the quantile
    report.episodes = len(replay.recent)
    e = np.array([d.energy for d in demos])
    report.energies = {"lowest": float(e.min()), "median": float(np.median(e)), "highest": float(e.max())}
    report.reward_bounds = [float(b) for b in scale.bounds()]
    optimizer = torch.optim.Adam(agent.net.parameters(), lr=learn_cfg["lr"], weight_decay=learn_cfg["weight_decay"])
    out = Path(out)
    losses = _learn(agent, optimizer, problem, replay, scale, rng, cfg, steps, out, progress)
    tenth = max(1, steps // 10)
    report.loss_first, report.loss_last = float(np.mean(losses[:tenth])), float(np.mean(losses[-tenth:]))
    report.seconds = time.perf_counter() - t0
    name = cfg["problem"] if isinstance(cfg["problem"], str) else cfg["name"]
    card_keys = ("data", "used", "random", "orders", "steps", "energy", "evaluations", "seed")
    command = cfg.get("command") or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    agent.save(out / "agent", problem=name, episodes=0, best_energy=report.energies["lowest"], trained_with=command,
               pretrained={k: v for k, v in asdict(report).items() if k in card_keys})
    write_json(out / "pretrain.json", asdict(report))
    return report


def _check_options(data: list[str | Path], out: str | Path, steps: int, orders: int, tolerance: float,
                   energy: str, random: int) -> None:
    """The options, before anything is read or written."""
    if not data:
        raise ConfigError("--data", "give at least one extxyz file or ase.db of structures")
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError("--steps", f"gradient steps must be a positive integer, got {steps!r}")
    if not isinstance(orders, int) or orders < 1:
        raise ConfigError("--orders", f"build orders per structure must be a positive integer, got {orders!r}")
    if not isinstance(random, int) or random < 0:
        raise ConfigError("--random", f"random builds must be a non-negative integer, got {random!r}")
    if not (isinstance(tolerance, (int, float)) and 0 < tolerance <= 5):
        raise ConfigError("--tolerance", f"must be a distance in A in (0, 5], got {tolerance!r}")
    if energy not in ENERGY_MODES:
        raise ConfigError("--energy", f"must be one of {', '.join(ENERGY_MODES)}, got {energy!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError("--out", f"{out} is a file; give a folder (made if missing)")
    if (out / "agent.json").exists() or (out / "agent.safetensors").exists():
        raise ConfigError("--out", f"{out} already holds an agent; give another folder")


def _learn(agent: Agent, optimizer: torch.optim.Optimizer, problem: Problem, replay: ReplayBuffer,
           scale: RewardScale, rng: np.random.Generator, cfg: dict[str, Any], steps: int, out: Path,
           progress: bool) -> list[float]:
    """`steps` gradient steps of the training loop's own learner; losses to TensorBoard in `out`."""
    from torch.utils.tensorboard import SummaryWriter
    from tqdm.auto import tqdm

    from .training import _learn_step
    out.mkdir(parents=True, exist_ok=True)
    losses = []
    with SummaryWriter(str(out)) as writer:
        for step in tqdm(range(steps), disable=not progress, unit="step", dynamic_ncols=True):
            loss, q_mean = _learn_step(agent, optimizer, problem, replay, scale, rng, cfg["learning"], cfg["augment"])
            losses.append(loss)
            writer.add_scalar("losses/pretrain_q", loss, step)
            writer.add_scalar("losses/pretrain_q_mean", q_mean, step)
    return losses
