import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT / "platform", ROOT):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


# Lines a test prints through tests.helpers.report() (where its fault landed, the figures it compared) are
# repeated at the end of the run, so `make test` shows them without -s.
REPORT_PREFIX = "[report] "
_reported: list[tuple[str, str]] = []


def pytest_runtest_logreport(report):
    if report.when == "call":
        for line in report.capstdout.splitlines():
            if line.startswith(REPORT_PREFIX):
                _reported.append((report.nodeid, line[len(REPORT_PREFIX) :]))


def pytest_terminal_summary(terminalreporter):
    if _reported:
        terminalreporter.section("where faults landed, what was compared")
        for nodeid, line in _reported:
            terminalreporter.write_line(f"{nodeid.split('::')[-1][:70]}: {line}")
