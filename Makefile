# Two commands from a fresh clone: `make run` trains DQN, `make test` runs every test.
# Each target sets up what it needs, once: an environment is trusted only by its stamp file, written
# after a complete install and redone when pyproject.toml is newer than it.

SHELL := /bin/bash
PYTHON ?= python3
# The CPU build: pip resolving a bare torch pulls a multi-GB CUDA one.
TORCH := torch==2.13.0
# Hydra overrides for run (make run ARGS="seed=3 env=acrobot"), arguments for ui and bench.
ARGS ?=
# The browser test's chromium and its driver; the scale-out tests' database.
SYSTEM_PACKAGES := chromium chromium-driver postgresql

.PHONY: run test test-fast test-slow test-ray test-submitit system-packages ui bench clean
.NOTPARALLEL:

run: .venv/.installed
	.venv/bin/python -m rl_pipeline +experiment=dqn $(ARGS)

test: test-fast test-slow test-ray test-submitit

test-fast: .venv/.installed-test
	.venv/bin/python -m pytest -v -m "not slow"

test-slow: .venv/.installed-test system-packages
	.venv/bin/python -m pytest -v -m slow

# The launchers for scaling out, each in an environment of its own: hydra-ray-launcher pins cloudpickle < 3.
test-ray: .venv-ray/.installed system-packages
	.venv-ray/bin/python -m pytest -v -m ray

test-submitit: .venv-slurm/.installed system-packages
	.venv-slurm/bin/python -m pytest -v -m submitit

ui: .venv/.installed
	.venv/bin/python -m rl_pipeline.ui $(ARGS)

bench: .venv/.installed-bench
	.venv/bin/python -m benchmarks.speed $(ARGS)

# The environments only: outputs/ holds results, which no target deletes.
clean:
	rm -rf .venv .venv-ray .venv-slurm rl_pipeline.egg-info .pytest_cache

.venv/.installed: pyproject.toml
	$(call install,.venv,.)

.venv/.installed-test: .venv/.installed
	$(call install,.venv,.[test])

.venv/.installed-bench: .venv/.installed
	$(call install,.venv,.[bench])

# In variables: $(call) would split a literal at its commas.
RAY_EXTRAS := .[test,ray,postgres]
SLURM_EXTRAS := .[test,slurm,postgres]

.venv-ray/.installed: pyproject.toml
	$(call install,.venv-ray,$(RAY_EXTRAS))

.venv-slurm/.installed: pyproject.toml
	$(call install,.venv-slurm,$(SLURM_EXTRAS))

# $(call install,VENV,SPEC): torch and the project as SPEC into VENV (made with $(PYTHON) if absent),
# pip's output in VENV/install.log; one line and a non-zero exit if anything fails, and the stamp ($@) only after.
define install
@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null || { \
	echo "make: rl_pipeline needs Python 3.10 or newer as $(PYTHON); found $$(command -v $(PYTHON) >/dev/null && $(PYTHON) --version 2>&1 | head -n1 || echo no such command) (make PYTHON=python3.11 ...)" >&2; exit 1; }
@[ -x $(1)/bin/python ] || $(PYTHON) -m venv $(1) || { \
	echo "make: $(PYTHON) -m venv $(1) failed (Debian: apt-get install python3-venv)" >&2; rm -rf $(1); exit 1; }
@echo "Installing $(TORCH) and $(2) into $(1) (pip's log: $(1)/install.log)"
@{ $(1)/bin/python -m pip install --upgrade pip && $(1)/bin/python -m pip install $(TORCH) \
	&& $(1)/bin/python -m pip install -e '$(2)'; } > $(1)/install.log 2>&1 || { \
	echo "make: pip could not install $(2) into $(1): $$(grep -m1 '^ERROR' $(1)/install.log || tail -n1 $(1)/install.log) (is the package index reachable? full log: $(1)/install.log)" >&2; exit 1; }
@touch $@
endef

# Debian's packages that the slow and scale-out tiers need: installed with apt as root or with sudo,
# else named in one line; never a skipped test.
system-packages:
	@missing=$$(for package in $(SYSTEM_PACKAGES); do dpkg -s $$package >/dev/null 2>&1 || echo -n "$$package "; done); \
	[ -z "$$missing" ] && exit 0; \
	if [ "$$(id -u)" -eq 0 ]; then sudo=; elif sudo -n true 2>/dev/null; then sudo=sudo; else \
		echo "make: the tests need the Debian packages $$missing; install them (sudo apt-get install -y $$missing) and run make test again" >&2; exit 1; fi; \
	echo "Installing $$missing with apt"; \
	$$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null
