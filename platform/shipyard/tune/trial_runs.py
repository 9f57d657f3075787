"""The search's Tune callbacks: one progress line per finished trial, and each trial as its own MLflow run
nested under the search run (Ray Tune's MLflow callback, made resumable), with the outcome of every trial (tag
shipyard.trial_status) when the search ends."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from shipyard.config import Config
from shipyard.tasks import objective
from shipyard.train.checkpoints import HISTORY_FILE, newest_intact_checkpoint
from shipyard.tune.plots import TrialHistory
from shipyard.tune.schedules import EPOCHS, Schedule

log = logging.getLogger("shipyard.tune.search")  # the search's lines, under the search's logger
CHECKPOINT_PATH = "checkpoint_path"
"""In a Train-job trial's results: its job's checkpoint (Ray's TuneReportCallback adds it)."""


def trial_logger(tracking_uri: str, experiment: str, parent_run_id: str, schedule: Schedule, pbt: bool):
    """Ray's MLflowLoggerCallback with three changes: a resumed search finds a trial's run instead of opening a
    second one; a trial restarted with a new config (a PBT exploit) logs the new values as `pbt.*` metrics (MLflow
    params cannot change); a finished trial's run gets its outcome (tag shipyard.trial_status; KILLED when
    stopped early, FAILED when errored)."""
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    from shipyard.private_apis import mlflow_client_of, trial_runs_of

    class TrialRunLogger(MLflowLoggerCallback):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.logged: dict[str, int] = {}  # trial id -> the last epochs_done this driver logged

        def _fill(self, trial, checkpoint: str, before: int | None = None) -> None:
            """Epochs a Train-job trial ran whose results never reached this driver, from its checkpoint: a
            repair, so a failing one is a warning, never the end of the search."""
            try:
                backfill_epochs(mlflow_client_of(self), trial_runs_of(self)[trial], checkpoint, str(trial), before)
            except Exception as err:
                log.warning("%s: epochs missing in MLflow not logged (%s: %s)", trial, type(err).__name__, err)

        def log_trial_start(self, trial):
            if trial not in trial_runs_of(self):
                client = mlflow_client_of(self)
                found = client.search_runs(
                    [client.get_run(parent_run_id).info.experiment_id],
                    f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.trial_name = '{trial}'",
                    max_results=1,
                )
                if not found:
                    return super().log_trial_start(trial)
                trial_runs_of(self)[trial] = found[0].info.run_id  # a resumed search: the same run goes on
                client.update_run(found[0].info.run_id, status="RUNNING")
            if not pbt:
                return
            step = (trial.last_result or {}).get(EPOCHS, 0)
            numeric = {f"pbt.{k}": v for k, v in trial.config.items() if isinstance(v, (int, float))}
            self.mlflow_util.log_metrics(run_id=trial_runs_of(self)[trial], metrics_to_log=numeric, step=step)

        def log_trial_result(self, iteration: int, trial, result: dict):
            done = int(result.get(EPOCHS) or 0)
            # a Train-job trial's first result in this driver after epoch 1, or one past a gap: its job went on
            # from a checkpoint newer than the last result received (a killed driver, a restarted worker group)
            if result.get(CHECKPOINT_PATH) and done > self.logged.get(trial.trial_id, 0) + 1:
                self._fill(trial, result[CHECKPOINT_PATH], before=done)
            self.logged[trial.trial_id] = done
            # Tune's training_iteration restarts at 1 when a multi-worker trial resumes from its Train checkpoint
            self.mlflow_util.log_metrics(
                run_id=trial_runs_of(self)[trial],
                metrics_to_log=result,
                step=result.get(EPOCHS, result.get("training_iteration")),
            )

        def log_trial_end(self, trial, failed: bool = False):
            done = (trial.last_result or {}).get(EPOCHS, 0)
            known = (trial.last_result or {}).get(CHECKPOINT_PATH)
            # resumed after its job's last checkpoint, the trial reported nothing: its epochs may be missing
            if known and trial.trial_id not in self.logged:
                newest = newest_intact_checkpoint(Path(known).parent)  # the Train run's folder
                if newest is not None and newest[1] + 1 > done:
                    self._fill(trial, newest[0])
                    done = newest[1] + 1
            status = schedule.status(done, failed)
            run_id = trial_runs_of(self)[trial]
            mlflow_client_of(self).set_tag(run_id, "shipyard.trial_status", status)
            super().log_trial_end(trial, failed)  # FINISHED, or FAILED when errored
            if _run_status(status) == "KILLED":
                mlflow_client_of(self).set_terminated(run_id, status="KILLED")

    return TrialRunLogger(
        tracking_uri=tracking_uri,
        experiment_name=experiment,
        save_artifact=False,
        tags={"mlflow.parentRunId": parent_run_id, "shipyard.kind": "trial"},
    )


def backfill_epochs(client, run_id: str, checkpoint: str, trial: str, before: int | None = None) -> int:
    """Log into a trial's MLflow run the epochs it lacks that a checkpoint of its Train job holds (its metrics
    history, train.checkpoints.HISTORY_FILE): those before epoch `before` (epochs_done), or all it holds. A trial
    run as a Train job (tune.workers_per_trial > 1) goes on from its job's newest checkpoint, which can be epochs
    ahead of the last result its killed driver received. Each is logged at step epochs_done, as the live results
    are, with the metrics rank 0 reported (not Tune's own fields: training_iteration, time_total_s) and the time
    of logging. Returns how many epochs were logged."""
    from mlflow.entities import Metric

    have = {int(m.value) for m in client.get_metric_history(run_id, EPOCHS)}
    wanted = set(range(1, before)) - have if before is not None else None
    if wanted == set():
        return 0
    try:  # storage_dir is a path (local, or a shared mount on a cluster)
        history = json.loads((Path(checkpoint) / HISTORY_FILE).read_text())
    except (OSError, ValueError) as err:
        if wanted:
            log.warning(
                "%s: MLflow lacks epochs %s, and %s cannot be read (%s)", trial, sorted(wanted), checkpoint, err
            )
        return 0
    rows = [
        h
        for h in history
        if isinstance(h, dict)
        and isinstance(h.get(EPOCHS), (int, float))
        and int(h[EPOCHS]) not in have
        and (wanted is None or int(h[EPOCHS]) in wanted)
    ]
    absent = sorted((wanted or set()) - {int(h[EPOCHS]) for h in rows})
    if absent:  # a checkpoint written before histories were kept, or one the history does not reach
        log.warning("%s: MLflow lacks epochs %s, which %s does not hold", trial, absent, checkpoint)
    if not rows:
        return 0
    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, int(h[EPOCHS])) for h in rows for k, v in h.items()]
    for i in range(0, len(metrics), 1000):  # MLflow takes at most 1,000 metrics a call
        client.log_batch(run_id, metrics=metrics[i : i + 1000])
    log.info(
        "%s: logged epochs %s from its checkpoint (the driver that ran them stopped before their results arrived)",
        trial,
        ", ".join(str(int(h[EPOCHS])) for h in rows),
    )
    return len(rows)


