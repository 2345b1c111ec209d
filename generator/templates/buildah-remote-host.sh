#!/bin/bash
# mpc buildah-remote: runs on the build host as the build user, started over SSH
# by the wrapper. params.sh (next to it) holds the values, each shell-quoted.
set -euo pipefail
here="$(dirname "$0")"
# shellcheck source=/dev/null
. "$here/params.sh"

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
# The env comes in a file only this user (and root) can read: never on a command line.
rc=0
"${podman[@]}" run --rm "${label[@]}" --env-file "$BUILD_DIR/env/build.env" "${RUN_OPTS[@]}" \
  --entrypoint /mpc/scripts/run "$BUILDER_IMAGE" "${ARGS[@]}" </dev/null || rc=$?
rm -f "$BUILD_DIR/env/build.env"
if [ "${podman[0]}" = sudo ]; then
  # rootful podman wrote as root: give the files back to the build user
  sudo -n podman run --rm "${label[@]}" --pull=never --user 0 --entrypoint chown \
    -v "$BUILD_DIR:/mpc-build:Z" \
    "$BUILDER_IMAGE" -R "$(id -u):$(id -g)" /mpc-build </dev/null || rc=$((rc ? rc : 1))
fi
exit "$rc"
