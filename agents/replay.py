"""Replay of whole episodes: the recent ones plus the best ever found, which are always kept.

An episode is stored as its action sequence and raw energy (nan for a failed or dead-end
build). States are re-encoded from the action prefix when sampled, so the buffer is small,
serialises to JSON, and rewards are recomputed from raw energies with the current scale.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class Episode:
    actions: list[int]
    energy: float  # nan when the build failed or dead-ended
    key: tuple[int, ...] = ()
    episode: int = 0
    surrogate: bool = False  # energy is a surrogate model's, not a real evaluation (screened-out build)

    def to_json(self) -> list:
        row = [self.actions, None if math.isnan(self.energy) else self.energy, list(self.key), self.episode]
        return [*row, True] if self.surrogate else row  # real episodes keep the four-field row of older files

    @classmethod
    def from_json(cls, row: list) -> Episode:
        return cls(list(row[0]), float("nan") if row[1] is None else float(row[1]), tuple(row[2]), int(row[3]),
                   bool(row[4]) if len(row) > 4 else False)


def prefix_key(actions: list[int], t: int) -> int:
    """Order-free identity of the partial structure after t placements (deterministic across runs)."""
    return hash(tuple(sorted(int(a) for a in actions[:t])))


class ReplayBuffer:
    """Recent and best episodes, plus the lowest energy ever reached through each partial structure.

    Builds are deterministic, so the value of placing an atom is the best energy any completion of
    the resulting partial structure has reached; ``prefix_best`` keeps that for the ``max`` target.
    """

    def __init__(self, capacity: int = 2000, n_best: int = 20) -> None:
        self.capacity = capacity
        self.n_best = n_best
        self.recent: list[Episode] = []
        self.best: list[Episode] = []
        self.prefix_best: dict[int, float] = {}

    def __len__(self) -> int:
        return len(self.recent) + len(self.best)

    def add(self, ep: Episode) -> None:
        """A surrogate episode is trained on (recent) but never sets a best or a prefix's best: a model's energy
        may be a hole of the model, and the best episodes are sampled often."""
        if ep.surrogate:
            self.recent.append(ep)
            if len(self.recent) > self.capacity:
                del self.recent[: len(self.recent) - self.capacity]
            return
        if math.isfinite(ep.energy):
            for t in range(1, len(ep.actions) + 1):
                k = prefix_key(ep.actions, t)
                if ep.energy < self.prefix_best.get(k, math.inf):
                    self.prefix_best[k] = ep.energy
        self.recent.append(ep)
        if len(self.recent) > self.capacity:
            del self.recent[: len(self.recent) - self.capacity]
        if math.isfinite(ep.energy) and all(b.key != ep.key for b in self.best):
            self.best.append(ep)
            self.best.sort(key=lambda e: e.energy)
            del self.best[self.n_best:]

    def episodes(self) -> list[Episode]:
        return self.recent + self.best

    def sample(self, rng: np.random.Generator, n: int, best_fraction: float = 0.0) -> list[tuple[Episode, int]]:
        """n (episode, step) pairs, step uniform within the episode.

        A share ``best_fraction`` of the batch comes from the best episodes, the rest uniformly
        from recent + best: without it the few best builds drown among thousands of recent ones.
        """
        n_best = int(round(best_fraction * n)) if self.best else 0
        pool = self.episodes()
        picks = [pool[i] for i in rng.integers(len(pool), size=n - n_best)]
        picks += [self.best[i] for i in rng.integers(len(self.best), size=n_best)]
        return [(ep, int(rng.integers(len(ep.actions)))) for ep in picks if ep.actions]

    def target_energy(self, ep: Episode, kind: str = "mc", prefix: list[int] | np.ndarray | None = None) -> float:
        """Energy behind a Q-target: the episode's own (mc), or the best reached through the partial
        structure `prefix` (the state plus the action; max) when any episode has built it."""
        # a dead end still teaches its prefix what completions elsewhere reached
        if kind == "max" and prefix is not None:
            return self.prefix_best.get(prefix_key(list(prefix), len(prefix)), ep.energy)
        return ep.energy

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "n_best": self.n_best, "recent": [e.to_json() for e in self.recent],
                "best": [e.to_json() for e in self.best], "prefix_best": list(self.prefix_best.items())}

    def load_state_dict(self, state: dict) -> None:
        self.capacity, self.n_best = int(state["capacity"]), int(state["n_best"])
        self.recent = [Episode.from_json(r) for r in state["recent"]]
        self.best = [Episode.from_json(r) for r in state["best"]]
        self.prefix_best = {int(k): float(v) for k, v in state.get("prefix_best", [])}
