"""DFT reference minimum of pd100-oxide-2x2-dft, established independently of the RL agent.

Two phases, each resumable:

``candidates`` (minutes): the EMT reference structure (docs/reference/pd100-oxide-2x2.extxyz), the lowest few
distinct arrangements of the EMT overlayer-motif search and of EMT random relaxed builds + basin hopping
(scripts/reference_minima.py's Search), and of a short CHGNet random search + basin hopping (CHGNet: a PBE-trained
universal potential, the better proxy for DFT than EMT). Every candidate is relaxed with CHGNet (template fixed) as
the starting geometry of its DFT relaxation; arrangements that CHGNet relaxes into the same structure are merged
(asla.bench.judge.same_structure). Order: CHGNet-lowest first, then the EMT minimum, then by CHGNet energy, so that a
partial DFT run already covers the likeliest minima. Writes OUT/candidates.json and OUT/candidates.extxyz.

``relax`` (hours): each candidate in that order relaxed with the problem's calculator (GPAW; template fixed, BFGS,
fmax 0.05 eV/A, a cap on the steps). Each relaxation appends to an ASE trajectory in WORK and, after every step,
writes a checkpoint to KEEP (OUT/progress: the last frame with its energy and forces, the BFGS state, the counts),
small files meant to be committed: WORK is lost with the machine, and one candidate's relaxation takes longer than
a working session (about 150 GPAW steps of a minute each). A killed run resumes from WORK's last frame, or, where
WORK is gone, from KEEP's, with BFGS's Hessian restored either way (the same path as a run never killed). A
finished one writes OUT/<candidate>.json (energy, steps, DFT evaluations, wall seconds) and OUT/<candidate>.extxyz
(its checkpoint is then removed), then the report (docs/dft-reference.md) and the lowest finished structure as
docs/reference/<problem>.extxyz; --update-yaml rewrites the problem YAML's `reference:`.

Usage (the shipped run; the second line resumes it after a kill):
    python scripts/dft_reference.py candidates --emt-minutes 1.5 --chgnet-minutes 3
    nice -n 5 python scripts/dft_reference.py relax --update-yaml
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.io import read, write
from reference_minima import Search, overlayer_motif_phase, problem_file, update_yaml  # a sibling script

from asla import load_problem
from asla.bench.judge import same_structure
from asla.calculators import make_calculator
from asla.relaxation import Checkpoint, last_frame, relax_resumable
from asla.storage import atomic_write_text, write_json

ROOT = Path(__file__).resolve().parent.parent
TAGS = {"EMT overlayer-motif search": "emt-motif", "EMT random relaxed builds": "emt-random",
        "EMT basin hopping": "emt-bh", "CHGNet random relaxed builds": "chgnet-random",
        "CHGNet basin hopping": "chgnet-bh"}


class CollectingSearch(Search):
    """reference_minima's Search that keeps every finite relaxed structure (with its phase), not only the best."""

    def __init__(self, problem, seed: int) -> None:
        super().__init__(problem, seed)
        self.phase = ""
        self.found: list[tuple[float, Atoms, str]] = []

    def relax(self, atoms: Atoms, fmax: float = 0.05, steps: int = 400) -> tuple[float, Atoms]:
        e, a = super().relax(atoms, fmax, steps)
        if math.isfinite(e):
            self.found.append((e, a.copy(), self.phase))
        return e, a


def distinct_lowest(problem, found: list[tuple[float, Atoms, str]], k: int,
                    taken: list[Atoms] = ()) -> list[tuple[float, Atoms, str]]:
    """The `k` lowest entries of `found` whose arrangements differ from each other and from `taken`."""
    picked: list[tuple[float, Atoms, str]] = []
    for e, a, phase in sorted(found, key=lambda r: r[0]):
        if len(picked) == k:
            break
        if any(same_structure(problem, a, b) for b in [*taken, *(p[1] for p in picked)]):
            continue
        picked.append((e, a, phase))
    return picked


def emt_energy(emt, atoms: Atoms) -> float:
    a = atoms.copy()
    a.calc = make_calculator(emt.calculator)
    return float(a.get_potential_energy())