def _run_status(trial_status: str) -> str:
    """The MLflow run status of a trial's outcome: stopped early is KILLED."""
    return {"completed": "FINISHED", "errored": "FAILED"}.get(trial_status, "KILLED")


def settle_trial_runs(tracking_uri: str, parent_run_id: str, histories: list[TrialHistory]) -> None:
    """Make each trial run's outcome agree with the trial's result log once the search is over. Two cases differ
    from what the logger saw live: a trial that finished just before a killed driver's last experiment snapshot
    is restored with an older last result, and a trial the searcher created after that snapshot comes back under
    a new id (Optuna ids are random), leaving its first run RUNNING."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_run(parent_run_id).info.experiment_id
    for run in client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent_run_id}'"):
        name = run.data.tags.get("trial_name", "")
        history = next((h for h in histories if name.endswith(h.trial_id)), None)
        if history is None:
            if run.info.status == "RUNNING":
                client.set_tag(run.info.run_id, "shipyard.trial_status", "lost (its driver died before Tune saved it)")
                client.set_terminated(run.info.run_id, status="KILLED")
            continue
        if run.data.tags.get("shipyard.trial_status") != history.status:
            client.set_tag(run.info.run_id, "shipyard.trial_status", history.status)
            client.set_terminated(run.info.run_id, status=_run_status(history.status))


def progress_callback(cfg: Config, total: int, schedule: Schedule):
    """One line per finished trial instead of Tune's tables (RunConfig(verbose=0) silences those)."""
    from ray.tune import Callback

    class TrialProgress(Callback):
        done = 0

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._line(trial, errored=False)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._line(trial, errored=True)

        def _line(self, trial, errored: bool) -> None:
            self.done += 1
            last = trial.last_result or {}
            status = schedule.status(last.get(EPOCHS, 0), errored)
            log.info(
                "trial %d/%d %s: %s, %s %.4f",
                self.done,
                total,
                trial.trial_id,
                status,
                objective(cfg)[0],
                last.get(objective(cfg)[0], float("nan")),
            )

    return TrialProgress()
