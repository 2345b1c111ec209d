# mpc: the two commands that matter are `make run` (the main job) and
# `make test` (installs everything, then runs the whole suite).
SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

# Upstream binaries and the SSH-host rootfs are cached outside the work tree,
# keyed by version, so fresh clones on the same machine start warm.
MPC_CACHE ?= $(HOME)/.cache/mpc
export MPC_CACHE
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

APT_PACKAGES := debootstrap rsync zstd iproute2 openssh-client \
	podman buildah skopeo runc crun netavark uidmap fuse-overlayfs \
	docker-registry etcd-server etcd-client \
	containerd containernetworking-plugins busybox-static nftables iptables socat

.PHONY: help
help: ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

.PHONY: deps
deps: ## install the Debian packages the tests need (only the missing ones)
	@missing=$$(for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "apt-get install: $$missing"; \
	  apt-get update -qq; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

.PHONY: venv
venv: $(VENV)/.installed ## Python venv with mpc (editable) and the test tools
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

.PHONY: upstream
upstream: ## build kube-apiserver, kubelet, Tekton and tkn from pinned Go modules (cached)
	@command -v go >/dev/null || { echo "Go is required to build the upstream binaries" >&2; exit 1; }
	tests/infra/upstream/build.sh $(MPC_CACHE)

.PHONY: rootfs
rootfs: deps venv ## debootstrap the SSH test-host rootfs (cached tarball)
	$(PY) -m tests.infra.rootfs

.PHONY: test
test: deps venv upstream rootfs ## install everything and run the whole suite
	$(PY) -m pytest $(PYTEST_ARGS)

.PHONY: bench
bench: deps venv upstream rootfs ## run the benchmarks; they print figures
	$(PY) -m pytest -m bench -s -p no:randomly tests/bench $(PYTEST_ARGS)

.PHONY: clean
clean: ## remove the venv (the cache in $(MPC_CACHE) stays)
	rm -rf $(VENV) *.egg-info