def candidates(args) -> int:
    problem = load_problem(args.problem)
    emt = load_problem(args.emt_problem)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    # EMT: the reference, the motif search, random relaxed builds + basin hopping
    ref = read(ROOT / emt.reference["structure"])
    pool: list[dict] = [{"source": "EMT reference (docs/reference/pd100-oxide-2x2.extxyz)",
                         "emt_energy": emt_energy(emt, ref), "atoms": ref, "also": []}]
    es = CollectingSearch(emt, args.seed)
    es.phase = "EMT overlayer-motif search"
    motif = overlayer_motif_phase(es, top_k=args.per_source)
    es.phase = "EMT random relaxed builds"
    es.random_phase(60 * args.emt_minutes * 0.4)
    es.phase = "EMT basin hopping"
    es.basin_hopping(60 * args.emt_minutes * 0.6)
    n_emt = es.n_relax
    for phase in ("EMT overlayer-motif search", "EMT basin hopping"):
        # the random builds seed the basin hopping; its distinct minima and the motif's are the candidates
        rows = [r for r in es.found
                if r[2] == phase or (phase == "EMT basin hopping" and r[2].startswith("EMT random"))]
        lowest = min(rows, key=lambda r: r[0], default=None)
        twin = lowest and next((c for c in pool if same_structure(emt, lowest[1], c["atoms"])), None)
        if twin:  # the search's minimum is a candidate already (the motif's is the EMT reference): say so
            twin["also"].append(f"lowest of the {phase}")
        for e, a, ph in distinct_lowest(emt, rows, args.per_source, taken=[c["atoms"] for c in pool]):
            pool.append({"source": ph, "emt_energy": e, "atoms": a, "also": []})
    print(f"EMT: {n_emt} relaxations, {len(pool)} candidates ({time.time() - t0:.0f} s); {motif}", flush=True)
    # CHGNet: relax every EMT candidate, then a short random search + basin hopping from the best
    proxy = {"name": "chgnet", "model": args.chgnet_model} if args.proxy == "chgnet" else {"name": args.proxy}
    chg = dataclasses.replace(problem, calculator=proxy)
    cs = CollectingSearch(chg, args.seed)
    cs.phase = "EMT candidate"
    for c in pool:
        c["chgnet_energy"], c["start"] = cs.relax(c["atoms"])
    t1 = time.time()
    cs.phase = "CHGNet random relaxed builds"
    cs.random_phase(60 * args.chgnet_minutes * 0.3)
    cs.phase = "CHGNet basin hopping"
    cs.basin_hopping(60 * args.chgnet_minutes * 0.7)
    own = [r for r in cs.found if r[2] != "EMT candidate"]
    for e, a, ph in distinct_lowest(chg, own, args.per_source, taken=[c["start"] for c in pool]):
        pool.append({"source": ph, "emt_energy": emt_energy(emt, a), "chgnet_energy": e, "atoms": a, "start": a,
                     "also": []})
    print(f"CHGNet: {cs.n_relax} relaxations ({cs.n_calls} calls, {time.time() - t1:.0f} s after the EMT candidates)",
          flush=True)
    # merge the candidates CHGNet relaxed into one arrangement; order them
    merged: list[dict] = []
    for c in sorted(pool, key=lambda c: c["chgnet_energy"]):
        if not math.isfinite(c["chgnet_energy"]):
            continue  # desorbed in CHGNet
        twin = next((m for m in merged if same_structure(problem, c["start"], m["start"])), None)
        if twin is not None:
            twin["sources"] += [c["source"], *c["also"]]
            twin["emt_energies"].append(c["emt_energy"])
            continue
        merged.append({"sources": [c["source"], *c["also"]], "emt_energies": [c["emt_energy"]],
                       "chgnet_energy": c["chgnet_energy"], "start": c["start"],
                       "chgnet_kept_arrangement": bool(same_structure(problem, c["start"], c["atoms"]))})
    ref_ids = {id(m) for m in merged if any(s.startswith("EMT reference") for s in m["sources"])}
    order = merged[:1] + [m for m in merged[1:] if id(m) in ref_ids] + [m for m in merged[1:] if id(m) not in ref_ids]
    records = []
    for n, m in enumerate(order[:args.max_candidates], 1):
        tag = "emt-ref" if id(m) in ref_ids else TAGS[m["sources"][0]]
        m["name"] = f"c{n:02d}-{tag}"
        start = m.pop("start")
        start.info["candidate"] = m["name"]
        records.append((m, start))
    write(out / "candidates.extxyz", [s for _, s in records])
    write_json(out / "candidates.json", {
        "problem": problem.name, "seed": args.seed, "emt_relaxations": n_emt, "chgnet_relaxations": cs.n_relax,
        "chgnet_calls": cs.n_calls, "seconds": time.time() - t0, "motif": motif, "proxy": proxy,
        "command": f"python scripts/dft_reference.py candidates --emt-minutes {args.emt_minutes:g} "
                   f"--chgnet-minutes {args.chgnet_minutes:g} --per-source {args.per_source} --seed {args.seed}",
        "candidates": [m for m, _ in records]})
    for m, _ in records:
        print(f"  {m['name']}: CHGNet {m['chgnet_energy']:.4f} eV, EMT {min(m['emt_energies']):.4f} eV, "
              f"{'; '.join(m['sources'])}", flush=True)
    write_report(problem, out)
    return 0


