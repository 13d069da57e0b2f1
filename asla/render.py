"""Top-view RGB pictures of structures and grid maps (for env.render, TensorBoard, docs and asla explain)."""
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


def render_relevance(values: np.ndarray, size: int = 192) -> np.ndarray:
    """uint8 (H, W, 3) picture of a signed map (e.g. LRP relevance), red positive, blue negative, white zero."""
    v = np.nan_to_num(np.asarray(values, dtype=float))
    scale = float(np.abs(v).max()) or 1.0
    from matplotlib import colormaps
    rgb = colormaps["RdBu_r"](0.5 + 0.5 * v / scale)[..., :3] * 255
    rep = max(1, size // max(v.shape))
    return np.kron(rgb, np.ones((rep, rep, 1))).astype(np.uint8)


def explanation_png(q_map: np.ndarray, legal: np.ndarray, relevance: np.ndarray, site: tuple[int, int],
                    placed: list[tuple[int, int, str]], template: np.ndarray, structure: np.ndarray, title: str,
                    q_label: str, relevance_label: str) -> bytes:
    """PNG of one explained build step: the chosen species' Q map | the relevance of the atoms | the structure.

    Grid maps are drawn with i (along the cell vector a) to the right and j (along b) up, as the top view of the
    structure draws a square cell. `site` (i, j) is the chosen grid point (a star), `placed` the atoms placed so
    far as (i, j, symbol), `template` the (i, j) grid points of template atoms (small dots)."""
    import io

    import matplotlib
    from matplotlib import patheffects
    from matplotlib.figure import Figure  # no pyplot: no backend or global state is touched
    fig = Figure(figsize=(12.6, 4.4), dpi=80)
    axes = fig.subplots(1, 3)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.8")
    im = axes[0].imshow(np.where(legal, q_map, np.nan).T, origin="lower", cmap=cmap)
    fig.colorbar(im, ax=axes[0], fraction=0.046, pad=0.04)
    axes[0].set_title(q_label, fontsize=10)
    scale = float(np.abs(relevance).max()) or 1.0
    im = axes[1].imshow(relevance.T, origin="lower", cmap="RdBu_r", vmin=-scale, vmax=scale)
    fig.colorbar(im, ax=axes[1], fraction=0.046, pad=0.04)
    axes[1].set_title(relevance_label, fontsize=10)
    if len(template):
        axes[1].plot(template[:, 0], template[:, 1], ".", color="0.55", markersize=2)
    for i, j, symbol in placed:
        axes[1].text(i, j, symbol, ha="center", va="center", fontsize=6, color="k",
                     path_effects=[patheffects.withStroke(linewidth=1.5, foreground="w")])
    for ax in axes[:2]:
        ax.plot([site[0]], [site[1]], marker="*", markersize=14, markerfacecolor="none", markeredgecolor="k")
        ax.set_xlabel("i (along a)")
        ax.set_ylabel("j (along b)")
    axes[2].imshow(structure)
    axes[2].set_axis_off()
    axes[2].set_title("structure before this step", fontsize=10)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
