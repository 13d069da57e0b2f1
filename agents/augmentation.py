"""Rotational data augmentation: a structure and its symmetry images get the same reward.

States are stored as lists of placed atoms (species, layer, grid point), so an exact lattice
symmetry is applied to the atoms and the action alike before the image is encoded: the
template is invariant under the group by construction, and every atom keeps its species.
"""
from __future__ import annotations

import numpy as np

from asla.grid import SymmetryGroup


def exact(group: SymmetryGroup, rng: np.random.Generator, points: list[np.ndarray], action_points: np.ndarray,
          owner: np.ndarray | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """Apply one random group operation per sample to its placed atoms and its action points.

    ``owner[i]`` is the sample that action point i belongs to (default: one action per sample).
    """
    owner = np.arange(len(points)) if owner is None else np.asarray(owner)
    ms, ts = group.sample(rng, len(points))
    new_points = [group.apply(m, t, p) if len(p) else p for m, t, p in zip(ms, ts, points)]
    new_actions = group.apply(ms[owner], ts[owner], np.asarray(action_points)[:, None])[:, 0]
    return new_points, new_actions


def arbitrary_rotation(group: SymmetryGroup, rng: np.random.Generator, points: list[np.ndarray],
                       action_points: np.ndarray,
                       owner: np.ndarray | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """Rotate by a random angle about a random grid point and snap back to the grid.

    Not an exact symmetry under periodic boundaries (the papers use it as a regulariser), and
    two atoms may snap onto one point; use as an option, after the exact group operation.
    """
    grid = group.grid
    owner = np.arange(len(points)) if owner is None else np.asarray(owner)
    pts, acts = exact(group, rng, points, action_points, owner)
    out_p, out_a = [], np.empty_like(acts)
    for n, p in enumerate(pts):
        mine = owner == n
        snapped = rotate_points(grid, np.concatenate([p, acts[mine]]).astype(int), rng.uniform(0, 2 * np.pi),
                                int(rng.integers(grid.n_points)))
        out_p.append(snapped[:len(p)])
        out_a[mine] = snapped[len(p):]
    return out_p, out_a


def rotate_points(grid, points: np.ndarray, theta: float, centre: int) -> np.ndarray:
    """Grid points rotated by theta (radians) about grid point `centre`, snapped to the nearest point."""
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    c = grid.positions[0, centre, :2]
    xyz = np.zeros((len(points), 3))
    xyz[:, :2] = (grid.positions[0, points, :2] - c) @ rot.T + c
    return grid.nearest_point(xyz)
