"""What Hydra calls around a sweep: the leaderboard at the end of a multirun, and Optuna study resumption."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("skuvision")


class LeaderboardCallback(Callback):
    """Writes leaderboard.md/.csv/.png into the sweep folder when a multirun ends.

    A sweep in which no job completed (a config error every job shares, say) then exits with status 2 and
    the error as its last line; a sweep with some results exits 0 and lists its failed jobs.
    """

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from skuvision.tasks.compare import write_leaderboard

        sweep_dir = Path(config.hydra.sweep.dir)
        rows = write_leaderboard(sweep_dir, replace=True)  # the sweep's own, rewritten when it resumes
        failed = [r for r in rows if r["status"] != "completed"]
        print(f"leaderboard: {sweep_dir}/leaderboard.md ({len(rows)} jobs, {len(failed)} without a result)")
        for row in failed:
            print(f"  job {row['job']}: {row['status']}, {row['error'] or 'no metrics.json'}")
        if rows and len(failed) == len(rows):
            errors = {row["error"] for row in failed}
            only = errors.pop() if len(errors) == 1 else None
            print(
                f"error: {only or f'no job of the sweep completed: see {sweep_dir}/leaderboard.md'}",
                file=sys.stderr,
            )
            sys.exit(2)


def resume_study(storage: str, study_name: str) -> tuple[int, int]:
    """Prepare a stored Optuna study for a resumed sweep: (trials that count as done, trials ever started).

    Trials still RUNNING were cut off by an interruption: they become FAIL, their numbers are listed in the
    study's user attribute `interrupted_trials`, and they do not count as done, so the resumed sweep runs
    them again.
    """
    import optuna
    from optuna.trial import TrialState

    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:  # a new study
        return 0, 0
    interrupted = list(study.user_attrs.get("interrupted_trials", []))
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(trial.number, state=TrialState.FAIL)
        interrupted.append(trial.number)
    study.set_user_attr("interrupted_trials", interrupted)
    started = len(study.get_trials(deepcopy=False))
    done = started - len(interrupted)
    log.info("Optuna study %s: %d of its %d trials done; resuming after them", study_name, done, started)
    return done, started
