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
# `make test` runs the suite on this many pytest-xdist workers: the e2e node's tests on
# one, in turn (tests/conftest.py groups them), everything else beside them.
TEST_WORKERS ?= 2

APT_PACKAGES := debootstrap rsync zstd iproute2 openssh-client \
	podman buildah skopeo runc crun netavark uidmap fuse-overlayfs \
	docker-registry etcd-server etcd-client \
	containerd containernetworking-plugins busybox-static nftables iptables socat \
	libnss-wrapper util-linux
# installed without their recommends: qemu-user-static must not register itself with
# this machine's binfmt_misc (the emulated test hosts register it privately)
APT_PACKAGES_NO_RECOMMENDS := qemu-user-static

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
	@missing=$$(for p in $(APT_PACKAGES_NO_RECOMMENDS); do \
	  dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "apt-get install --no-install-recommends: $$missing"; \
	  apt-get update -qq; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
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
rootfs: deps venv ## debootstrap the SSH test-host rootfs, amd64 + emulated arm64/s390x (cached tarballs)
	$(PY) -m tests.infra.rootfs
	$(PY) -m tests.infra.foreignroot

.PHONY: test
test: deps venv ## install everything and run the whole suite
	@# side by side: the Go build's downloads and the rootfs's waits on Debian's mirror overlap
	@# the other's CPU work (measured cold: both done at 14 min, 16 min one after the other)
	$(MAKE) --no-print-directory -j2 upstream rootfs
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

.PHONY: bench
bench: deps venv upstream rootfs ## run the benchmarks; they print figures
	$(PY) -m pytest -m bench -s -p no:randomly tests/bench $(PYTEST_ARGS)

.PHONY: soak
soak: deps venv upstream rootfs ## fault-injection soak on the e2e node: MPC_SOAK_BUILDS (500) builds, prints figures (MPC_SOAK_SEED replays)
	MPC_SOAK_BUILDS=$${MPC_SOAK_BUILDS:-500} $(PY) -m pytest -m e2e -s -p no:randomly \
	  tests/e2e/test_soak.py $(PYTEST_ARGS)

.PHONY: clean
clean: ## remove the venv (the cache in $(MPC_CACHE) stays)
	rm -rf $(VENV) *.egg-info

# --- Tekton bundles: `make bundles-check`, `make bundles`, `make pin-bundles` -----
# REGISTRY: where the bundles go (host[:port]/path, e.g. quay.io/acme/mpc);
# left empty, `make bundles-check` pushes to an embedded loopback registry it starts and
# stops. VERSION: the tag of every bundle (default: mpc's package version).
# The creation time is SOURCE_DATE_EPOCH, else the last commit of each
# bundle's files, so the same sources give the same digests. See bundles/README.md.
REGISTRY ?=
VERSION ?=
BUNDLES_LOCK ?= bundles/bundles.lock.yaml
PIN_PATHS ?= tasks glue
PIN_OUT ?= dist/release
MPC := $(VENV)/bin/mpc
BUNDLE_ARGS = $(if $(REGISTRY),--registry $(REGISTRY)) $(if $(VERSION),--version $(VERSION))

.PHONY: bundles-check
bundles-check: deps venv upstream ## no cluster: generate + validate every Task, push all bundles with tkn to a loopback registry, list them
	$(MPC) bundles run $(BUNDLE_ARGS)

.PHONY: bundles
bundles: venv upstream ## push every bundle: make bundles REGISTRY=quay.io/acme/mpc VERSION=0.1
	@[ -n "$(REGISTRY)" ] && [ -n "$(VERSION)" ] || \
	  { echo "usage: make bundles REGISTRY=host[:port]/path VERSION=x.y" >&2; exit 2; }
	$(MPC) bundles push $(BUNDLE_ARGS) --lock $(BUNDLES_LOCK)

.PHONY: pin-bundles
pin-bundles: venv ## release manifests pinned to the digests in BUNDLES_LOCK, into PIN_OUT (or PIN_IN_PLACE=1)
	$(MPC) bundles pin --lock $(BUNDLES_LOCK) \
	  $(if $(PIN_IN_PLACE),--in-place,--out $(PIN_OUT)) $(wildcard $(PIN_PATHS))
	$(MPC) bundles check-pinned --lock $(BUNDLES_LOCK) \
	  $(if $(PIN_IN_PLACE),$(wildcard $(PIN_PATHS)),$(PIN_OUT))

# `make release REGISTRY=quay.io/acme/mpc VERSION=0.2`: mpc's images built from their
# Containerfiles and pushed, every bundle pushed with its steps pinned to the image
# digests, the manifests pinned into PIN_OUT, and one install manifest
# PIN_OUT/install.yaml (kubectl apply -f it; see README "Installing").
# INSECURE=1: the registry speaks plain HTTP.
IMAGES_LOCK ?= dist/images.lock.yaml

.PHONY: release
release: deps venv upstream ## images + bundles pushed, manifests pinned by digest, PIN_OUT/install.yaml
	@[ -n "$(REGISTRY)" ] && [ -n "$(VERSION)" ] || \
	  { echo "usage: make release REGISTRY=host[:port]/path VERSION=x.y [INSECURE=1]" >&2; exit 2; }
	$(MPC) images prepare
	$(MPC) images build $(BUNDLE_ARGS) --lock $(IMAGES_LOCK) $(if $(INSECURE),--tls-verify false)
	$(MPC) bundles push $(BUNDLE_ARGS) --lock $(BUNDLES_LOCK) --images $(IMAGES_LOCK)
	rm -rf $(PIN_OUT)
	$(MPC) bundles pin --lock $(BUNDLES_LOCK) --images $(IMAGES_LOCK) --complete \
	  --out $(PIN_OUT) tasks glue/deploy
	$(MPC) bundles check-pinned --lock $(BUNDLES_LOCK) $(PIN_OUT)
	$(VENV)/bin/kubectl kustomize $(PIN_OUT)/glue/deploy/install > $(PIN_OUT)/install.yaml
	cp glue/deploy/example-pool.yaml $(PIN_OUT)/example-pool.yaml
	@echo "wrote $(PIN_OUT)/install.yaml (and an example host pool: $(PIN_OUT)/example-pool.yaml)"

.PHONY: generate-buildah-remote
generate-buildah-remote: venv ## regenerate tasks/buildah-remote from tasks/buildah
	$(VENV)/bin/mpc buildah-remote --from tasks/buildah/0.1/buildah.yaml \
	  --out tasks/buildah-remote/0.1/buildah-remote.yaml

# --- the main job: a real multi-platform build on the embedded cluster (tests/e2e/runjob.py) ---
# `make run`: the e2e node (instance RUN_NAME), `make release` into its registry, install.yaml
# applied, SSH build hosts that really are linux/arm64 and linux/s390x, a matrix PipelineRun of
# buildah-remote + an index step; leaves it all up. `make stop` tears it down and checks.
RUN_NAME ?= run

.PHONY: run
run: deps venv upstream rootfs ## main job: embedded cluster + arm64/s390x build hosts, a multi-platform build into one image index
	$(PY) -m tests.e2e.runjob run --name $(RUN_NAME)

.PHONY: stop
stop: ## tear down what `make run` left up and check this machine is as before
	$(PY) -m tests.e2e.runjob stop --name $(RUN_NAME)

# --- e2e: a real one-node Kubernetes + Tekton in its own namespaces (tests/e2e) ---
E2E_NAME ?= dev

.PHONY: e2e-up
e2e-up: deps venv upstream ## start the e2e node + Tekton (state in $(MPC_CACHE)/e2e/$(E2E_NAME); warm if kept)
	MPC_E2E_NAME=$(E2E_NAME) $(PY) -m tests.e2e.node up

.PHONY: e2e-down
e2e-down: ## stop the e2e node, check nothing is left behind; WIPE=1 also deletes its state
	MPC_E2E_NAME=$(E2E_NAME) $(PY) -m tests.e2e.node down $(if $(WIPE),--wipe)

.PHONY: e2e
e2e: deps venv upstream ## run only the e2e tier (its own node; MPC_E2E_ATTACH=dev to use e2e-up's)
	$(PY) -m pytest -m e2e tests/e2e $(PYTEST_ARGS)
