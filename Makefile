# The README's two commands:
#   make pipeline   set up (Debian data, .venv, pinned packages) and run `dvc repro` on the built-in default
#   make test       set up and run the test suite
# Both are idempotent: set-up steps are skipped when already done.

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell sha256sum requirements.lock | cut -c1-16)
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export HF_HUB_OFFLINE ?= 1
export DVC_NO_ANALYTICS ?= 1
# dvc.yaml's commands say `python`: it must be this venv's, whatever the caller's shell has on PATH.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: pipeline test setup system-packages clean-venv

pipeline: setup
	$(BIN)/dvc repro
	@echo "Done. See data/report/ and: $(BIN)/dvc metrics show"

test: setup
	$(BIN)/python -m pytest -n 2

setup: system-packages $(STAMP)

# Debian packages: the built-in data set, and what the team tests need (a real sshd for the SSH remote).
system-packages:
	@missing=""; \
	[ -d /usr/share/datasets/fashion-mnist ] || missing="$$missing dataset-fashion-mnist"; \
	[ -x /usr/sbin/sshd ] || missing="$$missing openssh-server"; \
	command -v git >/dev/null || missing="$$missing git"; \
	if [ -n "$$missing" ]; then \
	  echo "apt-get install:$$missing"; \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

$(STAMP): requirements.lock
	[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed-* && touch $@

clean-venv:
	rm -rf $(VENV)