def keep_dir(out: Path, keep: str | Path | None = None) -> Path:
    """Where the committed checkpoints live: --keep, else OUT/progress."""
    return Path(keep) if keep else out / "progress"


def relax_one(problem, cand: dict, start: Atoms, work: Path, fmax: float, steps: int, keep: Path) -> dict:
    """Relax one candidate with the problem's calculator, resuming from its trajectory in `work` or else from its
    checkpoint in `keep` (OUT/progress; asla.relaxation); returns its record (the caller writes it)."""
    name = cand["name"]
    done = relax_resumable(problem, start, name, work, keep, fmax=fmax, steps=steps,
                           log=lambda line: print(line, flush=True))
    atoms, error = done.atoms, done.error
    record = {"name": name, "sources": cand["sources"], "emt_energies": cand["emt_energies"],
              "chgnet_energy": cand["chgnet_energy"], "converged": done.converged, "error": error,
              "fmax_target": fmax, "step_cap": steps, **done.progress}
    if error is None:
        forces = atoms.get_forces()
        record["energy"] = float(atoms.get_potential_energy())
        record["free_energy"] = float(atoms.get_potential_energy(force_consistent=True))
        record["fmax"] = float(np.linalg.norm(forces, axis=1).max())
        # 0.5 A: the start is another calculator's relaxation (heights differ by tenths); other sites are >= 1 A off
        record["kept_start_arrangement"] = bool(same_structure(problem, atoms, start, tol=0.5))
        result = atoms.copy()
        result.calc = None
        result.info.update(candidate=name, energy=record["energy"])
        record["atoms"] = result
    return record


def relax(args) -> int:
    problem = load_problem(args.problem)
    out, work = Path(args.out), Path(args.work)
    keep = keep_dir(out, args.keep)
    work.mkdir(parents=True, exist_ok=True)
    plan = json.loads((out / "candidates.json").read_text())
    starts = read(out / "candidates.extxyz", ":")
    for cand, start in zip(plan["candidates"], starts):
        if (out / f"{cand['name']}.json").exists():
            continue
        print(f"{cand['name']}: relaxing with {problem.calculator['name']} "
              f"(CHGNet {cand['chgnet_energy']:.4f} eV; {'; '.join(cand['sources'])})", flush=True)
        record = relax_one(problem, cand, start, work, args.fmax, args.steps, keep)
        atoms = record.pop("atoms", None)
        if atoms is not None:
            record["structure"] = str(out / f"{cand['name']}.extxyz")
            write(out / f"{cand['name']}.extxyz", atoms)
        record["command"] = f"python scripts/dft_reference.py relax --fmax {args.fmax:g} --steps {args.steps}"
        write_json(out / f"{cand['name']}.json", record)
        Checkpoint(keep, cand["name"]).remove()  # the record supersedes it
        print(f"{cand['name']}: {record.get('energy', float('nan')):.4f} eV, converged {record['converged']}, "
              f"{record['steps']} steps, {record['evaluations']} evaluations, {record['seconds']:.0f} s", flush=True)
        best = write_report(problem, out, work, keep)
        known = lower_reference(problem, best)
        if known is not None:
            print(f"kept the problem's reference, {known:.4f} eV, below this search's lowest {best['energy']:.4f} eV "
                  f"({problem.reference.get('structure')})", flush=True)
        elif best is not None:
            ref_path = ROOT / "docs" / "reference" / f"{problem.name}.extxyz" if args.out == DEFAULT_OUT \
                else out / f"{problem.name}.extxyz"
            write(ref_path, read(best["structure"]))
            if args.update_yaml:
                update_yaml(problem_file(args.problem), best["energy"], reference_method(plan, out, best),
                            str(ref_path.relative_to(ROOT)) if args.out == DEFAULT_OUT else str(ref_path))
    return 0


