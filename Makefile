# Entry points of the project; docs/building.md explains each one.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

PYTHON ?= python3
JOBS ?= 2
BUILD_TYPE ?= RelWithDebInfo
ASAN_BUILD_TYPE ?= Debug
# LeakSanitizer works on these machines (it needs ptrace; set detect_leaks=0 where it is denied).
# tests/lsan.supp hides one leak inside libzmq's own I/O thread (see docs/building.md).
ASAN_OPTIONS ?= detect_leaks=1
# A ctest regex of tests to leave out of the sanitizer pass (none by default; docs/building.md).
ASAN_CTEST_EXCLUDE ?=
LSAN_OPTIONS ?= suppressions=$(CURDIR)/tests/lsan.supp
UBSAN_OPTIONS ?= print_stacktrace=1

APT_PACKAGES := cmake g++ pkg-config ninja-build ccache clang-format \
	libzmq3-dev cppzmq-dev libprotobuf-dev protobuf-compiler libsodium-dev \
	libgtest-dev libgmock-dev libbenchmark-dev
# Pinned: an unpinned torch would download a multi-GB CUDA build.
PIP_PACKAGES := torch==2.13.0 pytest numpy lightning==2.6.6 scikit-learn expecttest
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FORMAT_DIRS := $(wildcard csrc tests/cpp benchmarks examples)

.PHONY: setup build build-asan install-python test demo bench format format-check clean

setup:
	@missing="$$(for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' "$$p" 2>/dev/null | grep -q 'install ok installed' || echo "$$p"; \
	done)"; \
	if [ -n "$$missing" ]; then \
	  echo "apt: installing" $$missing; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing; \
	fi
	$(PYTHON) -m pip install -q --root-user-action=ignore $(PIP_PACKAGES)

build: setup
	cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=$(BUILD_TYPE) -DHIVEMIND_SANITIZE=OFF
	cmake --build build -j $(JOBS)

build-asan: setup
	cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=$(ASAN_BUILD_TYPE) -DHIVEMIND_SANITIZE=ON
	cmake --build build-asan -j $(JOBS)

# Editable, so that `python3 -m pytest` (which puts the repo root on sys.path) and the installed
# package are the same directory, with _C*.so built into it.
install-python: setup
	CMAKE_BUILD_PARALLEL_LEVEL=$(JOBS) $(PYTHON) -m pip install -q --root-user-action=ignore --no-build-isolation -e .

# Runs all three suites even when one fails (CI shows every failure), then fails if any did.
test: setup build build-asan install-python
	@failed=""; \
	(cd build && ctest --output-on-failure) || failed="$$failed build/"; \
	(cd build-asan && ASAN_OPTIONS=$(ASAN_OPTIONS) LSAN_OPTIONS=$(LSAN_OPTIONS) UBSAN_OPTIONS=$(UBSAN_OPTIONS) \
	  ctest --output-on-failure $(if $(ASAN_CTEST_EXCLUDE),-E '$(ASAN_CTEST_EXCLUDE)')) \
	  || failed="$$failed build-asan/"; \
	$(PYTHON) -m pytest -q tests/python || failed="$$failed tests/python"; \
	if [ -n "$$failed" ]; then echo "make test: FAILED in:$$failed"; exit 1; fi; \
	echo "make test: all suites passed"

# The main job: a swarm of 4 independent peers trains on scikit-learn's digits with
# backend="hivemind"; one is SIGKILLed mid-way and the survivors finish (examples/swarm_digits.py).
demo: setup install-python
	$(PYTHON) examples/swarm_digits.py

bench: setup build
	./build/bin/benchmark_transport

format:
	find $(FORMAT_DIRS) -type f \( -name '*.h' -o -name '*.cpp' \) -print0 | xargs -0 -r clang-format -i

format-check:
	find $(FORMAT_DIRS) -type f \( -name '*.h' -o -name '*.cpp' \) -print0 \
	  | xargs -0 -r clang-format --dry-run --Werror

clean:
	rm -rf build build-asan *.egg-info hivemind_backend/_C*.so
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
