"""ASE's EMT, vectorised over neighbour pairs: the same numbers, several times faster.

EMT is the default reward and runs millions of times (relaxation steps, basin hopping, benchmarks).
ASE 3.29 spends a single point in a Python loop over atoms plus a PrimitiveNeighborList rebuild.
This subclass keeps ASE's parameter set-up (``initialize``: parameter tables, gammas, cutoffs) and
replaces ``calculate`` with numpy over all ordered neighbour pairs (i, j, periodic image), found
with a scipy cKDTree over the periodic images. Every per-pair expression is written in ASE's order,
so per-pair distances and terms are bitwise equal to ASE's; only the order of the per-atom sums
differs (agreement ~1e-13 eV on a 100-atom slab).

Once atoms move by small steps (relaxations), pairs are searched within ``rc_list + skin`` and reused
while the two largest displacements since the search add up to less than the skin (and numbers,
cell and pbc are unchanged); a first or one-off evaluation searches without a skin. The exact cutoff
``r < rc_list`` is applied on every call and pairs are kept in a fixed (i, j, offset) order, so the
list summed is ASE's whatever the skin or the calculator's history: the skin changes speed, never
a single bit. ``check_state`` (ASE's test for changed atoms, which cost more than the EMT itself)
is answered by a cheaper test with the same outcome.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes, compare_atoms
from ase.calculators.emt import EMT as _AseEMT
from ase.calculators.emt import beta
from ase.geometry import complete_cell
from scipy.spatial import cKDTree

# Searched beyond rc_list + skin so that a pair whose tree distance rounds differently from
# ASE's distance is still a candidate; the exact test r < rc_list follows on every call.
_SEARCH_MARGIN = 1e-6


@lru_cache(maxsize=64)
def _shifts(reach: tuple[int, int, int]) -> np.ndarray:
    """All integer cell offsets with |offset_k| <= reach_k, shape (3, n_images)."""
    grid = np.meshgrid(*[np.arange(-k, k + 1) for k in reach], indexing="ij")
    shifts = np.stack([g.ravel() for g in grid]).astype(np.int64)
    shifts.flags.writeable = False  # shared by every call through the cache
    return shifts


def _sorted_pairs(n: int, i: np.ndarray, j: np.ndarray, offsets: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs in (i, j, offset) order, not the tree's: sums, hence energies, then do not depend
    on the skin or on what the calculator computed before."""
    if len(i) == 0:
        return i, j, offsets
    lo = int(offsets.min())
    base = int(offsets.max()) - lo + 1
    if n * n * base**3 >= 2**62:  # atoms absurdly far outside the cell: the general, slower sort
        order = np.lexsort((offsets[2], offsets[1], offsets[0], j, i))
        return i[order], j[order], offsets[:, order]
    # one integer key per pair, sorted, then decoded (cheaper than argsort plus gathers)
    o = offsets - lo
    key = np.sort((i * n + j) * base**3 + (o[0] * base + o[1]) * base + o[2])
    ij, o = np.divmod(key, base**3)
    i, j = np.divmod(ij, n)
    o0, o12 = np.divmod(o, base * base)
    o1, o2 = np.divmod(o12, base)
    return i, j, np.stack([o0, o1, o2]) + lo


