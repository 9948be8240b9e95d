"""``bench_tune``: trials decided per hour by a search with and without ASHA, on the same compute
budget (debug preset, one trial at a time, each trial one CPU worker, on the embedded Ray).

The budget is counted in training epochs summed over all trials: the search stops as soon as it has
used ``budget_epochs``. A trial is *decided* when it ran all ``epochs_per_trial`` epochs or ASHA
stopped it; the one trial the budget cuts off is not counted. Both searches use the same seed, so
TPE proposes the same first configurations.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

from ray.tune.stopper import Stopper

from cliplung.config import load_config

__all__ = ["EpochBudget", "bench_tune"]


class EpochBudget(Stopper):
    """Stops the whole search once the trials together have trained ``budget`` epochs."""

    def __init__(self, budget: int, max_epochs: int):
        self.budget = budget
        self.max_epochs = max_epochs
        self.epochs: dict[str, int] = {}

    def __call__(self, trial_id: str, result: dict) -> bool:
        from cliplung.tune.search import EPOCHS_DONE

        self.epochs[trial_id] = max(int(result.get(EPOCHS_DONE, 0)), self.epochs.get(trial_id, 0))
        return False

    def stop_all(self) -> bool:
        return sum(self.epochs.values()) >= self.budget


def bench_tune(
    store: str,
    budget_epochs: int = 16,
    as_json: bool = False,
    *,
    epochs_per_trial: int = 4,
    metric: str = "val/macro_f1",
    mode: str = "max",
) -> list[dict]:
    from cliplung.cluster import ensure_ray
    from cliplung.tune.search import EPOCHS_DONE, tune_search

    ensure_ray(num_cpus=max(os.cpu_count() or 1, 3))  # started once, outside the timings
    rows = []
    with tempfile.TemporaryDirectory(prefix="cliplung-bench-tune-") as storage:
        for asha in (False, True):
            config = load_config(
                "debug",
                [
                    f"data.store={store}",
                    f"storage.path={storage}",
                    f"name=bench-{'asha' if asha else 'fifo'}",
                    "metrics.enabled=false",
                    "train.workers=1",
                    f"train.epochs={epochs_per_trial}",
                    "train.max_failures=0",
                    f"tune.trials={budget_epochs}",
                    "tune.max_concurrent=1",
                    f"tune.asha={str(asha).lower()}",
                    "tune.grace_period=1",
                    "tune.reduction_factor=2",
                    f"tune.metric={metric}",
                    f"tune.mode={mode}",
                ],
            )
            budget = EpochBudget(budget_epochs, epochs_per_trial)
            start = time.perf_counter()
            summary = tune_search(config, stop=budget)
            seconds = time.perf_counter() - start
            # One trial at a time, in Optuna-number order: only the last one can have been cut off
            # by the budget (when it stopped short of the full epochs, ASHA or not: counted as cut).
            epochs = [int(r[EPOCHS_DONE] or 0) for r in summary.trials]
            cut = 1 if epochs and epochs[-1] < epochs_per_trial else 0
            decided = len(epochs) - cut
            early = sum(1 for e in epochs[: len(epochs) - cut] if e < epochs_per_trial)
            rows.append(
                {
                    "asha": asha,
                    "budget_epochs": budget_epochs,
                    "epochs_used": sum(epochs),
                    "trials_started": len(epochs),
                    "trials_decided": decided,
                    "stopped_early": early,
                    "wall_s": round(seconds, 1),
                    "trials_per_hour": round(decided / seconds * 3600, 1),
                    "best": round(summary.best["value"], 4) if summary.best else None,
                    "metric": metric,
                }
            )
    if as_json:
        print(json.dumps(rows))
    else:
        print(
            f"{'scheduler':>9} {'epochs':>6} {'started':>7} {'decided':>7} {'stopped':>7} "
            f"{'wall s':>7} {'trials/h':>8} {'best ' + metric:>18}"
        )
        for r in rows:
            best = f"{r['best']:.4f}" if r["best"] is not None else "-"
            print(
                f"{'ASHA' if r['asha'] else 'FIFO':>9} {r['epochs_used']:>6} {r['trials_started']:>7} "
                f"{r['trials_decided']:>7} {r['stopped_early']:>7} {r['wall_s']:>7.1f} "
                f"{r['trials_per_hour']:>8.1f} {best:>18}"
            )
    return rows
