"""Which problems the benchmark runs, named how, with which recipe and which pretrained agents.

A problem is a shipped name or a YAML path anywhere. Records and report sections are named by its slug: the
name itself for a shipped problem; for a file, its stem and a hash of its resolved path (two files of one stem
stay apart, and no raw path ends up in a file name). The defaults of this module (budgets, windows, the
transfer and zero-shot agents) are those of the committed report, for the shipped problems only; any other
problem takes the generic defaults and the agents given on the command line.
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from asla.errors import ConfigError
from asla.problem import Problem, list_problems, load_problem

PROBLEMS = ("pd100-oxide-2x2", "pd100-oxide-3x3", "pd100-oxide-5x5", "graphene-c24", "graphene-c24-xtb")
# The suite (issue 27): problems no recipe was tuned on, of the kinds users bring (two metals' adatoms, an oxide on
# another metal than Pd, a supported cluster, a molecule with xTB, a larger cell); `--problems suite` runs them all.
# Their references and how each was established: docs/reference-minima.md and each YAML's reference section.
SUITE = ("suite-cuag-pt100-3x3", "suite-cuag-pt100-4x4", "suite-cu100-oxide-3x3", "suite-pt7-au111",
         "suite-c4h4n2-xtb")
# Evaluations per run. EMT and Tersoff evaluations cost milliseconds, so the budgets are generous: AGOX's RSS and
# basin hopping did not reach the 2x2 minimum within 2,000 (trial, 2 seeds), the reference search took 35,543.
# The defaults are the budgets of the committed report (docs/benchmarks.md), so that `--seeds 10` extends it.
BUDGET = {"pd100-oxide-2x2": 10000, "pd100-oxide-3x3": 20000, "pd100-oxide-5x5": 12000, "graphene-c24": 2000,
          "graphene-c24-xtb": 2000}
DEFAULT_BUDGET = 10000
# GOFEE's surrogate costs minutes per iteration here (3-4 min on the 5x5 cell): budgets far below the others'.
GOFEE_BUDGET = {"pd100-oxide-2x2": 100, "pd100-oxide-3x3": 100, "pd100-oxide-5x5": 20, "graphene-c24": 100,
                "graphene-c24-xtb": 100, "pd100-oxide-2x2-dft": 150}
DEFAULT_GOFEE_BUDGET = 200
# ASLA with a surrogate (asla-surrogate, asla-transfer-surrogate) spends one real evaluation per episode: budgets
# where a DFT search lives, read at 300 as the surrogate issue asks (the 3x3 rows were run to 200, its target).
# The DFT problem: the 150 DFT evaluations (a minute each here, an hour on a production system).
SURROGATE_BUDGET = {"pd100-oxide-2x2": 300, "pd100-oxide-3x3": 200, "pd100-oxide-2x2-dft": 150}
DEFAULT_SURROGATE_BUDGET = 300
SURROGATE_METHODS = ("asla-surrogate", "asla-transfer-surrogate")
# Which best-energy improvements are relaxed for the basin check: those within WINDOW eV of the reference. The window
# only bounds the offline cost. On the oxides a grid build lies within a few eV of its relaxed basin; on the graphene
# sheets 30-190 eV above it (Tersoff seed 9's third build: 187 eV above as built, in the basin when relaxed), so there
# every improvement is relaxed (tens per run).
DEFAULT_WINDOW = 5.0
# The suite's molecule likewise: its bonds on a 0.25 A grid are off by up to 0.12 A, and an xTB relaxation of ten
# atoms costs a second or two.
# The DFT oxide: each relaxation to judge costs 12-56 GPAW steps (15-60 min here), so the window is as narrow as the
# measured descents allow: GPAW single points of the CHGNet-relaxed reference candidates lay 0.40, 1.07 and 1.49 eV
# above their own DFT-relaxed energies (docs/dft.md); the surrogate recipe's evaluated structures are CHGNet-relaxed.
WINDOW = {"graphene-c24": math.inf, "graphene-c24-xtb": math.inf, "suite-c4h4n2-xtb": math.inf,
          "pd100-oxide-2x2-dft": 2.0}
# Transfer and zero-shot agents come from another problem (an agent on its own training problem proves nothing):
# the 5x5 cell from the 3x3 agent, the 3x3 cell from the 5x5 agent, the 2x2 cell from the 3x3 agent. The graphene
# agents cannot cross calculators: the xTB and Tersoff cells differ in lattice constant, so their pixels differ.
# The DFT 2x2 oxide fine-tunes the EMT-trained 3x3 agent: transfer across calculators (does EMT knowledge shorten
# a DFT search?); the cells differ too, as for every other transfer row.
TRANSFER_SOURCE = {"pd100-oxide-5x5": "pd100-oxide-3x3", "pd100-oxide-2x2-dft": "pd100-oxide-3x3"}
ZERO_SHOT_AGENT = {"pd100-oxide-5x5": "pd100-oxide-3x3", "pd100-oxide-3x3": "pd100-oxide-5x5",
                   "pd100-oxide-2x2": "pd100-oxide-3x3"}


@dataclass(frozen=True)
class BenchProblem:
    """One problem of a benchmark: what to load, how records are named, which recipe and agents it runs with."""

    spec: str  # a shipped name, or the resolved path of a problem YAML
    slug: str  # names its records, traces and report section
    recipe: str | None  # ASLA's recipe (a YAML path); None: the default recipe derived from the problem
    transfer_from: str | None  # the agent asla-transfer fine-tunes (shipped name or path); None: not run
    zero_shot: str | None  # the agent asla-zeroshot builds with; None: not run
    surrogate_recipe: str | None = None  # the recipe of the surrogate methods (a `surrogate:` block); None: not run

    @property
    def shipped(self) -> bool:
        return self.slug == self.spec

    @property
    def base(self) -> Path | None:
        """The folder of the problem's YAML, where its relative paths (e.g. its reference structure) are looked for."""
        return None if self.shipped else Path(self.spec).parent

    def load(self, **overrides) -> Problem:  # load_problem's dotted overrides
        return load_problem(self.spec, **overrides)

    def config(self, sets: list[str] | None = None, surrogate: bool = False) -> dict:
        """ASLA's recipe on this problem (its `problem` replaced by this one), with `key=value` overrides;
        surrogate: the surrogate methods' recipe instead."""
        from asla.agents.config import load_config
        from asla.agents.defaults import default_recipe
        recipe = self.surrogate_recipe if surrogate else self.recipe
        return load_config(recipe if recipe else default_recipe(self.spec), [f"problem={self.spec}", *(sets or [])])

    def recipe_overrides(self) -> dict:
        """The problem overrides of the recipe (e.g. ten relaxation steps before the reward on Pd)."""
        return dict(self.config()["problem_overrides"])

    def recipe_label(self, surrogate: bool = False) -> str:
        if surrogate:
            shipped = self.shipped and self.surrogate_recipe == shipped_recipe(f"{self.slug}-surrogate")
            return f"configs/{self.slug}-surrogate.yaml" if shipped else (self.surrogate_recipe or "none")
        shipped_own = self.shipped and self.recipe is not None and self.recipe == shipped_recipe(self.slug)
        return f"configs/{self.slug}.yaml" if shipped_own else (
            self.recipe or "the default recipe (asla.agents.defaults)")

    def _committed(self, table: dict, default):
        """The committed report's value for a shipped problem (`table`), else the generic `default`."""
        return table.get(self.slug, default) if self.shipped else default

    def budget(self, method: str) -> int:
        if method in SURROGATE_METHODS:
            return self._committed(SURROGATE_BUDGET, DEFAULT_SURROGATE_BUDGET)
        if method == "gofee":
            return self._committed(GOFEE_BUDGET, DEFAULT_GOFEE_BUDGET)
        return self._committed(BUDGET, DEFAULT_BUDGET)

    def window(self) -> float:
        return self._committed(WINDOW, DEFAULT_WINDOW)


