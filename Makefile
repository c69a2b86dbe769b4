# The two commands of the README: `make quickstart` and `make test`. Both create the virtual
# environment on first use (.venv, about 2 GB, a few minutes) and reuse it afterwards.
PYTHON ?= python3
# The CPU build of torch that this kind of machine serves from its local wheels. On a GPU machine
# use the CUDA build instead: `make TORCH=torch quickstart`.
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)

.PHONY: install quickstart test test-fast lint bench containers clean system-deps

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH)" -e '.[dev]'
	$(BIN)/python -c "import clinbundle, monai, mlflow, onnxruntime"
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/clinbundle quickstart --workdir work

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/hadolint Dockerfile.train Dockerfile.serve

# The reviewer demo's browser test drives Debian's chromium (never a browser downloaded by
# playwright); the MAP's DICOM SEG tests validate with dicom3tools' dciodvfy. Both are installed
# here when missing and apt-get exists (CI starts from a bare machine); elsewhere install them
# yourself (and point CHROMIUM_PATH at chromium).
CHROMIUM_PATH ?= /usr/bin/chromium
SUDO = $$( [ "$$(id -u)" = 0 ] || echo sudo )
system-deps:
	@if [ -x "$(CHROMIUM_PATH)" ]; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
		echo "installing Debian's chromium for the browser test"; \
		$(SUDO) apt-get install -y --no-install-recommends chromium \
		|| { $(SUDO) apt-get update \
			&& $(SUDO) apt-get install -y --no-install-recommends chromium; }; \
	else echo "warning: no $(CHROMIUM_PATH) and no apt-get: the browser test will fail; install chromium and set CHROMIUM_PATH"; fi
	@if command -v dciodvfy >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
		echo "installing Debian's dicom3tools (dciodvfy) for the DICOM SEG tests"; \
		$(SUDO) apt-get install -y --no-install-recommends dicom3tools \
		|| { $(SUDO) apt-get update \
			&& $(SUDO) apt-get install -y --no-install-recommends dicom3tools; }; \
	else echo "warning: no dciodvfy and no apt-get: the DICOM SEG tests will fail; install dicom3tools"; fi

test: lint system-deps
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/train_throughput.py --out work/bench/train_throughput.json
	$(BIN)/python benchmarks/onnx_vs_torch.py --out work/bench/onnx_vs_torch.json

# builds both images and runs them end to end (podman; see README, Containers)
containers: $(STAMP)
	.ci/containers.sh

clean:
	rm -rf work .pytest_cache .ruff_cache
