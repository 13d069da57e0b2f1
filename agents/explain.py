"""Why the agent chose a site: layer-wise relevance propagation (LRP) of one Q-value onto the observation image.

Jørgensen et al. (J. Chem. Phys. 151, 054111, 2019) show LRP heat maps of the atoms that drive a decision. This
module computes them for `asla.agents.qnetwork.QNetwork`: the Q-value of a chosen (species, layer, grid point) action
is handed back layer by layer, from the head through the residual blocks and the stem, onto the pixels of every
observation channel (placed atoms per species and layer, template planes, remaining-bag planes).

No attribution library serves this network: Captum's ``LRP`` (0.9) has no rule for ``nn.SiLU`` and sees modules only,
so the residual sums and the global mean branch, written as tensor operations, would pass plain gradients (with an
identity rule set on SiLU and zero biases, its relevance summed to 0.0562 for a Q of 0.0571). The rules below are
the standard ones, applied to each affine map by the gradient trick (Montavon et al., "Layer-wise relevance
propagation: an overview", 2019): for z = f(x) affine, R_x = x * J_f^T (R_z / z), which holds for circular padding
and the broadcast global branch as for any linear map, since autograd runs the layer's own padding.

Rules (`rule`):

- ``"epsilon"`` (LRP-epsilon) on every affine map (stem, each block's convolution plus global branch, head):
  R_i = sum_j x_i w_ij / (z_j + eps * sign(z_j)) R_j, with z_j including the bias. Residual sums y = x + a split
  R_y in proportion, R_x = x R_y / (y + eps sign y). SiLU passes relevance unchanged (the identity rule for
  element-wise maps). Promise: the input relevances sum to Q minus what the biases and eps absorb. With zero biases
  the sum is Q to a relative eps / |z| per layer (1e-5 in the tests); with biases the difference is the bias share,
  reported as `Explanation.unassigned`.
- ``"zplus"`` (LRP-alpha1-beta0, which is the z+ rule on the non-negative input image): only positive
  contributions x_i w_ij > 0 (biases ignored) share a neuron's relevance. Promise: every pixel's relevance has the
  sign of Q (or is zero), and the sum is Q exactly (to rounding) unless relevance reaches a neuron that has no
  positive contribution; that share is dropped and shows in `Explanation.unassigned`. Residual sums, whose two
  terms may have either sign in this network, split in proportion to |x| and |a| (positive parts alone would drop
  the relevance of every negative sum: half of it in a small random network).

Both rules multiply the input layer's result by the input itself, so a pixel whose value is 0 (no atom there,
smear 0) gets relevance exactly 0. With circular padding the network is periodic, so rolling the observation and
the action's grid point by whole pixels rolls the map the same way. The computation runs in float64 on the CPU on
a copy of the network: the agent and its weights are not touched and no random number is drawn.

A 3D network (ASLA-3D, ``network.kind: 3d``) is explained by the same rules over its volume: the relevance has the
observation's shape (channels, n_z, na, nb), and `Explanation.atoms_map` sums it over z as well for one picture.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from asla.builder import BuildState
from asla.errors import AslaError
from asla.problem import Problem

from .agent import Agent
from .qnetwork import Conv3dSlab, QNetwork

Rule = Literal["epsilon", "zplus"]
RULES: tuple[str, ...] = ("epsilon", "zplus")
DEFAULT_EPSILON = 1e-6  # small, so that what is not assigned is the biases' share, hardly eps's

Affine = Callable[[torch.Tensor, str], torch.Tensor]  # (input, part) -> output; part: "full", "pos" or "neg"


@dataclass
class Explanation:
    """The relevance of one action's Q-value over the observation image it was computed from."""

    relevance: np.ndarray  # (channels, na, nb), the observation's channel order (Agent card: observation_channels);
    # (channels, n_z, na, nb) for a 3D network
    q: float  # the Q-value explained (float64 forward pass of the same weights)
    action: int
    species: int  # index into the agent's species
    layer: int
    point: int  # grid point = i * nb + j
    rule: str

    @property
    def total(self) -> float:
        return float(self.relevance.sum())

    @property
    def unassigned(self) -> float:
        """Q minus the summed relevance: the bias and eps share (epsilon) or dropped relevance (zplus)."""
        return self.q - self.total

    @property
    def volume(self) -> bool:
        return self.relevance.ndim == 4

    def atoms_map(self, n_species: int) -> np.ndarray:
        """(na, nb) relevance of the atoms: the placed-atom and template channels summed (the bag planes left out);
        for a volume, summed over the z levels too."""
        atoms = self.relevance[:-n_species].sum(0)
        return atoms.sum(0) if self.volume else atoms

    def shares(self, n_species: int, n_layers: int) -> dict[str, float]:
        """Summed relevance of the placed atoms, the template planes and the bag planes, and the unassigned rest."""
        placed = n_species if self.volume else n_species * n_layers
        return {"placed": float(self.relevance[:placed].sum()),
                "template": float(self.relevance[placed:-n_species].sum()),
                "bag": float(self.relevance[-n_species:].sum()), "unassigned": self.unassigned}


