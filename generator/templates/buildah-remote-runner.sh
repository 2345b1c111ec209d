#!/bin/sh
# mpc buildah-remote: the entrypoint of the builder container on the host.
# Runs the original build script with the step's args, then saves the built
# image as an OCI layout (oci-archive, named after the image) that the pod
# loads, so later steps find it locally.
set -eu
/mpc/scripts/build "$@"
if [ -n "${MPC_EXPORT_IMAGE:-}" ]; then
  if [ -n "${STORAGE_DRIVER:-}" ]; then set -- --storage-driver "$STORAGE_DRIVER"; else set --; fi
  if buildah "$@" inspect --type image "$MPC_EXPORT_IMAGE" >/dev/null 2>&1; then
    buildah "$@" push -q "$MPC_EXPORT_IMAGE" "oci-archive:/mpc/out/image.tar:$MPC_EXPORT_IMAGE"
  else
    echo "mpc: no local image $MPC_EXPORT_IMAGE after the build: nothing to bring back" >&2
  fi
fi
