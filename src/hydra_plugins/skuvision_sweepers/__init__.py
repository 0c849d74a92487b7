"""Hydra loads sweepers only from the hydra_plugins package: skuvision's resumable Optuna sweeper."""

from __future__ import annotations

import logging
from pathlib import Path

from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper

log = logging.getLogger("skuvision")


class ResumableOptunaSweeper(OptunaSweeper):
    """hydra-optuna-sweeper's sweeper, made resumable.

    Run again with the same storage and study name, it runs only the trials still missing to reach
    n_trials, numbers the new jobs after the old ones in the same sweep folder, and marks the trials that
    an interruption left running as failed (they are run again, not counted).
    """

    def sweep(self, arguments: list[str]) -> None:
        impl = self.sweeper
        storage = impl.storage
        if isinstance(storage, str) and storage.startswith("sqlite:///"):
            Path(storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        if storage and impl.study_name:
            from skuvision.sweeps import resume_study

            done, started = resume_study(storage, impl.study_name)
            impl.n_trials = max(0, impl.n_trials - done)
            impl.job_idx = started
        return super().sweep(arguments)