def candidate_pairs(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, radius: float
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ordered pairs (i, j, integer cell offset) with |pos_j + offset@cell - pos_i| <= radius.

    Offsets have shape (3, n_pairs). Both (i, j) and (j, i) are listed, and an atom pairs with its
    own periodic images, as in ASE's NeighborList(bothways=True, self_interaction=False).
    """
    n = len(positions)
    pbc = np.asarray(pbc, bool)
    if n == 0:
        return np.zeros(0, np.intp), np.zeros(0, np.intp), np.zeros((3, 0), np.int64)
    if pbc.any():
        if np.any(np.linalg.norm(cell[pbc], axis=1) == 0.0):
            raise ValueError("EMT: a periodic direction has a zero cell vector; set the cell or pbc=False")
        full = complete_cell(cell)
        frac = np.linalg.solve(full.T, positions.T).T
        wrap = np.where(pbc, np.floor(frac), 0.0)
        centred = positions - wrap @ full
        # |fractional component k of a pair vector| <= radius * |reciprocal vector k| (= margin_k), and
        # wrapped fractional coordinates lie in [0, 1): so |offset_k| <= floor(margin_k) + 1, and an
        # image whose fractional coordinate lies outside [-margin_k, 1 + margin_k] pairs with nobody
        margin = radius * np.linalg.norm(np.linalg.inv(full), axis=0)
        reach = np.where(pbc, np.floor(margin) + 1, 0).astype(int)
        shifts = _shifts(tuple(int(k) for k in reach))
        image_frac = (frac - wrap)[None, :, :] + shifts.T[:, None, :]
        slack = margin + 1e-9
        inside = np.all(~pbc | ((image_frac >= -slack) & (image_frac <= 1.0 + slack)), axis=2).ravel()
        image_index = np.flatnonzero(inside)
        images = (centred[None, :, :] + (shifts.T @ full)[:, None, :]).reshape(-1, 3)[image_index]
        wrap = np.ascontiguousarray(wrap.T).astype(np.int64)
    else:
        wrap = None
        centred = images = positions
    found = cKDTree(centred).sparse_distance_matrix(cKDTree(images), radius, output_type="ndarray")
    i = found["i"].astype(np.intp)
    if wrap is None:
        j = found["j"].astype(np.intp)
        keep = i != j
        return _sorted_pairs(n, i[keep], j[keep], np.zeros((3, int(keep.sum())), np.int64))
    s, j = np.divmod(image_index[found["j"]], n)
    offsets = np.empty((3, len(i)), np.int64)  # offsets for the unwrapped positions
    for k in range(3):
        offsets[k] = shifts[k][s] - wrap[k][j] + wrap[k][i]
    keep = (i != j) | (offsets[0] != 0) | (offsets[1] != 0) | (offsets[2] != 0)
    return _sorted_pairs(n, i[keep], j[keep], offsets[:, keep])


def _close(a, b, tol: float) -> bool:
    """``ase.calculators.calculator.equal(a, b, atol=tol)`` (np.allclose, rtol 0), without isclose's cost."""
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape:
        return False
    if a.dtype.kind in "biu" and b.dtype.kind in "biu" and tol < 1:
        return bool(np.array_equal(a, b))  # |a - b| <= tol < 1 for integers and booleans
    if a.dtype.kind == "f" and b.dtype.kind == "f":
        if bool((np.abs(a - b) <= tol).all()):
            return True
        if np.isfinite(a).all() and np.isfinite(b).all():
            return False
    return bool(np.allclose(a, b, rtol=0, atol=tol))  # inf, nan, other types: ASE's own test


# per-pair parameter rows after chi, in the order calculate() unpacks them: (table, atom i or j)
_PAIR_ROWS = [("eta2", "i"), ("eta2", "j"), ("neg_eta2", "i"), ("neg_eta2", "j"), ("beta_s0", "i"),
              ("beta_s0", "j"), ("neg_kappa", "i"), ("neg_kappa", "j"), ("s0", "i"), ("s0", "j"),
              ("kappa_over_beta", "i"), ("kappa_over_beta", "j"), ("neghalfv0overgamma2", "i"),
              ("neghalfv0overgamma2", "j")]


class EMT(_AseEMT):
    """Drop-in for ``ase.calculators.emt.EMT``: same parameters, properties, conventions and numbers.

    Parameters
    ----------
    asap_cutoff : bool, default False
        As in ASE (cutoff from the largest element present instead of the whole table).
    skin : float, default 0.8 (Angstrom)
        After a small move (the two largest displacements add up to less than 4 skin), neighbour
        pairs are searched within rc_list + skin and reused while the two largest displacements
        since add up to less than skin; 0 searches on every call. Changes speed only, never results.
    """

    default_parameters = {"asap_cutoff": False, "skin": 0.8}

    def __init__(self, **kwargs) -> None:  # ASE's keywords
        self._table: dict | None = None
        self._pairs_cache: dict | None = None
        super().__init__(**kwargs)

    def initialize(self, atoms) -> None:  # ASE's signature
        super().initialize(atoms)  # ASE: rc, rc_list, acut, par, chi, ia2iz
        self.nl = None  # ASE's NeighborList is replaced by candidate_pairs
        par = self.par
        # per-element tables, each entry computed exactly as ASE computes it per pair
        self._table = {
            "eta2": par["eta2"], "neg_eta2": -par["eta2"], "beta_s0": beta * par["s0"],
            "neg_kappa": -par["kappa"], "s0": par["s0"], "kappa_over_beta": par["kappa"] / beta,
            "neghalfv0overgamma2": par["neghalfv0overgamma2"],
        }
        self._pairs_cache = None

    def check_state(self, atoms, tol: float = 1e-15) -> list[str]:
        """ASE's compare_atoms with a cheaper closeness test (it costs more than the EMT itself)."""
        old = self.atoms
        if old is None:
            return compare_atoms(old, atoms, tol=tol)
        excluded = set(self.ignored_changes)
        check = set(all_changes) - excluded
        changes = []
        if "cell" in check and not _close(old.cell.array, atoms.cell.array, tol):
            changes.append("cell")
        if "pbc" in check and not _close(old.pbc, atoms.pbc, tol):
            changes.append("pbc")
        check -= {"cell", "pbc"}
        changes += check & (set(old.arrays) ^ set(atoms.arrays))
        for p in check & set(old.arrays) & set(atoms.arrays):
            if not _close(old.arrays[p], atoms.arrays[p], tol):
                changes.append(p)
        return changes

    # -- neighbour pairs -------------------------------------------------------------------
    def _pairs(self, atoms) -> dict:
        """Candidate pairs with their per-pair parameters, rebuilt only when the skin is used up."""
        positions = atoms.positions
        cell = atoms.cell.array
        pbc = atoms.pbc
        skin = float(self.parameters.get("skin", 0.0))
        c = self._pairs_cache
        search_skin = 0.0  # a first or one-off evaluation gains nothing from a skin
        if (c is not None and skin > 0 and len(positions) == len(c["positions"])
                and np.array_equal(cell, c["cell"]) and np.array_equal(pbc, c["pbc"])):
            moved = positions - c["positions"]
            # a pair distance changes by at most the sum of the two largest displacements
            moved2 = np.einsum("ij,ij->i", moved, moved)
            top2 = np.sqrt(np.partition(moved2, len(moved2) - 2)[-2:]) if len(moved2) > 1 else np.sqrt(moved2)
            if top2.sum() < c["skin"]:
                return c
            if top2.sum() < 4.0 * skin:  # small moves (relaxation, dynamics): more will follow
                search_skin = skin
        i, j, offsets = candidate_pairs(positions, cell, pbc, self.rc_list + search_skin + _SEARCH_MARGIN)
        zi, zj = self.ia2iz[i], self.ia2iz[j]
        t = self._table
        z = {"i": zi, "j": zj}
        rows = [self.chi[zi, zj]] + [t[name][z[end]] for name, end in _PAIR_ROWS]
        c = {"positions": positions.copy(), "cell": cell.copy(), "pbc": pbc.copy(), "skin": search_skin, "i": i, "j": j,
             "shift": np.dot(cell.T, offsets.astype(float)),  # offsets @ cell, as (3, n_pairs)
             "par": np.array(rows).reshape(len(rows), len(i))}
        self._pairs_cache = c
        return c

    # -- energy, forces, stress ------------------------------------------------------------
    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        Calculator.calculate(self, atoms, properties, system_changes)
        if "numbers" in system_changes or self._table is None:
            self.initialize(self.atoms)

        atoms = self.atoms
        natoms = len(atoms)
        p = self._pairs(atoms)
        i, j, par_ij = p["i"], p["j"], p["par"]
        # pair vectors as ASE's _get_neighbors (positions[j] + offsets @ cell - positions[i]), one
        # Cartesian component per row; r summed in ASE's order, (x^2 + y^2) + z^2
        pos = atoms.positions.T
        d = np.take(pos, j, axis=1) + p["shift"] - np.take(pos, i, axis=1)
        r = np.sqrt(d[0] * d[0] + d[1] * d[1] + d[2] * d[2])
        keep = r < self.rc_list
        if not keep.all():  # exactly ASE's pair list, in (i, j, offset) order, whatever the skin
            i, j, r = i[keep], j[keep], r[keep]
            d = np.compress(keep, d, axis=1)
            par_ij = np.compress(keep, par_ij, axis=1)
        (chi, eta2s, eta2o, neg_eta2s, neg_eta2o, beta_s0s, beta_s0o, neg_kappas, neg_kappao, s0s, s0o,
         kappa_over_betas, kappa_over_betao, neghalfv0overgamma2s, neghalfv0overgamma2o) = par_ij

        energies = np.zeros(natoms)
        deds = np.zeros(natoms)
        forces = np.zeros((natoms, 3))
        stress = np.zeros((3, 3))
        if len(i):
            # segments of the pair list, one per atom with neighbours (atoms without: energy -E0)
            starts = np.concatenate(([0], np.flatnonzero(i[1:] != i[:-1]) + 1))
            a = i[starts]
            za = self.ia2iz[a]
            # cutoff function (ASE _calc_theta)
            w = 1.0 / (1.0 + np.exp(self.acut * (r - self.rc)))
            dwdroverw = self.acut * (w - 1.0)
            # neighbour contributions to sigma1, sigma2 (ASE _calc_dsigma1/2); s: self (i), o: other (j)
            dsigma1s = np.exp(neg_eta2o * (r - beta_s0o)) * chi * w
            dsigma1o = np.exp(neg_eta2s * (r - beta_s0s)) / chi * w
            r_over_beta = r / beta
            dsigma2s = np.exp(neg_kappao * (r_over_beta - s0o)) * chi * w
            dsigma2o = np.exp(neg_kappas * (r_over_beta - s0s)) / chi * w
            es = neghalfv0overgamma2s * dsigma2s
            eo = neghalfv0overgamma2o * dsigma2o
            sigma1, sum_as = np.add.reduceat(np.stack([dsigma1s, es + eo]), starts, axis=1)

            # E_c and the second term of E_AS (ASE _calc_e_c_a2), then the first term of E_AS
            par = self.par
            e0s, v0s, lmds = par["E0"][za], par["V0"][za], par["lambda"][za]
            eta2a, kappaa = par["eta2"][za], par["kappa"][za]
            ds = -1.0 * np.log(sigma1 * par["inv12gamma1"][za]) / (beta * eta2a)
            lmdsds = lmds * ds
            expneglmdds = np.exp(-1.0 * lmdsds)
            sixv0expnegkppds = 6.0 * v0s * np.exp(-1.0 * kappaa * ds)
            energies[a] = e0s * (1.0 + lmdsds) * expneglmdds + sixv0expnegkppds + 0.5 * sum_as
            deds[a] = ((-1.0 * e0s * lmds * lmdsds * expneglmdds + -1.0 * kappaa * sixv0expnegkppds)
                       / (-1.0 * beta * eta2a * sigma1))

            # dE/dr per ordered pair, both terms (ASE _calc_fs_c_a2 + _calc_efs_a1)
            invr = 1.0 / r
            dedr_c = deds[i] * (dsigma1s * (dwdroverw - eta2o)) + deds[j] * (dsigma1o * (dwdroverw - eta2s))
            dedr_as = es * (dwdroverw - kappa_over_betao) + eo * (dwdroverw - kappa_over_betas)
            gd = (dedr_c * invr + dedr_as * invr) * d  # force on i from the pair, per component
            forces[a] = np.add.reduceat(gd, starts, axis=1).T
            stress = 0.5 * np.add.reduce(d[:, None, :] * gd[None, :, :], axis=2)  # pairs counted twice
        energies -= self.par["E0"][self.ia2iz]  # ASAP convention

        energy = np.add.reduce(energies, axis=0)
        self.energies, self.forces, self.deds = energies, forces, deds
        self.results["energy"] = self.results["free_energy"] = energy
        self.results["energies"] = energies
        self.results["forces"] = forces

        if atoms.cell.rank == 3:
            stress = (stress + stress.T) * 0.5
            stress /= atoms.get_volume()
            self.stress = stress
            self.results["stress"] = stress.flat[[0, 4, 8, 5, 2, 1]]
        elif "stress" in properties:
            raise PropertyNotImplementedError
