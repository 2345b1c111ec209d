#!/bin/sh
# mpc buildah-remote: the entrypoint of the builder container on the host.
# Runs the original build script with the step's args, then saves the built
# image as an OCI layout (oci-archive, named after the image) that the pod
# loads, so later steps find it locally.
set -eu
# The env came through podman's --env-file, one line a value: values with a
# newline or carriage return came escaped for printf %b, named in MPC_ENV_ESCAPED.
for mpc_name in ${MPC_ENV_ESCAPED:-}; do
  case "$mpc_name" in
    '' | [!A-Za-z_]* | *[!A-Za-z0-9_]*) echo "mpc: not a variable name: $mpc_name" >&2; exit 1 ;;
  esac
  eval "mpc_value=\${$mpc_name}"
  mpc_value="$(printf '%bx' "$mpc_value")"
  export "$mpc_name=${mpc_value%x}"
done
unset MPC_ENV_ESCAPED mpc_name mpc_value
/mpc/scripts/build "$@"
if [ -n "${MPC_EXPORT_IMAGE:-}" ]; then
  if [ -n "${STORAGE_DRIVER:-}" ]; then set -- --storage-driver "$STORAGE_DRIVER"; else set --; fi
  if buildah "$@" inspect --type image "$MPC_EXPORT_IMAGE" >/dev/null 2>&1; then
    buildah "$@" push -q "$MPC_EXPORT_IMAGE" "oci-archive:/mpc/out/image.tar:$MPC_EXPORT_IMAGE"
  else
    echo "mpc: no local image $MPC_EXPORT_IMAGE after the build: nothing to bring back" >&2
  fi
fi