def lower_reference(problem, best: dict | None) -> float | None:
    """The problem's reference energy where it lies below this search's lowest (found since by another search, e.g.
    an ASLA run on the DFT 2x2): such a reference is never replaced. None where this search may set it."""
    known = problem.reference_energy
    if best is not None and known is not None and known < best["energy"] - 1e-6:
        return known
    return None


def finished(out: Path, plan: dict) -> list[dict]:
    return [json.loads((out / f"{c['name']}.json").read_text()) for c in plan["candidates"]
            if (out / f"{c['name']}.json").exists()]


def reference_method(plan: dict, out: Path, best: dict) -> str:
    done = finished(out, plan)
    left = [c["name"] for c in plan["candidates"] if not (out / f"{c['name']}.json").exists()]
    text = (f"the lowest of {len(done)} GPAW relaxations (BFGS, fmax {best['fmax_target']:g}, template fixed) of "
            f"candidates from EMT and CHGNet searches (docs/dft-reference.md): {best['name']} "
            f"({'; '.join(best['sources'])}), {best['steps']} steps, {best['evaluations']} DFT evaluations.")
    if left:
        text += (f" NOT FINAL: {len(left)} of {len(plan['candidates'])} candidates not yet relaxed "
                 f"({', '.join(left)}); python scripts/dft_reference.py relax --update-yaml resumes.")
    return text


