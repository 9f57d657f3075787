"""Rank 0's MLflow calls during training, queued so that training never waits on the tracking server.

    logger = QueuedMlflow(tracking_uri, run_id)   # in rank 0 of a Ray Train worker group
    logger.log(metrics, epoch); logger.set_tag(k, v); logger.log_dict(obj, "file.json")
    left = logger.close(FLUSH_S)                  # the last epoch: what never arrived goes into its checkpoint
    deliver_leftovers(checkpoint, tracking_uri, run_id)   # the driver, after training

A thread delivers the calls in order, retrying while the server is down (a restart, a network cut); a call
is plain JSON, so what is still queued at the end can wait in a file (RELIABILITY.md, "tracking outage").
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

UNDELIVERED_FILE = "undelivered_mlflow.json"
"""In the last checkpoint: rank 0's MLflow calls the tracking server never took (deliver_leftovers)."""
FLUSH_S = 30.0
"""How long the last epoch waits for queued MLflow calls to reach a tracking server that is down."""
IN_FLIGHT_S = 15.0
"""Past FLUSH_S, how long closing waits for a call already sent (MLFLOW_HTTP_REQUEST_TIMEOUT is 10 s here)."""


def _send(client, run_id: str, call: str, args) -> None:
    """One queued MLflow call: ("log_batch", [[key, value, timestamp_ms, step], ...]) or a client method's
    name and its arguments after the run id (set_tag, log_dict): plain JSON, so it can wait in a file."""
    if call == "log_batch":
        from mlflow.entities import Metric

        client.log_batch(run_id, metrics=[Metric(*m) for m in args[0]])
    else:
        getattr(client, call)(run_id, *args)


WORKER_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
"""Set in a Train worker's environment when Ray starts it (shipyard.train.loop.make_trainer): the delivery thread
retries forever at its own pace, and MLflow's own retries (7, exponential, up to minutes a call) would only hold
each call back."""


