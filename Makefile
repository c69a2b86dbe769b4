# The two commands of the README: `make quickstart` and `make test`. Both create the virtual
# environment on first use (.venv, about 2 GB, a few minutes) and reuse it afterwards.
PYTHON ?= python3
# The CPU build of torch that this kind of machine serves from its local wheels. On a GPU machine
# use the CUDA build instead: `make TORCH=torch quickstart`.
TORCH ?= torch==2.13.0
# ONNX Runtime's build, a clinbundle extra: cpu (onnxruntime) or gpu (onnxruntime-gpu, with TORCH=torch)
ORT_EXTRA ?= cpu
VENV := .venv
BIN := $(VENV)/bin
# cyclonedx-bom in a venv of its own (see clinbundle/packaging/sbom.py): packaging writes each
# bundle's SBOM with it
SBOM_VENV := .venv-sbom
export CLINBUNDLE_SBOM_PYTHON ?= $(abspath $(SBOM_VENV))/bin/python
STAMP := $(VENV)/.installed-$(ORT_EXTRA)-$(shell cksum < pyproject.toml | cut -d' ' -f1)

.PHONY: install quickstart test test-fast lint bench containers clean system-deps

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	@# one ONNX Runtime build at a time: the two share the module's files
	$(BIN)/python -m pip uninstall -q -y onnxruntime onnxruntime-gpu 2>/dev/null || true
	$(BIN)/python -m pip install -q "$(TORCH)" -e '.[dev,$(ORT_EXTRA)]'
	$(BIN)/python -c "import clinbundle, monai, mlflow, onnxruntime"
	$(PYTHON) -m venv $(SBOM_VENV)
	$(SBOM_VENV)/bin/python -m pip install -q "cyclonedx-bom>=7,<8"
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/clinbundle quickstart --package --workdir work

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/hadolint Dockerfile.train Dockerfile.serve

# The reviewer demo's browser test drives Debian's chromium (never a browser downloaded by
# playwright); the MAP's DICOM SEG tests validate with dicom3tools' dciodvfy; the PACS tests run a real
# Orthanc with its DICOMweb plugin (Debian's orthanc, orthanc-dicomweb). All are installed
# here when missing and apt-get exists (CI starts from a bare machine); elsewhere install them
# yourself (and point CHROMIUM_PATH at chromium).
CHROMIUM_PATH ?= /usr/bin/chromium
SUDO = $$( [ "$$(id -u)" = 0 ] || echo sudo )
# $(call apt_install,PACKAGE,WHAT FOR): Debian's package, refreshing the lists once if needed
apt_install = if command -v apt-get >/dev/null 2>&1; then \
	echo "installing Debian's $(1) $(2)"; \
	$(SUDO) apt-get install -y --no-install-recommends $(1) \
	|| { $(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends $(1); }; \
	else echo "warning: no apt-get to install $(1) $(2): those tests will fail; install it"; fi
system-deps:
	@[ -x "$(CHROMIUM_PATH)" ] || { $(call apt_install,chromium,for the browser test); }
	@command -v dciodvfy >/dev/null 2>&1 || { $(call apt_install,dicom3tools,for the DICOM SEG tests); }
	@{ command -v Orthanc || [ -x /usr/sbin/Orthanc ]; } >/dev/null 2>&1 || { $(call apt_install,orthanc,for the PACS tests); }
	@[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || { $(call apt_install,orthanc-dicomweb,for the PACS tests); }

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
