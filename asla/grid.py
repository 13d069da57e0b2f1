"""The pixel grid of the build region and the lattice symmetries that map it onto itself.

Grid points live in fractional coordinates along the in-plane cell vectors a and b, so a
hexagonal cell gets a hexagonal grid and its 60 degree rotations map grid points onto grid
points exactly. A point is addressed by (layer, k) with k = i * nb + j, i along a, j along b.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from .errors import ProblemError

_SHIFTS = np.array([(di, dj) for di in (-1, 0, 1) for dj in (-1, 0, 1)], dtype=float)


class Grid:
    """Pixel grid over the periodic in-plane cell, at one or more heights (layers)."""

    def __init__(self, cell: np.ndarray, shape: tuple[int, int], layer_z: list[float], periodic: bool = True) -> None:
        cell = np.asarray(cell, dtype=float)
        if cell.shape != (3, 3):
            raise ProblemError("cell", f"must be a 3x3 matrix, got shape {cell.shape}")
        if abs(cell[0, 2]) > 1e-8 or abs(cell[1, 2]) > 1e-8:
            raise ProblemError("cell", "the in-plane vectors a and b must have no z component")
        if abs(np.linalg.det(cell)) < 1e-6:
            raise ProblemError("cell", "cell vectors are linearly dependent (zero volume)")
        self.cell = cell
        self.periodic = bool(periodic)
        self.shape = (int(shape[0]), int(shape[1]))
        self.na, self.nb = self.shape
        if self.na < 2 or self.nb < 2:
            raise ProblemError("grid.spacing", f"gives a grid of {self.shape} points; need at least 2x2")
        self.layer_z = [float(z) for z in layer_z]
        self.n_layers = len(self.layer_z)
        self.n_points = self.na * self.nb
        self.ab = cell[:2, :2]  # rows: a_xy, b_xy
        self.ab_inv = np.linalg.inv(self.ab)
        # pixel lattice vectors (rows) and Cartesian positions of every (layer, point)
        self.pixel = self.ab / np.array([[self.na], [self.nb]])
        ii, jj = np.meshgrid(np.arange(self.na), np.arange(self.nb), indexing="ij")
        self.ij = np.stack([ii.ravel(), jj.ravel()], axis=1)  # (N, 2)
        xy = self.ij @ self.pixel  # (N, 2)
        self.positions = np.zeros((self.n_layers, self.n_points, 3))
        for layer, z in enumerate(self.layer_z):
            self.positions[layer, :, :2] = xy
            self.positions[layer, :, 2] = z

    @property
    def spacing(self) -> tuple[float, float]:
        """Actual pixel size along a and b (Angstrom)."""
        return (float(np.linalg.norm(self.pixel[0])), float(np.linalg.norm(self.pixel[1])))

    def position(self, layer: int, point: int) -> np.ndarray:
        return self.positions[layer, point].copy()

    def point_index(self, i: int, j: int) -> int:
        return (i % self.na) * self.nb + (j % self.nb)

    def pixel_coords(self, xyz: np.ndarray) -> np.ndarray:
        """Continuous pixel coordinates (i, j) of Cartesian positions, wrapped into the cell."""
        xyz = np.atleast_2d(xyz)
        frac = xyz[:, :2] @ self.ab_inv
        frac -= np.floor(frac)
        return frac * np.array([self.na, self.nb])

    def nearest_point(self, xyz: np.ndarray) -> np.ndarray:
        """Index k of the grid point nearest (in pixel coordinates) to each position."""
        ij = np.rint(self.pixel_coords(xyz)).astype(int)
        return (ij[:, 0] % self.na) * self.nb + (ij[:, 1] % self.nb)

    def nearest_layer(self, z: float) -> tuple[int, float]:
        dz = np.abs(np.asarray(self.layer_z) - z)
        layer = int(np.argmin(dz))
        return layer, float(dz[layer])

    def min_image_distances(self, points: np.ndarray, xyz: np.ndarray) -> np.ndarray:
        """Shortest distances between `points` (P, 3) and atoms `xyz` (A, 3), periodic in a and b.

        Wrapping fractional differences alone is not enough for oblique cells, so the 9
        neighbouring images are checked explicitly.
        """
        xyz = np.atleast_2d(xyz)
        d = points[:, None, :] - xyz[None, :, :]  # (P, A, 3)
        if not self.periodic:
            return np.sqrt((d**2).sum(-1))
        frac = d[..., :2] @ self.ab_inv
        frac -= np.rint(frac)
        best = None
        for shift in _SHIFTS:
            dxy = (frac + shift) @ self.ab
            r2 = (dxy**2).sum(-1) + d[..., 2] ** 2
            best = r2 if best is None else np.minimum(best, r2)
        return np.sqrt(best)

    def point_matrices(self) -> list[np.ndarray]:
        """Integer 2x2 matrices acting on pixel coordinates that are rotations/mirrors of the grid.

        They preserve the pixel-lattice metric (so are orthogonal in Cartesian space) and map the
        periodic na x nb grid onto itself. Square grids give the 8 operations of D4, hexagonal
        grids the 12 of D6, rectangular ones the 4 mirrors of D2.
        """
        metric = self.pixel @ self.pixel.T
        scale = np.abs(metric).max()
        found = []
        for entries in itertools.product((-1, 0, 1), repeat=4):
            m = np.array(entries, dtype=int).reshape(2, 2)
            if abs(round(np.linalg.det(m))) != 1:
                continue
            if not np.allclose(m.T @ metric @ m, metric, atol=1e-6 * scale):
                continue
            # column c of m is the image of pixel axis c; na*e_a and nb*e_b must stay on the period lattice
            if (m[0, 1] * self.nb) % self.na or (m[1, 0] * self.na) % self.nb:
                continue
            found.append(m)
        found.sort(key=lambda m: (not np.array_equal(m, np.eye(2, dtype=int)), m.ravel().tolist()))
        return found


@dataclass
class SymmetryGroup:
    """Exact symmetries of (grid, template): pixel maps k -> M @ (i, j) + t (mod grid)."""

    grid: Grid
    matrices: np.ndarray  # (P, 2, 2) int
    translations: list[np.ndarray]  # per matrix: (T_m, 2) int, the valid translations

    @property
    def size(self) -> int:
        return int(sum(len(t) for t in self.translations))

    def all_ops(self) -> tuple[np.ndarray, np.ndarray]:
        """Every operation as (matrices (G, 2, 2), translations (G, 2))."""
        ms, ts = [], []
        for m, trans in zip(self.matrices, self.translations):
            ms.append(np.repeat(m[None], len(trans), axis=0))
            ts.append(trans)
        return np.concatenate(ms), np.concatenate(ts)

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """n operations drawn uniformly from the group."""
        counts = np.array([len(t) for t in self.translations])
        which = rng.choice(len(counts), size=n, p=counts / counts.sum())
        ms = self.matrices[which]
        ts = np.stack([self.translations[w][rng.integers(len(self.translations[w]))] for w in which])
        return ms, ts

    def apply(self, ms: np.ndarray, ts: np.ndarray, points: np.ndarray) -> np.ndarray:
        """Map point indices (..., K) by operations (..., 2, 2), (..., 2), broadcasting."""
        g = self.grid
        i, j = np.divmod(points, g.nb)
        i2 = (ms[..., 0, 0, None] * i + ms[..., 0, 1, None] * j + ts[..., 0, None]) % g.na
        j2 = (ms[..., 1, 0, None] * i + ms[..., 1, 1, None] * j + ts[..., 1, None]) % g.nb
        return i2 * g.nb + j2

    def canonical(self, species: np.ndarray, layers: np.ndarray, points: np.ndarray) -> tuple[int, ...]:
        """A key equal for all symmetry-equivalent sets of placed atoms (order ignored)."""
        if len(points) == 0:
            return ()
        ms, ts = self.all_ops()
        mapped = self.apply(ms, ts, np.broadcast_to(points, (len(ms), len(points))))
        g = self.grid
        codes = (species * g.n_layers + layers)[None, :] * g.n_points + mapped
        codes.sort(axis=1)
        best = codes[np.lexsort(codes.T[::-1])[0]]
        return tuple(int(c) for c in best)


def symmetry_group(grid: Grid, template_numbers: np.ndarray, template_positions: np.ndarray,
                   tol: float = 1e-3) -> SymmetryGroup:
    """The grid operations that also map the template onto itself (tolerance in Angstrom)."""
    matrices = grid.point_matrices()
    n_shape = np.array([grid.na, grid.nb])
    all_t = grid.ij.copy()
    kept_m, kept_t = [], []
    if not grid.periodic:
        # no translations; rotations/mirrors about the centre pixel that keep every grid point in the box
        centre = (n_shape - 1) // 2
        for m in matrices:
            t = centre - m @ centre
            q = grid.ij @ m.T + t
            if np.all((q >= 0) & (q < n_shape)) and len(template_numbers) == 0:
                kept_m.append(m)
                kept_t.append(np.array([t], dtype=int))
        if not kept_m:
            kept_m, kept_t = [np.eye(2, dtype=int)], [np.zeros((1, 2), dtype=int)]
        return SymmetryGroup(grid, np.array(kept_m), kept_t)
    if len(template_numbers) == 0:
        for m in matrices:
            kept_m.append(m)
            kept_t.append(all_t)
        return SymmetryGroup(grid, np.array(kept_m), kept_t)
    p = grid.pixel_coords(template_positions)  # continuous pixel coordinates
    z = template_positions[:, 2]
    for m in matrices:
        mapped0 = m @ p[0]
        same = (template_numbers == template_numbers[0]) & (np.abs(z - z[0]) < tol)
        cands = p[same] - mapped0
        cands = cands[np.all(np.abs(cands - np.rint(cands)) * _pixel_len(grid) < tol, axis=1)]
        good = []
        for t in np.unique(np.rint(cands).astype(int) % n_shape, axis=0):
            q = (p @ m.T + t)
            xyz = np.column_stack([(q / n_shape) @ grid.ab, z])
            d = grid.min_image_distances(xyz, template_positions)
            match = d < tol
            same_species = template_numbers[:, None] == template_numbers[None, :]
            if np.all((match & same_species).any(axis=1)):
                good.append(t)
        if good:
            kept_m.append(m)
            kept_t.append(np.array(good, dtype=int))
    return SymmetryGroup(grid, np.array(kept_m), kept_t)


def _pixel_len(grid: Grid) -> float:
    return float(min(grid.spacing))