class QueuedMlflow:
    """Per-epoch metrics into the MLflow run the driver created; only rank 0 holds one of these.

    Training never waits on the tracking server: calls are queued and a thread delivers them in order, retrying
    while the server is down (a restart, a network cut). `close(timeout_s)` waits for the queue to drain and
    returns what is still undelivered; the caller keeps those beside the checkpoint so the driver can deliver
    them later or report them as lost (RELIABILITY.md, "tracking outage")."""

    RETRY_WAITS_S = (1.0, 2.0, 5.0, 10.0)
    """Waits between tries while the server is down: the first, the second, ..., then the last one on."""

    def __init__(self, tracking_uri: str | None, run_id: str | None):
        self.client = None
        self.pending: collections.deque[tuple[str, tuple]] = collections.deque()
        self.cond = threading.Condition()
        self.down_since: float | None = None
        self.closed = self.sending = False
        if tracking_uri and run_id:
            from mlflow import MlflowClient

            self.client, self.run_id = MlflowClient(tracking_uri), run_id
            threading.Thread(target=self._deliver, name="shipyard-mlflow", daemon=True).start()

    def _put(self, call: str, *args: Any) -> None:
        if self.client is not None:
            with self.cond:
                self.pending.append((call, args))
                self.cond.notify_all()

    def log(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self._put("log_batch", [(k, float(v), now, step) for k, v in metrics.items()])

    def set_tag(self, key: str, value: str) -> None:
        self._put("set_tag", key, value[:5000])

    def log_dict(self, value: Any, artifact_file: str) -> None:
        self._put("log_dict", value, artifact_file)

    def _deliver(self) -> None:
        failures = 0
        while True:
            with self.cond:
                while not self.pending and not self.closed:
                    self.cond.wait()
                if self.closed:
                    self.sending = False
                    self.cond.notify_all()
                    return
                call, args = self.pending[0]
                self.sending = True
            try:
                _send(self.client, self.run_id, call, args)
            except Exception as err:
                if _refused(err):  # retrying cannot help, and it would hold back every call behind it
                    log.error("MLflow refused %s for run %s (%s); dropped", call, self.run_id, str(err)[:300])
                    with self.cond:
                        self.pending.popleft()
                        self.sending = False
                        self.cond.notify_all()
                    continue
                if self.down_since is None:  # down, or failing (5xx): keep it queued, retry
                    self.down_since = time.monotonic()
                    log.warning(
                        "MLflow tracking server unreachable (%s: %s): training goes on; metrics are "
                        "queued and delivered when it is back",
                        type(err).__name__,
                        str(err)[:200],
                    )
                with self.cond:
                    self.sending = False
                    self.cond.notify_all()
                    self.cond.wait(timeout=self.RETRY_WAITS_S[min(failures, len(self.RETRY_WAITS_S) - 1)])
                failures += 1
                continue
            if self.down_since is not None:
                log.warning(
                    "MLflow tracking server back after %.0f s: delivering %d queued calls",
                    time.monotonic() - self.down_since,
                    len(self.pending),
                )
                self.down_since = None
            failures = 0
            with self.cond:
                self.pending.popleft()
                self.sending = False
                self.cond.notify_all()

    def undelivered(self) -> list[tuple[str, tuple]]:
        """The calls not yet delivered (the one in flight included), for the checkpoint written now: a run
        killed before they arrive sends them when it resumes from it (requeue)."""
        with self.cond:
            return list(self.pending)

    def requeue(self, calls: list) -> int:
        """A resumed run: queue again what its checkpoint says was undelivered, less the metrics MLflow already
        has (delivered after the checkpoint was written): none lost, none twice. Tags and artifacts are sent
        again (they overwrite). Returns how many calls were queued."""
        if self.client is None:
            return 0
        have: dict[str, set] = {}
        queued = 0
        for call, args in calls:
            if call == "log_batch":
                left = []
                for key, value, timestamp, step in args[0]:
                    if key not in have:
                        try:
                            have[key] = {
                                (m.step, m.timestamp) for m in self.client.get_metric_history(self.run_id, key)
                            }
                        except Exception:  # the server is down: send them all, a duplicate beats a loss
                            have[key] = set()
                    if (step, timestamp) not in have[key]:
                        left.append([key, value, timestamp, step])
                if not left:
                    continue
                args = [left]
            self._put(call, *args)
            queued += 1
        return queued

    def close(self, timeout_s: float) -> list[tuple[str, tuple]]:
        """Wait up to `timeout_s` for every queued call to be delivered, then stop delivering; returns the calls
        that were not delivered. A call in flight is waited for up to IN_FLIGHT_S more (one HTTP timeout); one
        still hanging then (a stalled artifact upload) is returned too, and may yet arrive twice."""
        if self.client is None:
            return []
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while self.pending and time.monotonic() < deadline:
                self.cond.wait(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
            self.closed = True
            self.cond.notify_all()
            deadline = time.monotonic() + IN_FLIGHT_S
            while self.sending and time.monotonic() < deadline:
                self.cond.wait(timeout=1.0)
            return list(self.pending)


def _refused(err: Exception) -> bool:
    """The tracking server answered and said no (HTTP 4xx: a deleted run, a bad value): not worth retrying."""
    from mlflow.exceptions import MlflowException

    status = err.get_http_status_code() if isinstance(err, MlflowException) else None
    return status is not None and 400 <= status < 500 and status != 429


def deliver_leftovers(checkpoint, tracking_uri: str | None, run_id: str | None) -> int:
    """Send the MLflow calls rank 0 could not deliver during training (the tracking server was down until its
    last epoch), one by one; those the server still does not take are reported as lost, with where they are
    kept. Returns how many calls were delivered."""
    if not (tracking_uri and run_id):
        return 0
    from mlflow import MlflowClient

    with checkpoint.as_directory() as d:  # a local path, or a download of remote storage
        path = Path(d) / UNDELIVERED_FILE
        if not path.is_file():
            return 0
        try:
            calls = json.loads(path.read_text())
        except ValueError as err:  # written while the disk filled up
            log.error("LOST: rank 0's undelivered MLflow calls in %s cannot be read (%s)", checkpoint.path, err)
            return 0
    client = MlflowClient(tracking_uri)  # the driver's: MLflow's own retries, minutes long
    failed, last_error = [], None
    for call, args in calls:
        try:
            _send(client, run_id, call, args)
        except Exception as err:
            failed.append((call, args))
            last_error = f"{type(err).__name__}: {str(err)[:200]}"
    if failed:
        log.error(
            "LOST: %d of %d MLflow calls from training (metrics logged while the tracking server at %s was "
            "down) could not be delivered (%s); they are in %s of checkpoint %s",
            len(failed),
            len(calls),
            tracking_uri,
            last_error,
            UNDELIVERED_FILE,
            checkpoint.path,
        )
    if len(failed) < len(calls):
        log.warning(
            "delivered %d MLflow calls that training queued while the tracking server was down",
            len(calls) - len(failed),
        )
    kept = Path(checkpoint.path) / UNDELIVERED_FILE
    if kept.is_file():  # local storage: keep only what is still undelivered (a resumed run must not resend)
        kept.write_text(json.dumps(failed)) if failed else kept.unlink()
    return len(calls) - len(failed)
