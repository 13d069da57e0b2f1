"""A structure under construction: placed atoms, legal-action masks and the observation image.

Actions are flat indices over (species, layer, grid point); a voxel grid's z levels are its layers, so the 3D mode
(``observation.layout: volume``) shares actions, masks, replay and rewards with the 2D one and differs only in how
the observation is laid out: stacked planes (C, na, nb) or a volume (C, n_z, na, nb). Masks are kept incrementally: each
placed atom updates, for every (species, layer, point), whether that point is now too close to an
atom (below c_min x sum of covalent radii, periodic images included) or close enough to bond
(within c_max x sum), so a step costs one distance evaluation over the grid.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ase import Atoms
from ase.data import atomic_numbers, covalent_radii

from .errors import ProblemError
from .problem import Problem


class IllegalActionError(ValueError):
    """The action breaks the placement rules, or places a species not left in the bag."""


@dataclass
class _Context:
    """Per-problem constants shared by every build: distance thresholds and template masks."""

    dmin: np.ndarray  # (S, Z) min distance between species s and atomic number z
    dmax: np.ndarray
    too_close: np.ndarray  # (S, L, N) from the template alone
    near: np.ndarray
    template_image: np.ndarray  # (T, na, nb)
    n_channels: int
    kernel: np.ndarray | None  # smear kernel over pixel offsets; None for one-hot observations


def context(problem: Problem) -> _Context:
    ctx = problem.__dict__.get("_build_context")
    if ctx is None:
        ctx = _make_context(problem)
        problem.__dict__["_build_context"] = ctx
    return ctx


def _make_context(problem: Problem) -> _Context:
    grid, rules = problem.grid, problem.rules
    r_s = np.array([covalent_radii[atomic_numbers[s]] for s in problem.species])
    r_z = np.asarray(covalent_radii)
    dmin = rules.c_min * (r_s[:, None] + r_z[None, :])
    dmax = rules.c_max * (r_s[:, None] + r_z[None, :])
    S, L, N = problem.n_species, grid.n_layers, grid.n_points
    too_close = np.zeros((S, L, N), dtype=bool)
    near = np.zeros((S, L, N), dtype=bool)
    t = problem.template
    if len(t):
        d = grid.min_image_distances(grid.positions.reshape(-1, 3), t.positions).reshape(L, N, len(t))
        too_close = (d[None] < dmin[:, t.numbers][:, None, None, :]).any(-1)
        near = (d[None] <= dmax[:, t.numbers][:, None, None, :]).any(-1)
    kernel = _smear_kernel(grid, problem.smear) if problem.smear > 0 else None
    planes = problem.template_layers
    image = np.zeros((len(planes), grid.na, grid.nb), dtype=np.float32)
    if planes:
        k = grid.nearest_point(t.positions)
        for c, z in enumerate(planes):
            sel = np.abs(t.positions[:, 2] - z) < 0.3
            image[c].reshape(-1)[k[sel]] = 1.0
        image = _smeared(image, grid, kernel)
    n_channels = (S if problem.volume else S * L) + len(planes) + S
    return _Context(dmin, dmax, too_close, near, image, n_channels, kernel)


def _smear_kernel(grid, width: float) -> np.ndarray:
    """Gaussian of `width` A over pixel offsets (di, dj), cut at 3 widths.

    Distances between grid points depend only on their pixel offset, so smearing is a convolution
    (circular on a periodic grid). A smeared picture varies smoothly when an atom moves by a pixel,
    which the Hammer group found easier to learn than one-hot pixels.
    """
    r = [int(np.ceil(3 * width / s)) for s in grid.spacing]
    di, dj = np.meshgrid(np.arange(-r[0], r[0] + 1), np.arange(-r[1], r[1] + 1), indexing="ij")
    d = np.linalg.norm(di[..., None] * grid.pixel[0] + dj[..., None] * grid.pixel[1], axis=-1)
    g = np.exp(-0.5 * (d / width) ** 2)
    g[d > 3 * width] = 0.0
    return g.astype(np.float32)


def _smeared(image: np.ndarray, grid, kernel: np.ndarray | None) -> np.ndarray:
    """Channels (C, na, nb) of one-hot atoms convolved with the smear kernel, capped at 1."""
    if kernel is None:
        return image
    if grid.periodic:  # circular convolution by FFT, all channels at once
        ft = grid.__dict__.get("_smear_ft")
        if ft is None:
            wrapped = np.zeros((grid.na, grid.nb))
            r0, r1 = kernel.shape[0] // 2, kernel.shape[1] // 2
            for (di, dj), g in np.ndenumerate(kernel):
                wrapped[(di - r0) % grid.na, (dj - r1) % grid.nb] += g
            ft = grid.__dict__["_smear_ft"] = np.fft.rfft2(wrapped)
        out = np.fft.irfft2(np.fft.rfft2(image) * ft, s=image.shape[-2:]).astype(np.float32)
    else:
        from scipy.ndimage import convolve
        out = np.stack([convolve(ch, kernel, mode="constant") for ch in image])
    return np.clip(out, 0.0, 1.0, out=out)


def observation_shape(problem: Problem) -> tuple[int, ...]:
    """(channels, na, nb) for stacked planes; (channels, n_z, na, nb) for a volume (observation.layout)."""
    grid = problem.grid
    if problem.volume:
        return (context(problem).n_channels, grid.n_layers, grid.na, grid.nb)
    return (context(problem).n_channels, grid.na, grid.nb)


def n_actions(problem: Problem) -> int:
    return problem.n_species * problem.grid.n_layers * problem.grid.n_points


def decode_action(problem: Problem, action: int) -> tuple[int, int, int]:
    L, N = problem.grid.n_layers, problem.grid.n_points
    return action // (L * N), (action // N) % L, action % N


def encode_action(problem: Problem, species: int, layer: int, point: int) -> int:
    L, N = problem.grid.n_layers, problem.grid.n_points
    return (species * L + layer) * N + point


def encode_observation(problem: Problem, species: np.ndarray, layers: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Image (C, na, nb): placed atoms per (species, layer), template planes, remaining-bag planes; or, for
    ``observation.layout: volume``, the volume (C, n_z, na, nb) with the same channels per species."""
    ctx, grid = context(problem), problem.grid
    S, L = problem.n_species, grid.n_layers
    if problem.volume:
        return _encode_volume(problem, ctx, species, layers, points)
    obs = np.zeros((ctx.n_channels, grid.na, grid.nb), dtype=np.float32)
    flat = obs.reshape(ctx.n_channels, -1)
    flat[np.asarray(species, dtype=int) * L + np.asarray(layers, dtype=int), np.asarray(points, dtype=int)] = 1.0
    if ctx.kernel is not None:
        obs[:S * L] = _smeared(obs[:S * L], grid, ctx.kernel)
    T = len(ctx.template_image)
    obs[S * L:S * L + T] = ctx.template_image
    bag = np.array([problem.bag[s] for s in problem.species], dtype=np.float32)
    used = np.bincount(np.asarray(species, dtype=int), minlength=S)[:S]
    obs[S * L + T:] = ((bag - used) / bag)[:, None, None]
    return obs