def expand_suite(specs: list[str]) -> list[str]:
    """The problems named on a command line, the word `suite` (where no file of that name exists) standing for SUITE."""
    return [q for spec in specs for q in (SUITE if spec == "suite" and not Path(spec).exists() else (spec,))]


def is_shipped(spec: str) -> bool:
    """As load_problem decides: a name without a suffix that is not a file is a shipped problem's name."""
    return not Path(spec).suffix and not Path(spec).exists() and spec in list_problems()


def slug(spec: str) -> str:
    if is_shipped(spec):
        return spec
    path = Path(spec).expanduser().resolve()
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).strip("-.") or "problem"
    return f"{stem}-{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"


def shipped_recipe(name: str) -> str | None:
    path = Path(str(resources.files("asla.configs"))) / f"{name}.yaml"
    return str(path) if path.exists() else None


def bench_problem(spec: str, recipe: str | None = None, transfer_from: str | None = None,
                  zero_shot: str | None = None, surrogate_recipe: str | None = None) -> BenchProblem:
    """The benchmark's view of a problem. Unknown names and missing files fail here, in one line (ProblemError).

    recipe: a recipe YAML (default: `configs/<name>.yaml` of a shipped problem, else the default recipe derived from
    the problem, asla.agents.defaults).
    surrogate_recipe: the surrogate methods' recipe (default: `configs/<name>-surrogate.yaml` of a shipped problem).
    transfer_from / zero_shot: agents (shipped names or paths); default for the shipped problems the tables above.
    """
    name = str(spec)
    if not is_shipped(name):
        load_problem(name)  # an unknown name or a missing file: its one-line error, before anything runs
        name = str(Path(name).expanduser().resolve())
    s = slug(name)
    for option, path in (("--recipe", recipe), ("--surrogate-recipe", surrogate_recipe)):
        if path is not None and not Path(path).exists():
            raise ConfigError(option, f"file {path!r} does not exist")
    shipped = s == name
    return BenchProblem(
        spec=name, slug=s,
        recipe=str(Path(recipe).resolve()) if recipe else (shipped_recipe(name) if shipped else None),
        transfer_from=transfer_from or (TRANSFER_SOURCE.get(name) if shipped else None),
        zero_shot=zero_shot or (ZERO_SHOT_AGENT.get(name) if shipped else None),
        surrogate_recipe=str(Path(surrogate_recipe).resolve()) if surrogate_recipe else (
            shipped_recipe(f"{name}-surrogate") if shipped else None))
