#!/bin/bash
# mpc buildah-remote: runs on the build host as the build user, started over SSH
# by the wrapper. params.sh (next to it) holds the values, each shell-quoted.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=/dev/null
. "$here/params.sh"

# builder: host (the pool's opt-in for hosts that cannot run containers, e.g. QEMU
# user-emulated ones): no builder container. The original build script runs as
# root on the host, with the host's own tools, in a mount namespace of its own
# (`sudo unshare`, the command provisioning allows for such a host), where the
# directories the container would have had are bind-mounted at the pod's paths.
# And in a PID namespace of its own: whatever root runs there dies with unshare
# (--kill-child, then the kernel empties the namespace), which deprovisioning
# kills when the build is cancelled, found by the SUDO_USER sudo gave it.
unshare_cmd=@UNSHARE@
as_root=(sudo -n "$unshare_cmd" --mount --pid --fork --kill-child --mount-proc)
host_path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# As root, inside the namespace: the mounts, then the runner with the build's env.
in_namespace() {
  local i order src dst line
  # parents before what is mounted inside them: shorter pod paths first
  order="$(i=0
    while [ "$i" -lt "${#BINDS[@]}" ]; do
      printf '%s %s\n' "${#BINDS[i+1]}" "$i"
      i=$((i + 3))
    done | sort -n | cut -d' ' -f2)"
  for i in $order; do
    src="${BINDS[i]}" dst="${BINDS[i+1]}"
    mkdir -p "$src" "$dst"
    mount --bind "$src" "$dst"
    if [ "${BINDS[i+2]}" = ro ]; then mount -o remount,bind,ro "$dst"; fi
  done
  # the pod's registry proxy as a mirror: the host's drop-ins and ours, in a copy
  if [ -f /mpc/scripts/registries.conf ]; then
    mkdir -p /etc/containers/registries.conf.d "$BUILD_DIR/registries.conf.d"
    cp -a /etc/containers/registries.conf.d/. "$BUILD_DIR/registries.conf.d/"
    cp /mpc/scripts/registries.conf "$BUILD_DIR/registries.conf.d/zz-mpc-pod-registries.conf"
    mount --bind "$BUILD_DIR/registries.conf.d" /etc/containers/registries.conf.d
  fi
  # the env file: one NAME=value a line, as podman's --env-file reads it
  local env_args=()
  while IFS= read -r line; do env_args+=("$line"); done < "$BUILD_DIR/env/build.env"
  mkdir -p "$WORKDIR"
  cd "$WORKDIR"
  exec env -i "PATH=$host_path" HOME=/root "${env_args[@]}" /mpc/scripts/run "${ARGS[@]}" </dev/null
}

if [ "${BUILDER:-container}" = host ]; then
  case "${1:-}" in
    --in-namespace) in_namespace ;;
    --give-back)
      # root wrote files: the build's own container storage goes, the rest back to the user
      rm -rf "$BUILD_DIR/storage" "$BUILD_DIR/run-containers"
      chown -R "$2" "$BUILD_DIR"
      exit 0 ;;
  esac
  if ! sudo -n "$unshare_cmd" --version >/dev/null 2>&1; then
    echo "mpc: the pool runs builds on $(hostname) as root (builder: host), but no sudo rule lets $(id -un) run $unshare_cmd" >&2
    exit 1
  fi
  echo "mpc: no builder container on $(hostname) (pool: builder: host): the build script runs there as root with the host's tools" >&2
  rc=0
  "${as_root[@]}" /bin/bash "$here/host.sh" --in-namespace || rc=$?
  rm -f "$BUILD_DIR/env/build.env"
  "${as_root[@]}" /bin/bash "$here/host.sh" --give-back "$(id -u):$(id -g)" \
    || rc=$((rc ? rc : 1))
  exit "$rc"
fi

# Rootless podman first. A host admin who cannot offer user namespaces grants
# the build user `sudo podman` instead (e.g. the provisioner's sudo rule).
if [ "$(id -u)" = 0 ]; then
  podman=(podman)
elif podman unshare true >/dev/null 2>"$BUILD_DIR/out/rootless.err"; then
  podman=(podman)
elif sudo -n podman --version >/dev/null 2>&1; then
  podman=(sudo -n podman)
else
  echo "mpc: podman cannot run for $(id -un) on $(hostname): rootless podman failed and no sudo rule allows podman:" >&2
  cat "$BUILD_DIR/out/rootless.err" >&2
  exit 1
fi
rm -f "$BUILD_DIR/out/rootless.err"

# Labelled with the build user: deprovisioning removes root's containers by it,
# whatever still runs when the build is cancelled.
label=(--label "@USER_LABEL@=$(id -un)")
# The builder's container storage: the namespace's layer cache when the pool gives it
# one (only to rootless podman, which writes it as this user; docs/layer-cache.md), with
# buildah's layer cache on (BUILDAH_LAYERS, unless the build's env sets it); else an
# empty volume of this build alone.
storage=(-v /var/lib/containers)
if [ -n "${CACHE_DIR:-}" ] && [ "${podman[0]}" != sudo ] && [ "$(id -u)" != 0 ]; then
  mkdir -p "$CACHE_DIR/storage"
  storage=(-v "$CACHE_DIR/storage:/var/lib/containers:Z")
  if ! grep -q '^BUILDAH_LAYERS=' "$BUILD_DIR/env/build.env"; then
    echo BUILDAH_LAYERS=true >> "$BUILD_DIR/env/build.env"
  fi
  echo "mpc: using the namespace's layer cache on $(hostname)" >&2
fi
# The env comes in a file only this user (and root) can read: never on a command line.
rc=0
"${podman[@]}" run --rm "${label[@]}" --env-file "$BUILD_DIR/env/build.env" "${storage[@]}" "${RUN_OPTS[@]}" \
  --entrypoint /mpc/scripts/run "$BUILDER_IMAGE" "${ARGS[@]}" </dev/null || rc=$?
rm -f "$BUILD_DIR/env/build.env"
if [ "${podman[0]}" = sudo ]; then
  # rootful podman wrote as root: give the files back to the build user
  sudo -n podman run --rm "${label[@]}" --pull=never --user 0 --entrypoint chown \
    -v "$BUILD_DIR:/mpc-build:Z" \
    "$BUILDER_IMAGE" -R "$(id -u):$(id -g)" /mpc-build </dev/null || rc=$((rc ? rc : 1))
fi
exit "$rc"
