"""Where asla's time goes: training and greedy-inference throughput, calculator vs agent, by cell and grid.

A Pd(100) oxide family at the 3x3 problem's coverage (Pd9O6 per 3x3: Pd n^2, O floor(2n^2/3)) on 3x3, 5x5
and 8x8 cells and grid spacings of 0.25, 0.2 and 0.15 A, trained with the 3x3 recipe
(configs/pd100-oxide-3x3.yaml) twice: with its ten EMT relaxation steps before the reward and with single
points. Each configuration runs in its own process (so its peak RSS is its own) and reports

- training episodes/s and the share of the loop in acting forward passes, the environment (masks,
  observations), gradient steps, the calculator, and bookkeeping (symmetry keys, cache, database, replay);
- greedy-inference episodes/s of the trained agent, without and with the energy;
- the floor: the calculator alone on the very structures training evaluated (one evaluation per episode
  is the least any method that scores every build must pay), and the ratio of each rate to it;
- peak RSS.

A separate process times the learner's gradient step (asla.agents.training ``_learn_step``) and the acting
forward pass side by side under torch threads 1 vs 2, inference_mode vs no_grad, channels_last vs
contiguous, batch 8 vs 1 and torch.compile, all float32, in interleaved rounds (the machine is shared).

Usage:
    python scripts/throughput.py [--quick] [--out docs] [--cells 3 5 8] [--spacings 0.25 0.2 0.15]
        [--relax 10 0] [--episodes 3=16 5=8 8=2] [--torch-threads auto|1|2] [--no-compile]
Writes OUT/throughput.json and OUT/throughput.md and prints the tables.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]  # the recipe and git's description of the code; asla itself is installed
RECIPE = ROOT / "configs" / "pd100-oxide-3x3.yaml"
BASE_PROBLEM = "pd100-oxide-3x3"
SHIPPED_SPACING = 0.457  # the shipped Pd problems' grid (6 pixels per surface repeat)
QUICK_SPACING = 0.9  # --quick: 3 pixels per surface repeat (9x9, 15x15, 24x24 grids), seconds per configuration
BASELINE = {"threads": 2, "context": "inference_mode", "format": "contiguous"}  # what the code does today


# ---- the problem family ---------------------------------------------------------------------------

def family_overrides(cell: int, spacing: float, relax_steps: int) -> dict[str, Any]:
    """load_problem overrides: the 3x3 problem scaled to an n x n cell at the same coverage and pixel size."""
    return {"name": f"pd100-oxide-{cell}x{cell}@{spacing:g}A", "template.size": [cell, cell, 3],
            "grid.spacing": spacing, "grid.divisions": [cell, cell],
            "bag": {"Pd": cell * cell, "O": (2 * cell * cell) // 3}, "relax": {"steps": relax_steps},
            "reference": {}}  # the 3x3 reference means nothing on other cells


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


# ---- worker: one (cell, spacing), every relaxation setting ------------------------------------------

def run_config(spec: dict) -> list[dict]:
    """Set the problem up once, then per relaxation setting: train, build greedily, time the calculator alone.

    The relaxation settings share the process (the problem, its symmetry tables and the agent code are the
    same; only the calculator's work differs), so peak RSS is per (cell, spacing) and reported after each.
    """
    import torch

    from asla import load_problem
    from asla.builder import observation_shape
    from asla.problem import Relaxation

    torch.set_num_threads(int(spec["threads"]))
    t0 = time.perf_counter()
    problem = load_problem(BASE_PROBLEM, **family_overrides(spec["cell"], spec["spacing"], 0))
    _ = problem.symmetry, observation_shape(problem)  # lazily built tables, paid once per problem
    setup_seconds = time.perf_counter() - t0
    rss_setup = peak_rss_mb()
    from asla.calculators import make_calculator
    calc = make_calculator(dict(problem.calculator))
    calculator = f"{problem.calculator['name']} ({type(calc).__module__}.{type(calc).__name__})"
    rows = []
    for relax in spec["relax"]:
        variant = copy.copy(problem)  # shares the cached symmetry and masks; only the relaxation differs
        variant.relax = Relaxation(steps=int(relax))
        variant.source = {**problem.source, "relax": {"steps": int(relax)}}
        row = run_one(variant, spec)
        row.update(setup_seconds=setup_seconds, relax_steps=int(relax), calculator=calculator)
        row["peak_rss_mb"]["after_setup"] = rss_setup
        rows.append(row)
    return rows


def run_one(problem: Any, spec: dict) -> dict:
    from asla.agents.agent import Agent
    from asla.agents.callbacks import ThroughputProbe
    from asla.agents.config import load_config
    from asla.agents.training import Trainer

    class QuickTrainer(Trainer):
        def log_images(self, step: int) -> None:
            """--quick: no TensorBoard images (one-off, but seconds on 8x8)."""

    load0 = os.getloadavg()[0]
    cfg = load_config(str(RECIPE), [f"episodes={spec['episodes']}", f"torch_threads={spec['threads']}",
                                    "learning.warmup_episodes=0", f"seed={spec['seed']}"])
    cfg["problem"] = problem.to_dict()
    cfg["problem_overrides"] = {}
    cfg["command"] = "scripts/throughput.py"
    # the probe keeps what training sends to the calculator (the built structure, seconds, calculator calls) for
    # the floor below; the loop's own buckets are the trainer's timing (summary["timing_seconds"])
    probe = ThroughputProbe(keep_structures=True)
    with tempfile.TemporaryDirectory(prefix="asla-throughput-") as tmp:
        # the problem set up above goes in as it is (not a second validation: ~10 s on 8x8)
        trainer = (QuickTrainer if spec.get("skip_images") else Trainer)(
            cfg, run_dir=Path(tmp) / "run", progress=False, callbacks=[probe], problem=problem)
        summary = trainer.run()
        agent = Agent.load(Path(tmp) / "run")
    recorded = probe.evaluated
    timing = summary["timing_seconds"]
    episodes = int(summary["episodes"])
    rollout, forward = float(timing["rollout"]), float(timing.get("rollout_forward", 0.0))
    calc_bucket, learn = float(timing["calculator"]), float(timing["learn"])
    calc_pure = probe.calculator_seconds
    loop = rollout + calc_bucket + learn
    rss_train = peak_rss_mb()

    # greedy inference with the trained agent: builds only, then each build evaluated (no cache)
    rng = np.random.default_rng(spec["seed"] + 1)
    n_greedy = min(int(cfg["n_builders"]), episodes)
    t0, f0 = time.perf_counter(), agent.forward_seconds
    builds = agent.rollout(problem, n_greedy, 0.0, rng)
    greedy_build = time.perf_counter() - t0
    greedy_forward = agent.forward_seconds - f0
    finished = [b.atoms() for b in builds if b.done]

    # the floor: the calculator alone on the structures training evaluated (warm calculator, no cache).
    floor, calls, energies = _floor(problem, [a for a, _, _ in recorded])
    # the same structures relaxed by ASE's other optimizers, side by side (same steps, same calculator)
    optimizers = {}
    if problem.relax.steps > 0:
        for name in ("BFGS", "LBFGS", "FIRE"):
            variant = copy.copy(problem)
            variant.relax = dataclasses.replace(problem.relax, optimizer=name)
            sec, _, e = (floor, calls, energies) if name == problem.relax.optimizer else \
                _floor(variant, [a for a, _, _ in recorded])
            optimizers[name] = {"seconds_per_structure": sec,
                                "mean_energy_minus_problem_optimizer": float(np.mean(np.subtract(e, energies))),
                                "max_abs_energy_difference": float(np.max(np.abs(np.subtract(e, energies))))}

    train_per_ep = loop / episodes
    greedy_per_ep = greedy_build / n_greedy
    greedy_energy_per_ep = greedy_build / n_greedy + floor  # greedy builds coincide: their energy costs the floor
    return {
        "cell": spec["cell"], "spacing": spec["spacing"], "problem": problem.name,
        "grid": list(problem.grid.shape), "grid_spacing_actual": [round(s, 4) for s in problem.grid.spacing],
        "pixels": int(problem.grid.n_points), "layers": int(problem.grid.n_layers),
        "actions": int(problem.n_species * problem.grid.n_layers * problem.grid.n_points),
        "atoms_placed": int(problem.n_atoms), "atoms_total": int(problem.n_atoms + len(problem.template)),
        "torch_threads": int(spec["threads"]),
        "train": {
            "episodes": episodes, "n_builders": int(cfg["n_builders"]),
            "lockstep_builds": min(int(cfg["n_builders"]), episodes),
            "grad_steps": int(cfg["learning"]["grad_steps_per_episode"]) * episodes,
            "batch_size": int(cfg["learning"]["batch_size"]),
            "loop_seconds": loop, "wall_seconds": float(summary["seconds"]),
            "seconds_per_episode": train_per_ep, "episodes_per_s": episodes / loop,
            "episodes_per_s_wall": episodes / float(summary["seconds"]),
            "one_off_seconds": float(timing.get("logging", 0.0)) + float(timing.get("checkpoint", 0.0)),
            "seconds": {"forward": forward, "environment": rollout - forward, "learn": learn,
                        "calculator": calc_pure, "bookkeeping": calc_bucket - calc_pure},
            "share": {"forward": forward / loop, "environment": (rollout - forward) / loop, "learn": learn / loop,
                      "calculator": calc_pure / loop, "bookkeeping": (calc_bucket - calc_pure) / loop},
            "structures_evaluated": len(recorded), "cache_hits": int(summary.get("cache_hits", 0)),
            "energy_evaluations": int(summary["energy_evaluations"]), "dead_ends": int(summary.get("dead_ends", 0)),
        },
        "greedy": {
            "episodes": n_greedy, "finished": len(finished), "build_seconds": greedy_build,
            "forward_seconds": greedy_forward, "episodes_per_s": n_greedy / greedy_build,
            "episodes_per_s_with_energy": 1.0 / greedy_energy_per_ep,
            "share_forward": greedy_forward / greedy_build,
        },
        "floor": {"structures": len(recorded), "seconds_per_structure": floor,
                  "calls_per_structure": float(np.mean(calls)) if calls else 0.0,
                  "in_training_seconds_per_structure": calc_pure / max(1, len(recorded)),
                  "optimizer": problem.relax.optimizer if problem.relax.steps > 0 else None,
                  "by_optimizer": optimizers},
        "ratio_to_floor": {"train": train_per_ep / floor, "greedy": greedy_per_ep / floor,
                           "greedy_with_energy": greedy_energy_per_ep / floor},
        "peak_rss_mb": {"after_training": rss_train, "end": peak_rss_mb()},
        "loadavg_1min": {"start": load0, "end": os.getloadavg()[0]},
    }


def _floor(problem: Any, structures: list) -> tuple[float, list[int], list[float]]:
    """Seconds per structure of the calculator alone (warm, no cache), calls and energies.

    The warm-up uses the bare template: the same structure twice would be answered from ASE's own cache.
    """
    from asla.reward import EnergyEvaluator
    evaluator = EnergyEvaluator(problem, use_cache=False)
    evaluator.evaluate(problem.empty_atoms())
    t0 = time.perf_counter()
    evs = [evaluator.evaluate(a) for a in structures]
    seconds = (time.perf_counter() - t0) / max(1, len(structures))
    return seconds, [ev.n_calls for ev in evs], [ev.energy for ev in evs]


# ---- worker: gradient step and acting forward pass under torch settings -----------------------------

def run_micro(spec: dict) -> dict:
    import torch

    from asla import load_problem
    from asla.agents.agent import Agent
    from asla.agents.config import load_config
    from asla.agents.qnetwork import NetworkConfig
    from asla.agents.replay import Episode, ReplayBuffer
    from asla.agents.training import _learn_step
    from asla.builder import BuildState, random_build
    from asla.reward import RewardScale

    recipe = load_config(str(RECIPE))
    out: dict[str, Any] = {"grids": []}
    for g in spec["grids"]:
        problem = load_problem(BASE_PROBLEM, **family_overrides(g["cell"], g["spacing"], 0))
        rng = np.random.default_rng(0)
        replay, scale = ReplayBuffer(2000, 20), RewardScale()
        episodes = []
        while len(episodes) < spec["replay_episodes"]:
            b = random_build(problem, rng)
            if b.done:
                episodes.append(b)
        for i, b in enumerate(episodes):  # energies only set the reward scale; timing does not depend on them
            replay.add(Episode(list(b.actions), float(rng.normal()), tuple(b.actions), i))
        scale.update([e.energy for e in replay.recent])
        obs = []
        for b in episodes[:8]:  # the acting batch: n_builders = 8 builds halfway through
            s = BuildState(problem)
            for a in b.actions[: len(b.actions) // 2]:
                s.place(a)
            obs.append(s.observation())
        torch.manual_seed(0)
        base = Agent.for_problem(problem, NetworkConfig(**recipe["network"], periodic=True), device="cpu")
        row: dict[str, Any] = {"cell": g["cell"], "spacing": g["spacing"], "grid": list(problem.grid.shape),
                               "learn": {}, "forward": {}, "compile": {}}

        # gradient step: variants interleaved round by round (same samples for every variant)
        learners = {}
        for threads in spec["threads"]:
            for fmt in ("contiguous", "channels_last"):
                learners[f"threads={threads} {fmt}"] = (threads, _learner(base, fmt, False))
        if g.get("compile"):
            torch.set_num_threads(spec["compile_threads"])
            t0 = time.perf_counter()
            comp = _learner(base, "contiguous", True)
            _learn_step(comp[0], comp[1], problem, replay, scale, np.random.default_rng(99), recipe["learning"],
                        recipe["augment"])
            row["compile"]["learn_compile_seconds"] = time.perf_counter() - t0
            learners[f"threads={spec['compile_threads']} contiguous compiled"] = (spec["compile_threads"], comp)
        times: dict[str, list[float]] = {k: [] for k in learners}
        for r in range(g["reps"] + 1):  # round 0 warms up every variant
            names = list(learners)
            names = names[r % len(names):] + names[: r % len(names)]
            for name in names:
                threads, (agent, opt) = learners[name]
                torch.set_num_threads(threads)
                t0 = time.perf_counter()
                _learn_step(agent, opt, problem, replay, scale, np.random.default_rng(1000 + r), recipe["learning"],
                            recipe["augment"])
                if r:
                    times[name].append(time.perf_counter() - t0)
        row["learn"] = {k: {"median_seconds": float(np.median(v)), "runs": v} for k, v in times.items()}

        # acting forward pass on the batch of 8 observations
        x = torch.as_tensor(np.stack(obs), dtype=torch.float32)
        nets = {"contiguous": copy.deepcopy(base.net).eval(),
                "channels_last": copy.deepcopy(base.net).to(memory_format=torch.channels_last).eval()}
        inputs = {"contiguous": x, "channels_last": x.contiguous(memory_format=torch.channels_last)}
        contexts = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad}
        fwd: dict[str, tuple] = {}
        for threads in spec["threads"]:
            for ctx in contexts:
                for fmt in nets:
                    fwd[f"threads={threads} {ctx} {fmt} batch=8"] = (threads, ctx, nets[fmt], inputs[fmt])
            fwd[f"threads={threads} inference_mode contiguous batch=1"] = (threads, "inference_mode",
                                                                           nets["contiguous"], x[:1])
        if g.get("compile"):
            torch.set_num_threads(spec["compile_threads"])
            compiled = torch.compile(copy.deepcopy(base.net).eval())
            t0 = time.perf_counter()
            with torch.inference_mode():
                y = compiled(x)
                row["compile"]["forward_compile_seconds"] = time.perf_counter() - t0
                row["compile"]["forward_max_abs_diff"] = float((y - nets["contiguous"](x)).abs().max())
            fwd[f"threads={spec['compile_threads']} inference_mode contiguous batch=8 compiled"] = (
                spec["compile_threads"], "inference_mode", compiled, x)
        ftimes: dict[str, list[float]] = {k: [] for k in fwd}
        for r in range(g["reps"] + 1):
            names = list(fwd)
            names = names[r % len(names):] + names[: r % len(names)]
            for name in names:
                threads, ctx, net, inp = fwd[name]
                torch.set_num_threads(threads)
                with contexts[ctx]():
                    net(inp)
                    k, t0 = 0, time.perf_counter()
                    while k < 2 or (time.perf_counter() - t0 < spec["forward_seconds"] and k < 200):
                        net(inp)
                        k += 1
                    dt = (time.perf_counter() - t0) / k
                if r:
                    ftimes[name].append(dt / inp.shape[0])
        row["forward"] = {k: {"median_ms_per_sample": 1e3 * float(np.median(v)), "runs_ms": [1e3 * t for t in v]}
                          for k, v in ftimes.items()}
        out["grids"].append(row)
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def _learner(base: Any, fmt: str, compiled: bool) -> tuple[Any, Any]:
    """A copy of the agent with its own Adam, in the given memory format, optionally compiled."""
    import torch
    agent = copy.deepcopy(base)
    if fmt == "channels_last":
        agent.net = agent.net.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(agent.net.parameters(), lr=1e-3)
    if compiled:
        agent.net = torch.compile(agent.net)
    return agent, opt


# ---- driver ---------------------------------------------------------------------------------------

def in_subprocess(kind: str, spec: dict, timeout: float) -> Any:
    """Run one worker in a fresh interpreter, so peak RSS and torch state are its own.

    torch.compile gets an empty cache directory: a warm on-disk cache from earlier runs would make the
    compile time look like a few seconds.
    """
    with tempfile.TemporaryDirectory(prefix="asla-throughput-") as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--spec", json.dumps(spec),
               "--result", str(result)]
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "TORCHINDUCTOR_CACHE_DIR": str(Path(tmp) / "inductor")}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(ROOT))
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s", **spec}
        if proc.returncode != 0 or not result.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return {"error": f"exit {proc.returncode}: {' | '.join(tail)}", **spec}
        return json.loads(result.read_text())


def machine() -> dict:
    import ase
    import torch

    import asla
    cpu = "?"
    with contextlib.suppress(OSError):
        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    mem = "?"
    with contextlib.suppress(OSError, StopIteration):
        kb = int(next(ln.split()[1] for ln in open("/proc/meminfo") if ln.startswith("MemTotal")))
        mem = f"{kb / 1024 ** 2:.0f} GiB"
    return {"cpu": cpu, "vcpus": os.cpu_count(), "memory": mem, "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "ase": ase.__version__, "asla": asla.__version__, "mkldnn": bool(torch.backends.mkldnn.is_available())}


def git_state() -> dict:
    """The commit measured and the files that differed from it (the tree is shared and changes)."""
    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], capture_output=True, text=True, cwd=ROOT, timeout=30).stdout.rstrip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "modified": [ln[3:] for ln in git("status", "--short", "--untracked-files=no").splitlines()]}


def parse_episodes(items: list[str]) -> dict[int, int]:
    out = {}
    for item in items:
        cell, _, n = item.partition("=")
        try:
            out[int(cell)] = int(n)
        except ValueError:
            raise SystemExit(f"throughput.py: error: --episodes: expected CELL=EPISODES such as 8=2, got {item!r}") \
                from None
        if out[int(cell)] < 1:
            raise SystemExit(f"throughput.py: error: --episodes: episodes must be >= 1, got {item!r}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help=f"a coarse {QUICK_SPACING} A grid only, 2 episodes per configuration, one round, 1 thread, "
                         "no compile "
                         "(checks the script end to end in about a minute; the numbers mean little)")
    ap.add_argument("--cells", type=int, nargs="+", default=[3, 5, 8])
    ap.add_argument("--spacings", type=float, nargs="+", default=None, help="A; default 0.25 0.2 0.15")
    ap.add_argument("--relax", type=int, nargs="+", default=[10, 0], help="relaxation steps before the reward")
    ap.add_argument("--episodes", nargs="+", default=None,
                    help="training episodes per cell, CELL=N (default 3=8 5=4 8=1, about 20 min on a shared 2-vCPU "
                         "machine; lockstep builds = min(8, N))")
    ap.add_argument("--torch-threads", default="auto",
                    help="threads for the per-configuration runs: 1, 2, or auto = the faster gradient step "
                         "in this run's side-by-side measurement")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (about 2 min of compiling)")
    ap.add_argument("--reps", type=int, default=None,
                    help="interleaved rounds of the settings measurement (default 3 on the small grid, 2 on the large)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="docs")
    ap.add_argument("--render", metavar="JSON", help="only rewrite the Markdown report (next to --out) from a "
                    "throughput.json of an earlier run; measures nothing")
    ap.add_argument("--worker", choices=["config", "micro"], help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        spec = json.loads(args.spec)
        res = run_config(spec) if args.worker == "config" else run_micro(spec)
        Path(args.result).write_text(json.dumps(res))
        return

    from tqdm.auto import tqdm

    from asla.storage import atomic_write_text, write_json

    if args.render:
        result = json.loads(Path(args.render).read_text())
        ok = [r for r in result["configs"] if "error" not in r]
        result["scaling"], result["summary"] = scaling_fits(ok), summarize(ok, result["settings"])
        result["meta"]["rendered_by"] = "python scripts/throughput.py " + " ".join(sys.argv[1:])
        write_json(Path(args.out) / "throughput.json", result)
        atomic_write_text(Path(args.out) / "throughput.md", report(result))
        print(f"rewrote {Path(args.out) / 'throughput.md'} from {args.render}")
        return

    spacings = args.spacings or ([QUICK_SPACING] if args.quick else [0.25, 0.2, 0.15])
    episodes = {3: 2, 5: 2, 8: 1} if args.quick else {3: 8, 5: 4, 8: 1}
    episodes.update(parse_episodes(args.episodes or []))
    if args.torch_threads not in ("auto", "1", "2"):
        raise SystemExit(f"throughput.py: error: --torch-threads: allowed: auto, 1, 2; got {args.torch_threads!r}")
    reps = args.reps or (1 if args.quick else 3)
    reps_large = args.reps or 2
    compile_ = not (args.quick or args.no_compile)
    command = "python scripts/throughput.py" + ("" if len(sys.argv) == 1 else " " + " ".join(sys.argv[1:]))
    meta = {"command": command, "machine": machine(), "git": git_state(), "compile_cache": "empty",
            "loadavg_start": list(os.getloadavg()),
            "recipe": str(RECIPE.relative_to(ROOT)), "quick": args.quick, "episodes_per_cell": episodes,
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    t_run = time.perf_counter()

    # 1. settings side by side: the recipe's 3x3 grid and a 5x5 at 0.2 A (where compute matters more)
    grids = [{"cell": 3, "spacing": QUICK_SPACING if args.quick else SHIPPED_SPACING, "reps": reps}]
    if not args.quick:
        grids.append({"cell": 5, "spacing": 0.2, "compile": compile_, "reps": reps_large})
    print(f"settings: gradient step and forward pass on {len(grids)} grid(s), {reps} round(s) or fewer"
          f"{', with torch.compile' if compile_ else ''} ...", flush=True)
    # quick: one thread only (two threads on a busy 2-vCPU machine can take 5-50x longer)
    micro = in_subprocess("micro", {"grids": grids, "replay_episodes": 8, "forward_seconds": 0.3,
                                    "threads": [1] if args.quick else [1, 2], "compile_threads": 1}, timeout=1800)
    if "error" in micro:
        print(f"settings measurement failed: {micro['error']}", flush=True)
    else:
        print(settings_table(micro), flush=True)
    threads = choose_threads(args.torch_threads, micro)
    meta["torch_threads"] = threads

    # 2. one process per (cell, spacing); inside it, one training run per relaxation setting
    specs = [{"cell": c, "spacing": s, "relax": args.relax, "episodes": episodes.get(c, 2),
              "threads": threads["value"], "seed": args.seed, "skip_images": args.quick}
             for c in args.cells for s in spacings]
    rows = []
    print(HEADER, flush=True)
    with tqdm(specs, unit="config", dynamic_ncols=True, leave=False) as bar:
        for spec in bar:
            bar.set_description(f"{spec['cell']}x{spec['cell']} {spec['spacing']:g} A")
            res = in_subprocess("config", spec, timeout=1800)
            new = res if isinstance(res, list) else [{**res, "relax_steps": r} for r in args.relax]
            rows += new
            for row in new:
                tqdm.write(format_row(row))
    meta["loadavg_end"] = list(os.getloadavg())
    meta["seconds"] = time.perf_counter() - t_run
    ok = [r for r in rows if "error" not in r]
    result = {"meta": meta, "configs": rows, "settings": micro, "scaling": scaling_fits(ok),
              "summary": summarize(ok, micro)}
    out = Path(args.out)
    write_json(out / "throughput.json", result)
    atomic_write_text(out / "throughput.md", report(result))
    print(f"\nwrote {out / 'throughput.json'} and {out / 'throughput.md'} ({meta['seconds'] / 60:.1f} min)")
    if len(ok) < len(rows):
        sys.exit(f"{len(rows) - len(ok)} configuration(s) failed; see the JSON")


# ---- analysis -------------------------------------------------------------------------------------

def choose_threads(setting: str, micro: dict) -> dict:
    if setting != "auto":
        return {"value": int(setting), "how": "--torch-threads"}
    if "error" in micro:
        return {"value": 1, "how": "auto; settings measurement failed, 1 thread is safe on a shared machine"}
    learn = micro["grids"][-1]["learn"]
    if "threads=2 contiguous" not in learn:
        return {"value": 1, "how": "auto; only 1 thread was measured (--quick)"}
    t1, t2 = learn["threads=1 contiguous"]["median_seconds"], learn["threads=2 contiguous"]["median_seconds"]
    return {"value": 1 if t1 <= t2 else 2,
            "how": f"auto: gradient step {t1:.3f} s with 1 thread vs {t2:.3f} s with 2 in this run"}


def settings_ratios(micro: dict) -> list[dict]:
    """Speed of every setting relative to what the code does today (2 threads, inference_mode, contiguous).

    Without a 2-thread measurement (--quick) the reference is the same setting with 1 thread.
    """
    out = []
    for g in micro.get("grids", []):
        learn_ref = next(k for k in (f"threads={t} contiguous" for t in (BASELINE["threads"], 1)) if k in g["learn"])
        fwd_ref = next(k for k in (f"threads={t} inference_mode contiguous batch=8" for t in (BASELINE["threads"], 1))
                       if k in g["forward"])
        for name, v in g["learn"].items():
            out.append({"grid": g["grid"], "kind": "gradient step", "setting": name, "value": v["median_seconds"],
                        "unit": "s", "reference": learn_ref,
                        "speedup": g["learn"][learn_ref]["median_seconds"] / v["median_seconds"]})
        for name, v in g["forward"].items():
            out.append({"grid": g["grid"], "kind": "acting forward", "setting": name,
                        "value": v["median_ms_per_sample"], "unit": "ms/sample", "reference": fwd_ref,
                        "speedup": g["forward"][fwd_ref]["median_ms_per_sample"] / v["median_ms_per_sample"]})
    return out


def scaling_fits(rows: list[dict]) -> dict:
    """Least-squares exponents: cost per episode ~ pixels^a * atoms^b (each part, training and greedy)."""
    if len(rows) < 3:
        return {}
    rows = [r for r in rows if r["relax_steps"] == max(x["relax_steps"] for x in rows)]
    P = np.array([r["pixels"] for r in rows], float)
    n = np.array([r["atoms_placed"] for r in rows], float)
    parts = {f"train {k}": [r["train"]["seconds"][k] / r["train"]["episodes"] for r in rows]
             for k in ("forward", "environment", "learn", "calculator")}
    parts["train total"] = [r["train"]["seconds_per_episode"] for r in rows]
    parts["greedy build"] = [r["greedy"]["build_seconds"] / r["greedy"]["episodes"] for r in rows]
    parts["calculator floor"] = [r["floor"]["seconds_per_structure"] for r in rows]
    # atoms and pixels can be told apart only if some cell appears at more than one spacing
    two = len(rows) >= 3 and any(len({r["spacing"] for r in rows if r["cell"] == c}) > 1
                                 for c in {r["cell"] for r in rows})
    out = {"rows_used": len(rows), "relax_steps": rows[0]["relax_steps"],
           "model": "log(seconds per episode) = a*log(pixels) + b*log(atoms placed) + c" if two
           else "log(seconds per episode) = a*log(pixels) + c (pixels and atoms grow together here)"}
    for name, y in parts.items():
        y = np.maximum(np.array(y, float), 1e-9)
        X = np.c_[np.log(P), np.log(n), np.ones_like(P)] if two else np.c_[np.log(P), np.ones_like(P)]
        coef, *_ = np.linalg.lstsq(X, np.log(y), rcond=None)
        out[name] = {"pixels_exponent": float(coef[0]), "atoms_exponent": float(coef[1]) if two else None}
    return out


def setting_effects(micro: dict) -> list[dict]:
    """One change at a time, everything else fixed: speed-up > 1 means the change is faster."""
    out = []
    for g in micro.get("grids", []):
        L, F = g["learn"], g["forward"]

        def add(part: str, change: str, threads: Any, old: str, new: str, L: dict = L, F: dict = F,
                g: dict = g) -> None:  # this grid's tables, bound now
            table, key = (L, "median_seconds") if part == "gradient step" else (F, "median_ms_per_sample")
            if old in table and new in table:
                out.append({"grid": g["grid"], "part": part, "change": change, "threads": threads,
                            "speedup": table[old][key] / table[new][key]})
        add("gradient step", "2 threads -> 1", "-", "threads=2 contiguous", "threads=1 contiguous")
        add("acting forward", "2 threads -> 1", "-", "threads=2 inference_mode contiguous batch=8",
            "threads=1 inference_mode contiguous batch=8")
        for t in (1, 2):
            add("gradient step", "contiguous -> channels_last", t, f"threads={t} contiguous",
                f"threads={t} channels_last")
            add("acting forward", "contiguous -> channels_last", t, f"threads={t} inference_mode contiguous batch=8",
                f"threads={t} inference_mode channels_last batch=8")
            add("acting forward", "no_grad -> inference_mode", t, f"threads={t} no_grad contiguous batch=8",
                f"threads={t} inference_mode contiguous batch=8")
            add("acting forward", "1 build per pass -> 8 (per sample)", t,
                f"threads={t} inference_mode contiguous batch=1", f"threads={t} inference_mode contiguous batch=8")
            add("gradient step", "eager -> torch.compile", t, f"threads={t} contiguous",
                f"threads={t} contiguous compiled")
            add("acting forward", "eager -> torch.compile", t, f"threads={t} inference_mode contiguous batch=8",
                f"threads={t} inference_mode contiguous batch=8 compiled")
    return out


def relaxation_overheads(rows: list[dict]) -> list[dict]:
    """Relaxation floor against its calculator calls priced as single points (same cell and grid, this run)."""
    out = []
    for r in rows:
        if r["relax_steps"] == 0:
            continue
        single = next((x for x in rows if x["relax_steps"] == 0 and x["cell"] == r["cell"]
                       and x["spacing"] == r["spacing"]), None)
        if single is None:
            continue
        calls = r["floor"]["calls_per_structure"] * single["floor"]["seconds_per_structure"]
        row = {"cell": r["cell"], "spacing": r["spacing"], "atoms_total": r["atoms_total"],
               "relax_seconds": r["floor"]["seconds_per_structure"], "calls_as_single_points_seconds": calls,
               "optimizer_share": max(0.0, 1.0 - calls / r["floor"]["seconds_per_structure"]),
               "optimizer": r["floor"].get("optimizer")}
        for name, v in (r["floor"].get("by_optimizer") or {}).items():
            row[f"{name}_seconds"] = v["seconds_per_structure"]
            row[f"{name}_max_abs_dE"] = v["max_abs_energy_difference"]
        out.append(row)
    return out


def summarize(rows: list[dict], micro: dict) -> dict:
    if not rows:
        return {}
    parts = ("forward", "environment", "learn", "calculator", "bookkeeping")
    by_relax: dict[str, Any] = {}
    for relax in sorted({r["relax_steps"] for r in rows}, reverse=True):
        sel = [r for r in rows if r["relax_steps"] == relax]
        dominant = [max(parts, key=lambda p: r["train"]["share"][p]) for r in sel]

        def span(f: Any) -> list[float]:
            vals = [f(r) for r in sel]  # noqa: B023 - used at once
            return [min(vals), max(vals)]
        by_relax[str(relax)] = {
            "share_range": {p: span(lambda r, p=p: r["train"]["share"][p]) for p in parts},
            "agent_share_range": span(lambda r: r["train"]["share"]["forward"] + r["train"]["share"]["learn"]),
            "dominant": {p: dominant.count(p) for p in set(dominant)},
            "train_ratio_to_floor": span(lambda r: r["ratio_to_floor"]["train"]),
            "greedy_ratio_to_floor": span(lambda r: r["ratio_to_floor"]["greedy_with_energy"]),
            "greedy_forward_share": span(lambda r: r["greedy"]["share_forward"]),
        }
    ok_micro = "error" not in micro
    return {"by_relax": by_relax, "settings": settings_ratios(micro) if ok_micro else [],
            "effects": setting_effects(micro) if ok_micro else [], "relaxation": relaxation_overheads(rows)}


# ---- output ---------------------------------------------------------------------------------------

HEADER = (f"{'cell':>4s} {'dA':>5s} {'grid':>8s} {'atoms':>5s} {'relax':>5s} {'eps':>4s} {'train ep/s':>10s} "
          f"{'fwd':>5s} {'env':>5s} {'learn':>5s} {'calc':>5s} {'book':>5s} {'greedy ep/s':>11s} {'+energy':>8s} "
          f"{'floor s':>8s} {'x floor':>7s} {'RSS MB':>7s}")


def format_row(r: dict) -> str:
    if "error" in r:
        return f"{r['cell']:>4d} {r['spacing']:>5g} failed: {r['error']}"
    t, s = r["train"], r["train"]["share"]
    return (f"{r['cell']:>4d} {r['spacing']:>5g} {r['grid'][0]:>3d}x{r['grid'][1]:<4d} {r['atoms_placed']:>5d} "
            f"{r['relax_steps']:>5d} {t['episodes']:>4d} {t['episodes_per_s']:>10.3f} {s['forward']:>5.0%} "
            f"{s['environment']:>5.0%} {s['learn']:>5.0%} {s['calculator']:>5.0%} {s['bookkeeping']:>5.0%} "
            f"{r['greedy']['episodes_per_s']:>11.3f} {r['greedy']['episodes_per_s_with_energy']:>8.3f} "
            f"{r['floor']['seconds_per_structure']:>8.3f} {r['ratio_to_floor']['train']:>7.1f} "
            f"{r['peak_rss_mb']['end']:>7.0f}")


def settings_table(micro: dict) -> str:
    lines = []
    for r in settings_ratios(micro):
        lines.append(f"{r['grid'][0]}x{r['grid'][1]:<4d} {r['kind']:15s} {r['setting']:52s} "
                     f"{r['value']:9.3f} {r['unit']:9s} x{r['speedup']:.2f} vs {r['reference']}")
    return "\n".join(lines)


def _pct(lo_hi: list[float]) -> str:
    lo, hi = lo_hi
    return f"{100 * lo:.0f}%" if round(100 * lo) == round(100 * hi) else f"{100 * lo:.0f}-{100 * hi:.0f}%"


def report(res: dict) -> str:
    meta, rows, micro = res["meta"], res["configs"], res["settings"]
    m = meta["machine"]
    ok = [r for r in rows if "error" not in r]
    L = ["# Throughput: where asla's time goes", "",
         f"Command: `{meta['command']}` ({meta['seconds'] / 60:.1f} min, started {meta['started']})  ",
         f"Machine: {m['cpu']}, {m['vcpus']} vCPUs, {m['memory']}; Python {m['python']}, torch {m['torch']}, "
         f"numpy {m['numpy']}, ase {m['ase']}, asla {m['asla']}; float32 throughout.  ",
         (f"Code: commit {meta['git']['commit']}"
          + (f" with uncommitted changes to {', '.join(meta['git']['modified'])}" if meta["git"]["modified"] else "")
          + ".  " if meta.get("git") else ""),
         f"Load average (1 min) {meta['loadavg_start'][0]:.2f} at the start, {meta['loadavg_end'][0]:.2f} at the "
         "end (per configuration in the JSON); the machine is shared, so compare ratios measured in this run "
         "rather than absolute rates across runs.  ",
         (f"Report text regenerated from this run's JSON (no new measurements) by `{meta['rendered_by']}`.  "
          if meta.get("rendered_by") else ""),
         f"Torch threads for the per-configuration runs: {meta['torch_threads']['value']} "
         f"({meta['torch_threads']['how']}).", "",
         "## Training and greedy inference per configuration", "",
         f"Problems: the Pd(100) oxide of `{BASE_PROBLEM}` (3-layer fixed slab, 3 build layers, EMT) scaled to "
         "n x n cells at its coverage (Pd n^2 O floor(2n^2/3): Pd9O6, Pd25O16, Pd64O42), at the given grid "
         f"spacing (pixels per surface repeat fixed, so the grids are commensurate); calculator "
         f"{ok[0].get('calculator', 'emt') if ok else 'emt'}. Training: the recipe "
         f"`{meta['recipe']}` unchanged (8 builders in lockstep, 1 gradient step of batch 64 per episode, width 32 "
         "depth 4 kernel 5) except `learning.warmup_episodes=0` so that every measured episode pays its gradient "
         f"step as in a long run, and episodes per configuration scaled to fit the time: "
         f"{', '.join(f'{c}x{c}: {n}' for c, n in sorted(meta['episodes_per_cell'].items()))} "
         "(lockstep builds = min(8, episodes)). Episodes/s counts the loop (acting + calculator + learning); the "
         "one-off TensorBoard images and checkpoint are left out (JSON: `one_off_seconds`). Shares of the loop: "
         "**fwd** acting forward passes, **env** the environment (masks, observations, placing), **learn** "
         "gradient steps (sampling, encoding, forward + backward + Adam), **calc** the calculator itself, "
         "**book** symmetry keys, cache, database and replay. **Greedy**: the trained agent builds "
         "min(8, episodes) structures with epsilon 0 (builds only; +energy: plus the floor per structure, since "
         "greedy builds of one agent coincide and evaluating copies would only measure caches). "
         "**Floor**: the calculator alone (warm, no cache) on the structures training evaluated, seconds per "
         "structure; **x floor** = training seconds per episode / floor. Peak RSS of the configuration's "
         "process (problem, training, greedy, floor).", "",
         "| cell | spacing (A) | grid | atoms placed | relax steps | episodes | train ep/s | fwd | env | learn | calc "
         "| book | greedy ep/s | greedy +energy ep/s | floor (s/structure) | train x floor | greedy+energy x floor "
         "| peak RSS (MB) |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            L.append(f"| {r['cell']}x{r['cell']} | {r['spacing']:g} | failed: {r['error']} |" + " |" * 15)
            continue
        t, s = r["train"], r["train"]["share"]
        L.append(f"| {r['cell']}x{r['cell']} | {r['spacing']:g} | {r['grid'][0]}x{r['grid'][1]} | {r['atoms_placed']} "
                 f"| {r['relax_steps']} | {t['episodes']} | {t['episodes_per_s']:.3f} | {s['forward']:.0%} | "
                 f"{s['environment']:.0%} | {s['learn']:.0%} | {s['calculator']:.0%} | {s['bookkeeping']:.0%} | "
                 f"{r['greedy']['episodes_per_s']:.3f} | {r['greedy']['episodes_per_s_with_energy']:.3f} | "
                 f"{r['floor']['seconds_per_structure']:.3f} | {r['ratio_to_floor']['train']:.1f} | "
                 f"{r['ratio_to_floor']['greedy_with_energy']:.1f} | {r['peak_rss_mb']['end']:.0f} |")
    if ok:
        L += ["", "Problem set-up (validation by a random build, symmetry tables), once per process: " +
              ", ".join(f"{r['cell']}x{r['cell']} @ {r['spacing']:g} A {r['setup_seconds']:.1f} s"
                        for r in ok if r["relax_steps"] == ok[0]["relax_steps"]) + "."]
    fits = res["scaling"]
    if fits:
        L += ["", "## Growth of the cost per episode", "",
              f"Fitted over the {fits['rows_used']} configurations with {fits['relax_steps']} relaxation steps: "
              f"{fits['model']}.", "", "| part | pixels exponent a | atoms exponent b |", "|---|---|---|"]
        for name, v in fits.items():
            if isinstance(v, dict):
                b = "-" if v["atoms_exponent"] is None else f"{v['atoms_exponent']:.2f}"
                L.append(f"| {name} | {v['pixels_exponent']:.2f} | {b} |")
    if "error" not in micro:
        L += ["", "## Torch settings side by side", "",
              "The gradient step is `asla.agents.training._learn_step` itself (batch 64, the recipe's network and "
              "augmentation, a replay of random builds); the forward pass is the network on 8 observations "
              "halfway through builds (the acting batch) or on 1. Variants are applied from outside (the model "
              "converted with `.to(memory_format=torch.channels_last)`, `torch.compile(net)`), interleaved round "
              f"by round; medians of {micro_reps(micro)} rounds. Speed-up is against " + (
                  f"what the code does today ({BASELINE['threads']} threads, inference_mode, contiguous, eager, "
                  "batch 8 = the 8 builders in lockstep)." if has_two_threads(micro) else
                  "1 thread, inference_mode, contiguous, eager, batch 8 (2 threads not measured in this run)."), "",
              "| grid | part | setting | median | speed-up |", "|---|---|---|---|---|"]
        for r in settings_ratios(micro):
            L.append(f"| {r['grid'][0]}x{r['grid'][1]} | {r['kind']} | {r['setting']} | {r['value']:.3f} {r['unit']} "
                     f"| {r['speedup']:.2f} |")
        L += ["", "One change at a time, everything else as in the row before it (speed-up > 1: the change is "
              "faster):", "", "| grid | part | change | threads | speed-up |", "|---|---|---|---|---|"]
        for e in setting_effects(micro):
            L.append(f"| {e['grid'][0]}x{e['grid'][1]} | {e['part']} | {e['change']} | {e['threads']} | "
                     f"{e['speedup']:.2f} |")
        for g in micro["grids"]:
            if g["compile"]:
                c = g["compile"]
                L.append("")
                L.append(f"torch.compile on {g['grid'][0]}x{g['grid'][1]} ("
                         + ("empty inductor cache" if meta.get("compile_cache") == "empty" else
                            "warm on-disk inductor cache from earlier runs; a cold compile is slower")
                         + "): compiling took "
                         f"{c.get('forward_compile_seconds', float('nan')):.0f} s (forward, inference) and "
                         f"{c.get('learn_compile_seconds', float('nan')):.0f} s (training step); compiled and eager "
                         f"forward passes differ by at most {c.get('forward_max_abs_diff', float('nan')):.1e}.")
        L.append("")
        L.append(f"Peak RSS of the settings process: {micro['peak_rss_mb']:.0f} MB.")
    relax = res["summary"].get("relaxation") if res["summary"] else None
    if relax:
        names = [k[:-8] for k in relax[0] if k.endswith("_seconds") and k[:-8] in ("BFGS", "LBFGS", "FIRE")]
        L += ["", "## What a relaxation costs", "",
              "The floor with relaxation against its calculator calls priced at this run's single-point floor "
              "(same structures' cell and grid): the rest is the optimizer's own work. The same structures relaxed "
              "the same number of steps by ASE's other optimizers, side by side (seconds per structure; max |dE| "
              "against the problem's optimizer after those steps).", "",
              "| cell | grid spacing (A) | atoms (with template) | relaxation (s) | its calls as single points (s) "
              "| optimizer's share |" + "".join(f" {n} (s) | {n} max abs dE (eV) |" for n in names),
              "|---|---|---|---|---|---|" + "---|---|" * len(names)]
        for r in relax:
            L.append(f"| {r['cell']}x{r['cell']} | {r['spacing']:g} | {r['atoms_total']} | {r['relax_seconds']:.3f} | "
                     f"{r['calls_as_single_points_seconds']:.3f} | {r['optimizer_share']:.0%} |" +
                     "".join(f" {r[n + '_seconds']:.3f} | {r[n + '_max_abs_dE']:.2g} |" for n in names))
    L += ["", "## What dominates and what to do", ""] + conclusions(res)
    return "\n".join(L) + "\n"


def has_two_threads(micro: dict) -> bool:
    return any(k.startswith("threads=2") for k in micro["grids"][0]["learn"])


def micro_reps(micro: dict) -> str:
    return " and ".join(f"{len(next(iter(g['learn'].values()))['runs'])} ({g['grid'][0]}x{g['grid'][1]})"
                        for g in micro["grids"])


def conclusions(res: dict) -> list[str]:
    """Statements read off this run's numbers; which part wins and what helps is not written in advance."""
    summ, rows = res["summary"], [r for r in res["configs"] if "error" not in r]
    if not summ:
        return ["No configuration finished."]
    out = []
    for relax, s in summ["by_relax"].items():
        dom = ", ".join(f"{PART_NAMES[k]} in {v}" for k, v in sorted(s["dominant"].items(), key=lambda kv: -kv[1]))
        sr = s["share_range"]
        out.append(f"- **Training, {relax} relaxation steps**: the largest part is {dom} of "
                   f"{sum(s['dominant'].values())} configurations. Agent (acting forward + gradient steps) "
                   f"{_pct(s['agent_share_range'])} of the loop: gradient steps {_pct(sr['learn'])}, acting forward "
                   f"{_pct(sr['forward'])}; environment {_pct(sr['environment'])}, "
                   f"calculator {_pct(sr['calculator'])}, "
                   f"bookkeeping {_pct(sr['bookkeeping'])}. A training episode costs "
                   f"{s['train_ratio_to_floor'][0]:.0f}-{s['train_ratio_to_floor'][1]:.0f}x the calculator floor, a "
                   f"greedy build with its energy {s['greedy_ratio_to_floor'][0]:.0f}-"
                   f"{s['greedy_ratio_to_floor'][1]:.0f}x (forward passes are {_pct(s['greedy_forward_share'])} of a "
                   "greedy build).")
    fits = res["scaling"]
    if fits and "train learn" in fits:
        def exp(name: str) -> str:
            v = fits[name]
            return f"pixels^{v['pixels_exponent']:.1f}" + ("" if v["atoms_exponent"] is None
                                                           else f" x atoms^{v['atoms_exponent']:.1f}")
        out.append(f"- **Growth per episode** (fit above): gradient steps ~ {exp('train learn')}, acting forward ~ "
                   f"{exp('train forward')}, environment ~ {exp('train environment')}, calculator ~ "
                   f"{exp('train calculator')}; a training episode as a whole ~ {exp('train total')}. The gradient "
                   "step costs a fixed batch of 64 whole-cell images per episode whatever the atom count, acting one "
                   "forward pass per placed atom.")
    if rows:
        big = max(rows, key=lambda r: r["train"]["seconds_per_episode"])
        small = min(rows, key=lambda r: r["train"]["seconds_per_episode"])
        out.append(f"- **Range**: {small['cell']}x{small['cell']} at {small['spacing']:g} A ({small['grid'][0]}x"
                   f"{small['grid'][1]}) trains at {small['train']['episodes_per_s']:.2f} episodes/s, "
                   f"{big['cell']}x{big['cell']} at {big['spacing']:g} A ({big['grid'][0]}x{big['grid'][1]}) at "
                   f"{big['train']['episodes_per_s']:.3f} ({big['train']['seconds_per_episode']:.0f} s per episode, "
                   f"{big['train']['seconds_per_episode'] / small['train']['seconds_per_episode']:.0f}x; peak RSS "
                   f"{big['peak_rss_mb']['end']:.0f} MB vs {small['peak_rss_mb']['end']:.0f} MB). Problem set-up "
                   f"(once per run) takes up to {max(r['setup_seconds'] for r in rows):.0f} s.")
    eff = summ.get("effects", [])

    def pick(part: str, change: str, threads: Any = None) -> list[dict]:
        return [e for e in eff if e["part"] == part and e["change"] == change
                and (threads is None or e["threads"] == threads)]

    def rng(es: list[dict]) -> str:
        v = [e["speedup"] for e in es]
        return f"x{min(v):.2f}" if abs(max(v) - min(v)) < 0.005 else f"x{min(v):.2f}-{max(v):.2f}"

    load = res["meta"]["loadavg_start"][0], res["meta"]["loadavg_end"][0]
    th = pick("gradient step", "2 threads -> 1") + pick("acting forward", "2 threads -> 1")
    if th:
        faster = all(e["speedup"] > 1 for e in th)
        slower = all(e["speedup"] < 1 for e in th)
        verdict = ("1 thread was faster everywhere: with the load other users put on this machine a second torch "
                   "thread waits for a busy core; `torch_threads: 1` should be the default here (set 2 only on an "
                   "idle machine, where docs/tuning.md measured 1.5-2x for it)" if faster else
                   "2 threads were faster everywhere: keep `torch_threads: 2`" if slower else
                   "neither thread count wins everywhere: keep the default and set it per machine")
        out.append(f"- **Threads** (load average {load[0]:.1f} -> {load[1]:.1f} on {res['meta']['machine']['vcpus']} "
                   f"vCPUs): going from 2 threads to 1 changed the gradient step by "
                   f"{rng(pick('gradient step', '2 threads -> 1'))} and the acting forward by "
                   f"{rng(pick('acting forward', '2 threads -> 1'))}; {verdict}.")
    comp = pick("gradient step", "eager -> torch.compile")
    compf = pick("acting forward", "eager -> torch.compile")
    grids = [g for g in res["settings"].get("grids", []) if g.get("compile")]
    if comp and grids:
        c = grids[0]["compile"]
        learn = grids[0]["learn"]
        t = comp[0]["threads"]
        saved = (learn[f"threads={t} contiguous"]["median_seconds"]
                 - learn[f"threads={t} contiguous compiled"]["median_seconds"])
        cold = res["meta"].get("compile_cache") == "empty"
        pays = (f"pays for its {c['learn_compile_seconds']:.0f} s of compiling after about "
                f"{c['learn_compile_seconds'] / saved:.0f} gradient steps (once per process and grid size"
                + ("" if cold else "; measured with a warm on-disk inductor cache left by earlier runs on this "
                   "machine, so a cold compile costs more") + ")" if saved > 0 else "does not pay")
        out.append(f"- **torch.compile** ({grids[0]['grid'][0]}x{grids[0]['grid'][1]}, {t} thread): gradient step "
                   f"{rng(comp)}, acting forward {rng(compf) if compf else 'not measured'}; for the learner it "
                   f"{pays}. Compiled and eager outputs agree to {c['forward_max_abs_diff']:.0e}.")
    for change, what, same in (("contiguous -> channels_last", "channels_last (vs contiguous)",
                                "not worth adopting"),
                               ("no_grad -> inference_mode", "inference_mode (vs no_grad; the agent uses it today)",
                                "nothing to change")):
        es = pick("gradient step", change) + pick("acting forward", change)
        if es:
            v = [e["speedup"] for e in es]
            verdict = ("faster everywhere" if min(v) >= 1.1 else "slower everywhere" if max(v) <= 0.9
                       else f"no consistent difference (mixed signs or within 10%): {same}")
            out.append(f"- **{what}**: {rng(es)} over the grids, thread counts and parts measured: {verdict}.")
    bat = pick("acting forward", "1 build per pass -> 8 (per sample)")
    if bat:
        per = "; ".join(f"{e['grid'][0]}x{e['grid'][1]} {e['threads']} thread(s) x{e['speedup']:.2f}" for e in bat)
        out.append(f"- **Batched builders** (8 builds per forward pass vs 1, cost per build): {per}. Batching pays "
                   "where the image is small; on large grids one image already fills the core.")
    relax = summ.get("relaxation", [])
    if relax:
        worst = max(relax, key=lambda r: r["relax_seconds"])
        shares = [r["optimizer_share"] for r in relax]
        line = (f"- **Relaxation**: the optimizer's own work is {_pct([min(shares), max(shares)])} "
                f"of a relaxation's time (largest cell: {worst['relax_seconds']:.2f} s per structure against "
                f"{worst['calls_as_single_points_seconds']:.3f} s for its calculator calls).")
        if all(k in worst for k in ("BFGS_seconds", "LBFGS_seconds")):
            sp = [r["BFGS_seconds"] / r["LBFGS_seconds"] for r in relax]
            de = max(r["LBFGS_max_abs_dE"] for r in relax)
            if "FIRE_max_abs_dE" in worst:
                line += (f" FIRE is as cheap as LBFGS but after the same steps ends up to "
                         f"{max(r['FIRE_max_abs_dE'] for r in relax):.0f} eV away (it starts slowly): no substitute.")
            line += (f" LBFGS takes x{min(sp):.1f}-{max(sp):.1f} less time than BFGS for the same steps and "
                     f"ends within {de:.1g} eV of it on these structures" +
                     (": `relax: {optimizer: LBFGS}` is the cheap fix." if de < 1e-3 else
                      "; whether its different path matters for the search is a learning-curve question."))
        out.append(line)
    if summ["by_relax"]:
        learn_lo = min(s["share_range"]["learn"][0] for s in summ["by_relax"].values())
        todo = []
        if th and all(e["speedup"] > 1 for e in th):
            todo.append("one torch thread on this shared machine")
        if comp and comp[0]["speedup"] >= 1.1:
            todo.append(f"torch.compile for the learner on long runs ({rng(comp)})")
        if relax and all(k in relax[0] for k in ("BFGS_seconds", "LBFGS_seconds")):
            sp = min(r["BFGS_seconds"] / r["LBFGS_seconds"] for r in relax)
            if sp >= 1.5 and max(r["LBFGS_max_abs_dE"] for r in relax) < 1e-3:
                todo.append("LBFGS instead of BFGS for the relaxation (it matters once the network is cheaper)")
        if learn_lo > 0.5:
            three = [r for r in rows if r["cell"] == min(x["cell"] for x in rows)]
            eight = [r for r in rows if r["cell"] == max(x["cell"] for x in rows)]
            ratio = (np.mean([r["train"]["seconds"]["learn"] / r["train"]["episodes"] for r in eight]) /
                     np.mean([r["train"]["seconds"]["learn"] / r["train"]["episodes"] for r in three]))
            todo.append("then the learning budget itself: fewer gradient steps per episode or a smaller batch on "
                        "large grids, or training on the small cell and transferring (the network does not depend "
                        f"on the cell size; a gradient step on the largest cell here costs {ratio:.0f}x one on the "
                        "smallest, averaged over spacings) -- these change what is learned and need learning "
                        "curves, not this benchmark")
            out.append(f"- **What to do**: the gradient steps are the bill (at least {learn_lo:.0%} of the loop in "
                       "every configuration). In order: " + "; ".join(todo) + ".")
        elif todo:
            out.append("- **What to do**: " + "; ".join(todo) + ".")
    return out


PART_NAMES = {"forward": "acting forward", "environment": "environment", "learn": "gradient steps",
              "calculator": "calculator", "bookkeeping": "bookkeeping"}


if __name__ == "__main__":
    main()
