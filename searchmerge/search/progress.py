"""The live view of a running search: trials done / budget, best so far, examples evaluated, ETA.

A Tune :class:`~ray.tune.Callback` on the driver feeding a ``rich`` progress bar (Tune's own table is off:
``verbose=0``). The ETA is the sooner of the trial budget at the recent trial rate and the wall budget.
"""

from __future__ import annotations

import time
from typing import Any

from ray.tune import Callback

from searchmerge.search.spec import SearchSpec


def eta_seconds(done_here: int, elapsed_s: float, trials_left: int | None, seconds: float | None) -> float | None:
    """Seconds left: the trials left at this process's mean trial rate, capped by the wall budget."""
    left: list[float] = []
    if trials_left is not None and done_here > 0:
        left.append(max(0.0, trials_left * elapsed_s / done_here))
    if seconds is not None:
        left.append(max(0.0, seconds - elapsed_s))
    return min(left) if left else None


def best_text(value: float | None, key: str) -> str:
    return "best —" if value is None else f"best {key} {100 * value:.1f}"


class ProgressView(Callback):
    """Trials done / budget, best so far (single objective) or front size, and the ETA, updated per trial."""

    def __init__(self, spec: SearchSpec, prior_done: int = 0, best: float | None = None, enabled: bool = True) -> None:
        self.spec = spec
        self.done = prior_done
        self.done_here = 0
        self.examples = 0
        self.best = best
        self.stats = [0, 0]  # data-driven trials: statistics sets computed, and read from the disk cache
        self.enabled = enabled
        self.t0 = time.time()
        self._progress: Any = None
        self._task: Any = None
        self._last: dict[str, dict[str, Any]] = {}

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles its callbacks with the experiment state
        return {**self.__dict__, "_progress": None, "_task": None}

    # Tune callback hooks ------------------------------------------------------------------------------

    def setup(self, **info: Any) -> None:
        if not self.enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.fields[best]}"), TextColumn("{task.fields[examples]}"),
                                  TimeElapsedColumn(), TextColumn("ETA {task.fields[eta]}"), transient=False)
        self._progress.start()
        self._task = self._progress.add_task(f"search {self.spec.name}", total=self.spec.budget.trials,
                                             completed=self.done, best=best_text(self.best, self.key),
                                             examples="", eta="—")

    @property
    def key(self) -> str:
        return self.spec.objectives[0].key

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict[str, Any], **info: Any) -> None:
        self._last[trial.trial_id] = result

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, ok=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, ok=False)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    # ----------------------------------------------------------------------------------------------

    def _finish(self, trial: Any, ok: bool) -> None:
        res = self._last.pop(trial.trial_id, {})
        self.done += 1
        self.done_here += 1
        if not res.get("duplicate"):
            self.examples += int(res.get("examples") or 0)
            self.stats[0] += int(res.get("stats_computed") or 0)
            self.stats[1] += int(res.get("stats_hits") or 0)
        single = len(self.spec.objectives) == 1
        if ok and single and res.get("complete") and res.get(self.key) is not None:
            v = float(res[self.key])
            if self.best is None or (v > self.best if self.spec.objectives[0].mode == "max" else v < self.best):
                self.best = v
        if self._progress is None:
            return
        trials = self.spec.budget.trials
        eta = eta_seconds(self.done_here, time.time() - self.t0, None if trials is None else trials - self.done,
                          self.spec.budget.seconds)
        self._progress.update(self._task, completed=self.done, best=best_text(self.best, self.key) if single else "",
                              examples=self.examples_text(), eta="—" if eta is None else f"{eta:.0f} s")

    def examples_text(self) -> str:
        """Examples evaluated, and for data-driven trials how many statistics sets came from the disk cache."""
        text = f"{self.examples:,} examples"
        if any(self.stats):
            text += f" · statistics: {self.stats[0]} computed, {self.stats[1]} from cache"
        return text