def write_report(problem, out: Path, work: Path | None = None, keep: str | Path | None = None) -> dict | None:
    """docs/dft-reference.md (or OUT/report.md) from the candidates and the finished records; returns the lowest.
    A candidate still relaxing shows its trajectory's last frame in `work`, or else its checkpoint's in `keep`
    (default OUT/progress): what a partial run has reached."""
    keep = keep_dir(out, keep)
    plan = json.loads((out / "candidates.json").read_text())
    done = {r["name"]: r for r in finished(out, plan)}
    ok = [r for r in done.values() if r.get("energy") is not None and r["converged"]]
    best = min(ok, key=lambda r: r["energy"]) if ok else None
    lines = [f"# DFT reference minimum: {problem.name}", "",
             f"Calculator: `{json.dumps(problem.calculator)}` (configs/problems/{problem.name}.yaml). Found "
             "independently of the RL agent by `scripts/dft_reference.py`: candidates from EMT and CHGNet searches, "
             "each pre-relaxed with CHGNet (template fixed) and then relaxed with GPAW (BFGS, template fixed). The "
             "reference is the lowest converged DFT energy (ASE's `get_potential_energy()`, the energy extrapolated "
             "to zero smearing width, as the environment's reward reads it).", "",
             f"Candidates: `{plan['command']}` ({plan['emt_relaxations']} EMT relaxations, "
             f"{plan['chgnet_relaxations']} CHGNet relaxations with {plan['chgnet_calls']} calls, "
             f"{plan['seconds'] / 60:.1f} min; {plan['motif']}). DFT relaxations: "
             "`nice -n 5 python scripts/dft_reference.py relax --update-yaml` (the same command resumes a killed run "
             "from each trajectory's last frame, or on another machine from the committed checkpoints in "
             "docs/dft-reference/progress/).", "",
             "| candidate | sources | EMT (eV) | CHGNet (eV) | DFT (eV) | DFT - lowest (eV) | converged | steps | "
             "DFT evaluations | hours | arrangement kept |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in plan["candidates"]:
        r = done.get(c["name"])
        emt = " / ".join(f"{e:.4f}" for e in c["emt_energies"])
        head = f"| {c['name']} | {'; '.join(c['sources'])} | {emt} | {c['chgnet_energy']:.4f} |"
        if r is None:
            frame, n = last_frame(work / f"{c['name']}.traj") if work else (None, 0)
            checkpoint = Checkpoint(keep, c["name"])
            if frame is None and checkpoint.exists():
                frame, n = read(checkpoint.frame), json.loads(checkpoint.progress.read_text())["steps"] + 1
            if frame is None:
                lines.append(head + " not yet relaxed | | | | | | |")
            else:
                fmax = np.linalg.norm(frame.get_forces(), axis=1).max()
                lines.append(head + f" relaxing: {frame.get_potential_energy():.4f} at frame {n}, fmax "
                             f"{fmax:.3f} eV/A | | no (running) | {n - 1} | | | |")
        elif r.get("energy") is None:
            lines.append(head + f" failed: {r['error']} | | no | {r['steps']} | {r['evaluations']} | "
                         f"{r['seconds'] / 3600:.2f} | |")
        else:
            delta = f"{r['energy'] - best['energy']:+.4f}" if best else ""
            lines.append(head + f" {r['energy']:.4f} | {delta} | {'yes' if r['converged'] else 'no (step cap)'} | "
                         f"{r['steps']} | {r['evaluations']} | {r['seconds'] / 3600:.2f} | "
                         f"{'yes' if r['kept_start_arrangement'] else 'no'} |")
    left = [c["name"] for c in plan["candidates"] if c["name"] not in done]
    lines += ["", ("Reference so far: " + (f"{best['name']}, {best['energy']:.4f} eV" if best else "none yet")
                   + (f". NOT FINAL: {', '.join(left)} still to relax." if left else ". All candidates relaxed.")),
              "", "EMT energies: of the EMT-relaxed arrangement(s) merged into the candidate; CHGNet: the candidate's "
              "CHGNet-relaxed start; 'arrangement kept': the DFT relaxation ended in the start's arrangement "
              "(asla.bench.judge.same_structure)."]
    known = lower_reference(problem, best)
    if known is not None:
        lines += ["", f"**The problem's reference is lower**, {known:.4f} eV ({known - best['energy']:+.4f} eV against "
                  f"this search's lowest), found since by another search and kept: {problem.reference.get('method')}"]
    report = ROOT / "docs" / "dft-reference.md" if str(out) == DEFAULT_OUT else out / "report.md"
    atomic_write_text(report, "\n".join(lines) + "\n")
    return best


DEFAULT_OUT = "docs/dft-reference"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="phase", required=True)
    for name in ("candidates", "relax", "report"):
        p = sub.add_parser(name)
        p.add_argument("--problem", default="pd100-oxide-2x2-dft", help="the DFT problem (name or YAML path)")
        p.add_argument("--out", default=DEFAULT_OUT, help="candidates, records and structures")
    c = sub.choices["candidates"]
    c.add_argument("--emt-problem", default="pd100-oxide-2x2", help="the EMT problem of the same geometry")
    c.add_argument("--emt-minutes", type=float, default=1.5, help="EMT random builds + basin hopping")
    c.add_argument("--chgnet-minutes", type=float, default=3.0, help="CHGNet random builds + basin hopping")
    c.add_argument("--chgnet-model", default="0.3.0")
    c.add_argument("--proxy", default="chgnet", choices=("chgnet", "sevennet", "emt"),
                   help="the PBE-like potential of the second search and the pre-relaxation (emt: for tests only)")
    c.add_argument("--per-source", type=int, default=3, help="distinct lowest arrangements kept per search")
    c.add_argument("--max-candidates", type=int, default=10)
    c.add_argument("--seed", type=int, default=0)
    for name in ("relax", "report"):
        sub.choices[name].add_argument("--work", default="runs/dft-reference",
                                       help="trajectories, GPAW logs, progress (resume state)")
        sub.choices[name].add_argument("--keep", default=None,
                                       help="per-step checkpoints to commit (default OUT/progress): the resume state "
                                            "where WORK is gone")
    r = sub.choices["relax"]
    r.add_argument("--fmax", type=float, default=0.05)
    r.add_argument("--steps", type=int, default=150, help="cap on BFGS steps per candidate, resumes included")
    r.add_argument("--update-yaml", action="store_true", help="rewrite the problem YAML's reference: section")
    args = ap.parse_args(argv)
    if args.phase != "candidates" and not (Path(args.out) / "candidates.json").exists():
        ap.error(f"--out {args.out}: no candidates.json there; run the candidates phase first")
    if args.phase == "report":
        write_report(load_problem(args.problem), Path(args.out), Path(args.work), args.keep)
        return 0
    return candidates(args) if args.phase == "candidates" else relax(args)


if __name__ == "__main__":
    raise SystemExit(main())
