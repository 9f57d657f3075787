# The two README commands:  `make digits`  and  `make test`  (each installs first; install is idempotent).
PY := .venv/bin/python

.PHONY: install digits images lint format test test-unit bench-serve bench-soak bench-perf calibrate cluster-check cluster-demo clean

install: .venv/.installed

.venv/.installed: pyproject.toml scripts/install.sh
	./scripts/install.sh
	touch $@

# Install, then run the digits pipeline end to end (ends with the endpoint's answer and the summary).
digits: install
	$(PY) -m pipelines.digits --summary-json .shipyard/digits-summary.json

# The digits set as a folder of PNG class folders (zero..nine), then the image pipeline on it.
images: install
	$(PY) -m pipelines.digit_images .shipyard/digit-images
	$(PY) -m pipelines.images data.path=.shipyard/digit-images data.image_size=8 data.channels=1 \
		--summary-json .shipyard/images-summary.json

# Lint and format check (ruff, configured in pyproject.toml); `make format` rewrites the files.
lint: install
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

format: install
	.venv/bin/ruff check --fix .
	.venv/bin/ruff format .

# Install, lint, then run the whole test suite (unit tests, then local-Ray integration tests).
test: install lint
	./scripts/test.sh

# The inner loop: pure logic and white-box tests, no Ray, no subprocess (under a minute).
test-unit: install
	$(PY) -m pytest tests/unit -q

# The serving benchmark needs wrk, a load generator in C (Debian package `wrk`).
bench-serve: install
	command -v wrk >/dev/null || (apt-get install -y wrk || sudo apt-get install -y wrk)
	$(PY) bench/serve.py

# The endpoint at 80 % of its measured maximum for 60 s: errors, p99 first/last 10 s, replica memory (wrk too).
bench-soak: install
	command -v wrk >/dev/null || (apt-get install -y wrk || sudo apt-get install -y wrk)
	$(PY) bench/soak.py

# Measure this machine for the performance model (.shipyard/hardware.json; the pipeline also does it once).
calibrate: install
	$(PY) -m shipyard calibrate

# Predicted vs measured step time through Ray Train, and Ray Train's overhead (bench/perfmodel.py).
bench-perf: install
	$(PY) bench/perfmodel.py

# Check cluster.yaml (or FILE=platform/cluster-aws.yaml) against Ray's schema and Shipyard's rules; starts nothing.
cluster-check: install
	.venv/bin/shipyard cluster check $(or $(FILE),cluster.yaml)

# A two-node Ray cluster on this machine + a real MLflow server; the digits pipeline through `ray job submit`;
# prints where the training workers ran and the endpoint's answer after the job; tears everything down by pid.
cluster-demo: install
	$(PY) -m harness.localcluster

clean:
	rm -rf .shipyard .pytest_cache