def _encode_volume(problem: Problem, ctx: _Context, species: np.ndarray, layers: np.ndarray,
                   points: np.ndarray) -> np.ndarray:
    """The volume (C, n_z, na, nb): per species its placed atoms on their z levels, then the template planes and
    the remaining-bag fractions, each the same at every z level.

    The template planes are the 2D network's, repeated along z, not voxelised into the build levels: the slab lies
    below the build region, so its atoms would fall into no level, and the bottom level sits at a fixed height
    above the top plane, which the zero padding along z lets the network find."""
    grid, S, L = problem.grid, problem.n_species, problem.grid.n_layers
    obs = np.zeros((ctx.n_channels, L, grid.na, grid.nb), dtype=np.float32)
    flat = obs.reshape(ctx.n_channels, L, -1)
    flat[np.asarray(species, dtype=int), np.asarray(layers, dtype=int), np.asarray(points, dtype=int)] = 1.0
    if ctx.kernel is not None:  # smeared in-plane on each level, as the 2D planes are
        obs[:S] = _smeared(obs[:S].reshape(S * L, grid.na, grid.nb), grid, ctx.kernel).reshape(S, L, grid.na,
                                                                                               grid.nb)
    T = len(ctx.template_image)
    obs[S:S + T] = ctx.template_image[:, None]
    bag = np.array([problem.bag[s] for s in problem.species], dtype=np.float32)
    used = np.bincount(np.asarray(species, dtype=int), minlength=S)[:S]
    obs[S + T:] = ((bag - used) / bag)[:, None, None, None]
    return obs


