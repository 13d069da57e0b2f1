"""Top-view RGB pictures of structures (for env.render, TensorBoard and docs), numpy only."""
from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.data import covalent_radii
from ase.data.colors import jmol_colors


def render_atoms(atoms: Atoms, n_template: int = 0, px_per_A: float = 20.0, max_px: int = 480) -> np.ndarray:
    """uint8 (H, W, 3) top view of the periodic cell; template atoms drawn paler than placed ones."""
    ab = np.array(atoms.cell)[:2, :2]
    corners = np.array([[0, 0], ab[0], ab[1], ab[0] + ab[1]])
    lo, hi = corners.min(0) - 0.5, corners.max(0) + 0.5
    scale = min(px_per_A, max_px / float((hi - lo).max()))
    W, H = (np.ceil((hi - lo) * scale).astype(int) + 1)
    img = np.full((H, W, 3), 255, dtype=np.float32)
    yy, xx = np.mgrid[0:H, 0:W]
    px = np.stack([xx / scale + lo[0], (H - 1 - yy) / scale + lo[1]], -1)  # Cartesian of each pixel
    frac = px @ np.linalg.inv(ab)
    inside = np.all((frac >= -1e-9) & (frac <= 1 + 1e-9), -1)
    img[~inside] = 235.0
    order = np.argsort(atoms.positions[:, 2])
    shifts = [i * ab[0] + j * ab[1] for i in (-1, 0, 1) for j in (-1, 0, 1)]
    for idx in order:
        z = atoms.numbers[idx]
        r = 0.75 * covalent_radii[z]
        color = np.array(jmol_colors[z]) * 255
        if idx < n_template:
            color = 0.45 * color + 0.55 * 255
        for sh in shifts:
            c = atoms.positions[idx, :2] + sh
            if np.any(c < lo - r) or np.any(c > hi + r):
                continue
            d2 = ((px - c) ** 2).sum(-1)
            disk = (d2 <= r * r) & inside
            img[disk] = color * (0.75 + 0.25 * (1 - d2[disk] / (r * r)))[:, None]
            ring = (d2 > r * r) & (d2 <= (r + 0.6 / scale * 2) ** 2) & inside
            img[ring] = 40.0
    return img.clip(0, 255).astype(np.uint8)


def render_heatmap(values: np.ndarray, size: int = 192) -> np.ndarray:
    """uint8 (H, W, 3) picture of a 2D map (e.g. Q-values over the grid), viridis-like colours."""
    v = np.asarray(values, dtype=float)
    finite = np.isfinite(v)
    lo, hi = (v[finite].min(), v[finite].max()) if finite.any() else (0.0, 1.0)
    t = np.where(finite, (v - lo) / (hi - lo + 1e-12), 0.0)
    from matplotlib import colormaps
    rgb = colormaps["viridis"](t)[..., :3] * 255
    rgb[~finite] = 200
    rep = max(1, size // max(v.shape))
    return np.kron(rgb, np.ones((rep, rep, 1))).astype(np.uint8)
