"""Errors from inside Ray Data, said once and in one line: the data stages of tables (shipyard.data.tables) and of
image folders (shipyard.tasks.images) read files in Ray tasks, whose errors arrive wrapped in a remote
traceback."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable

from shipyard.errors import DataError
from shipyard.private_apis import RAY_DATA_TRACEBACK_LOGGERS

log = logging.getLogger("shipyard.data.tables")  # DEBUG on the data stage's logger keeps Ray Data's own tracebacks


# Ray Data logs a failed task's traceback (twice) before raising it; clear_errors says it once, in one line
_RAY_DATA_TRACEBACKS = RAY_DATA_TRACEBACK_LOGGERS


@contextlib.contextmanager
def clear_errors(what: str, explain: Callable[[Exception], str | None] | None = None):
    """Ray wraps errors raised in its tasks; surface our DataError's own message, `explain(err)`, or what
    failed. Ray Data's own traceback logs are muted meanwhile, unless this module logs at DEBUG."""
    loggers = [] if log.isEnabledFor(logging.DEBUG) else [logging.getLogger(n) for n in _RAY_DATA_TRACEBACKS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    except DataError:
        raise
    except Exception as err:
        cause = find_cause(err, DataError)
        if cause is not None:
            raise DataError(*cause.args) from None  # the message, without the remote traceback
        explained = explain(err) if explain is not None else None
        if explained:
            raise DataError(explained) from err
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        # a remote error's text is a traceback: its "SomethingError: message" line says what went wrong
        reason = next(
            (ln for ln in reversed(lines) if re.match(r"^[\w.]+(Error|Exception|Invalid)\b.*:", ln)),
            lines[0] if lines else type(err).__name__,
        )
        raise DataError(f"{what}: {reason[:500]}") from err
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def find_cause(err: BaseException, kind: type) -> BaseException | None:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, kind):
            return err
        # RayTaskError keeps the remote exception as .cause; chained Python errors use __cause__
        cause = getattr(err, "cause", None)
        err = cause if isinstance(cause, BaseException) else (err.__cause__ or err.__context__)
    return None