class BuildState:
    """One build in progress. Cheap to create: template masks are computed once per problem."""

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        self.ctx = context(problem)
        self.too_close = self.ctx.too_close.copy()
        self.near = self.ctx.near.copy()
        self.remaining = np.array([problem.bag[s] for s in problem.species])
        self.species: list[int] = []
        self.layers: list[int] = []
        self.points: list[int] = []
        self.actions: list[int] = []

    @property
    def step_index(self) -> int:
        return len(self.actions)

    @property
    def done(self) -> bool:
        return int(self.remaining.sum()) == 0

    def allowed_species(self) -> np.ndarray:
        allowed = self.remaining > 0
        seq = self.problem.sequence
        if seq is not None and not self.done:
            only = np.zeros_like(allowed)
            only[self.problem.species.index(seq[self.step_index])] = True
            allowed &= only
        return allowed

    def action_mask(self) -> np.ndarray:
        """Bool over all actions: rules satisfied and species still in the bag (and in sequence)."""
        legal = ~self.too_close
        if len(self.problem.template) or self.actions:
            legal = legal & self.near
        legal = legal & self.allowed_species()[:, None, None]
        return legal.reshape(-1)

    def is_legal(self, action: int) -> bool:
        """The action_mask() entry for one action, without building the whole mask (hot path of every step)."""
        if not 0 <= action < self.too_close.size:
            return False
        s, layer, k = decode_action(self.problem, int(action))
        if self.too_close[s, layer, k] or not self.allowed_species()[s]:
            return False
        return bool(self.near[s, layer, k]) or not (len(self.problem.template) or self.actions)

    def place(self, action: int) -> None:
        if not self.is_legal(action):
            raise IllegalActionError(f"action {action} is not legal in this state")
        s, layer, k = decode_action(self.problem, int(action))
        grid = self.problem.grid
        pos = grid.positions[layer, k]
        d = grid.min_image_distances(grid.positions.reshape(-1, 3), pos[None]).reshape(grid.n_layers, grid.n_points)
        z = atomic_numbers[self.problem.species[s]]
        self.too_close |= d[None] < self.ctx.dmin[:, z, None, None]
        self.near |= d[None] <= self.ctx.dmax[:, z, None, None]
        self.remaining[s] -= 1
        self.species.append(s)
        self.layers.append(layer)
        self.points.append(k)
        self.actions.append(int(action))

    def observation(self) -> np.ndarray:
        return encode_observation(self.problem, np.array(self.species, dtype=int),
                                  np.array(self.layers, dtype=int), np.array(self.points, dtype=int))

    def atoms(self) -> Atoms:
        """Template plus placed atoms as an ase.Atoms (no calculator attached)."""
        return atoms_from_actions(self.problem, self.actions)

    def canonical_key(self) -> tuple[int, ...]:
        return self.problem.symmetry.canonical(np.array(self.species), np.array(self.layers), np.array(self.points))


def atoms_from_actions(problem: Problem, actions: list[int] | np.ndarray) -> Atoms:
    atoms = problem.empty_atoms()
    for a in actions:
        s, layer, k = decode_action(problem, int(a))
        atoms.append(problem.species[s])
        atoms.positions[-1] = problem.grid.positions[layer, k]
    return atoms


def random_build(problem: Problem, rng: np.random.Generator) -> BuildState:
    """Uniformly random legal build; may stop early if no legal move is left (check .done)."""
    state = BuildState(problem)
    while not state.done:
        legal = np.flatnonzero(state.action_mask())
        if len(legal) == 0:
            break
        state.place(int(rng.choice(legal)))
    return state


def check_fits(problem: Problem, tries: int = 50) -> None:
    """Refuse a bag that cannot be placed: after the area check of load_problem, try random legal builds.

    Its own generator (seed 0), so it consumes no random numbers of a search. Up to `tries` builds: about a
    second on an 8x8 cell, so load_problem leaves it to ``asla check`` and to callers that ask."""
    rng = np.random.default_rng(0)
    for _ in range(tries):
        if random_build(problem, rng).done:
            return
    raise ProblemError("bag", f"{problem.bag} cannot fit the build region: no legal completion in {tries} random "
                       f"builds on a {problem.grid.shape} grid x {problem.grid.n_layers} layer(s) with "
                       f"rules c_min={problem.rules.c_min}, c_max={problem.rules.c_max}")