def check_rule(rule: str, epsilon: float) -> None:
    if rule not in RULES:
        raise AslaError(f"rule: must be one of {', '.join(RULES)}, got {rule!r}")
    if not (np.isfinite(epsilon) and epsilon > 0):
        raise AslaError(f"epsilon: the LRP stabiliser must be a positive number, got {epsilon}")


def relevance(net: QNetwork, obs: np.ndarray, action: int, rule: Rule = "epsilon",
              epsilon: float = DEFAULT_EPSILON) -> tuple[np.ndarray, float]:
    """(relevance of shape obs.shape, Q) for `action` (index into the flattened Q output) on one (C, na, nb) image."""
    check_rule(rule, epsilon)
    x0 = torch.as_tensor(np.asarray(obs, dtype=np.float64))[None]
    volume = net.cfg.kind == "3d"
    if x0.ndim != (5 if volume else 4) or x0.shape[1] != net.in_channels:
        shape = "n_z, na, nb) volume" if volume else "na, nb) image"
        raise AslaError(f"observation: must be one (channels={net.in_channels}, {shape}, got {tuple(x0.shape[1:])}")
    n_out = net.out_channels * int(np.prod(x0.shape[2:]))
    if not 0 <= int(action) < n_out:
        raise AslaError(f"action: must be in 0..{n_out - 1} for this image, got {action}")
    net = copy.deepcopy(net).to(device="cpu", dtype=torch.float64).eval()
    with torch.no_grad():  # the forward pass, keeping each block's input and activation
        xs, acts = [], []
        x = net.act(net.stem(x0))
        for block in net.blocks:
            xs.append(x)
            acts.append(block.act(_block_pre(block)(x, "full")))
            x = x + acts[-1]
        out = net.head(x)
    r = torch.zeros_like(out).flatten(1)
    r[0, int(action)] = out.flatten(1)[0, int(action)]
    q = float(r[0, int(action)])
    r = _affine_rule(_conv_affine(net.head), x, r.view_as(out), rule, epsilon)
    for block, xb, a in zip(reversed(net.blocks), reversed(xs), reversed(acts)):
        r_skip, r_act = _split_sum(xb, a, r, rule, epsilon)
        r = r_skip + _affine_rule(_block_pre(block), xb, r_act, rule, epsilon)  # SiLU: relevance passes unchanged
    r = _affine_rule(_conv_affine(net.stem), x0, r, rule, epsilon)  # the stem's SiLU passes it unchanged too
    return r[0].numpy(), q


def explain(agent: Agent, obs: np.ndarray, action: int, rule: Rule = "epsilon",
            epsilon: float = DEFAULT_EPSILON) -> Explanation:
    """The relevance map of `action` (the agent's flattened action index) for observation `obs` (C, na, nb)."""
    rel, q = relevance(agent.net, obs, action, rule, epsilon)
    n_points = rel.shape[-2] * rel.shape[-1]
    species, rest = divmod(int(action), agent.n_layers * n_points)
    layer, point = divmod(rest, n_points)
    return Explanation(rel, q, int(action), species, layer, point, rule)


@dataclass
class Step:
    """One step of an explained build: the state before the action, the Q maps, and the chosen action's map."""

    index: int  # build step, from 0
    observation: np.ndarray  # (channels, na, nb) the network's input at this step
    actions: list[int]  # the actions taken before this step (asla.builder.atoms_from_actions rebuilds the atoms)
    q_maps: np.ndarray  # (species, layers, na, nb) Q-values of the network (float32, as the agent acts)
    mask: np.ndarray  # (species, layers, na, nb) legal actions
    explanation: Explanation


def explain_build(agent: Agent, problem: Problem, steps: int | None = None, epsilon_greedy: float = 0.0,
                  seed: int = 0, rule: Rule = "epsilon", epsilon: float = DEFAULT_EPSILON) -> Iterator[Step]:
    """Build one structure with the agent (greedy, or epsilon-greedy with `seed`) and explain each chosen action.

    The actions are the agent's own choices (`Agent.act`, drawing from `seed` as `Agent.build` does), so this is
    the build `asla build --episodes 1` makes with the same epsilon and seed. Stops after `steps` steps, when the
    bag is empty, or at a dead end (no legal action left)."""
    agent.check_compatible(problem)
    check_rule(rule, epsilon)
    rng = np.random.default_rng(seed)
    state = BuildState(problem)
    shape = (problem.n_species, problem.grid.n_layers, problem.grid.na, problem.grid.nb)
    n = 0
    while not state.done and (steps is None or n < steps):
        (action,) = agent.act([state], epsilon_greedy, rng)
        if action is None:
            return
        obs = state.observation()
        q = agent.q_values(obs[None])[0].reshape(shape)
        yield Step(n, obs, list(state.actions), q, state.action_mask().reshape(shape),
                   explain(agent, obs, action, rule, epsilon))
        state.place(action)
        n += 1


# ---- the rules ------------------------------------------------------------------------------

def _part(w: torch.Tensor, part: str) -> torch.Tensor:
    return w if part == "full" else (w.clamp(min=0) if part == "pos" else w.clamp(max=0))


def _conv(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`conv` with other weights, its own padding (circular or zeros), stride and dilation."""
    if isinstance(conv, Conv3dSlab):  # circular in a and b by F.pad, zeros along z by the convolution
        if conv.wrap:
            w = conv.wrap
            x = F.pad(x, (w, w, w, w, 0, 0), mode="circular")
        return F.conv3d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    if conv.padding_mode != "zeros":
        ph, pw = conv.padding  # type: ignore[misc] - a tuple of ints for an integer padding
        x = F.pad(x, (pw, pw, ph, ph), mode=conv.padding_mode)
        return F.conv2d(x, weight, bias, conv.stride, 0, conv.dilation, conv.groups)
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def _conv_affine(conv: nn.Conv2d) -> Affine:
    def f(x: torch.Tensor, part: str) -> torch.Tensor:
        return _conv(conv, x, _part(conv.weight, part), conv.bias if part == "full" else None)
    return f


def _block_pre(block: nn.Module) -> Affine:
    """A residual block's pre-activation h = conv(x) + glob(mean of x) as one affine map of x."""
    conv, glob = block.conv, block.glob

    def f(x: torch.Tensor, part: str) -> torch.Tensor:
        h = _conv_affine(conv)(x, part)
        if glob is not None:
            space = tuple(range(2, x.ndim))
            g = F.linear(x.mean(dim=space), _part(glob.weight, part), glob.bias if part == "full" else None)
            h = h + g.reshape(*g.shape, *(1,) * len(space))
        return h
    return f


def _affine_rule(f: Affine, x: torch.Tensor, r: torch.Tensor, rule: str, epsilon: float) -> torch.Tensor:
    """Relevance `r` on the output of the affine map `f` handed to its input `x` (gradient trick)."""
    if rule == "epsilon":
        xg = x.detach().requires_grad_(True)
        z = f(xg, "full")
        s = r / (z + epsilon * torch.where(z >= 0, 1.0, -1.0)).detach()
        (c,) = torch.autograd.grad(z, xg, s)
        return x.detach() * c
    xp = x.detach().clamp(min=0).requires_grad_(True)
    xn = x.detach().clamp(max=0).requires_grad_(True)
    z = f(xp, "pos") + f(xn, "neg")  # positive contributions only: x > 0 with w > 0, x < 0 with w < 0
    zd = z.detach()
    s = torch.where(zd > 0, r / zd.clamp(min=torch.finfo(zd.dtype).tiny), 0.0)  # no positive input: dropped
    cp, cn = torch.autograd.grad(z, (xp, xn), s)
    return xp.detach() * cp + xn.detach() * cn


def _split_sum(x: torch.Tensor, a: torch.Tensor, r: torch.Tensor, rule: str,
               epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Relevance of y = x + a split between the skip path x and the activation a, in proportion."""
    if rule == "zplus":  # shares of |x| and |a|: non-negative, so the sign of R is kept, and nothing is dropped
        x, a = x.abs(), a.abs()
        y = x + a
        s = torch.where(y > 0, r / y.clamp(min=torch.finfo(y.dtype).tiny), 0.0)
    else:
        y = x + a
        s = r / (y + epsilon * torch.where(y >= 0, 1.0, -1.0))
    return x * s, a * s


# ---- pictures -------------------------------------------------------------------------------

def step_png(step: Step, problem: Problem) -> bytes:
    """PNG of one explained step: the chosen species' Q map (chosen layer), the relevance of the atoms (placed and
    template channels summed; the bag planes' share is in the title), and the structure before the step."""
    from asla.builder import atoms_from_actions, decode_action
    from asla.render import explanation_png, render_atoms
    e, grid = step.explanation, problem.grid
    S, L = problem.n_species, grid.n_layers
    nb = grid.nb
    placed = [(k // nb, k % nb, problem.species[s]) for s, _, k in (decode_action(problem, a) for a in step.actions)]
    shares = e.shares(S, L)
    symbol = problem.species[e.species]
    where = f"layer {e.layer}, " if L > 1 else ""
    title = (f"{problem.name}, step {step.index}: {symbol} at {where}(i, j) = ({e.point // nb}, {e.point % nb}), "
             f"Q = {e.q:.4f}\nrelevance ({e.rule}) of placed atoms {shares['placed']:+.4f}, template "
             f"{shares['template']:+.4f}, bag planes {shares['bag']:+.4f}, unassigned {shares['unassigned']:+.4f}")
    atom_map = e.atoms_map(S)
    t = problem.template
    seen = [k for k in range(len(t)) if any(abs(t.positions[k, 2] - z) < 0.3 for z in problem.template_layers)]
    template = np.array([divmod(int(k), nb) for k in grid.nearest_point(t.positions[seen])] if seen else [])
    return explanation_png(step.q_maps[e.species, e.layer], step.mask[e.species, e.layer], atom_map,
                           (e.point // nb, e.point % nb), placed, template,
                           render_atoms(atoms_from_actions(problem, step.actions), n_template=len(problem.template)),
                           title, f"Q map of {symbol}" + (f", layer {e.layer}" if L > 1 else "") + " (grey: illegal)",
                           "relevance of the atoms (red: raises Q)")
