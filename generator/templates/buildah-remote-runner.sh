#!/bin/sh
# mpc buildah-remote: the entrypoint of the builder container on the host.
# Runs the original build script with the step's args, then names the built
# image for the pod to load, so later steps find it locally: the OCI layout the
# build itself saved it to in a directory that goes back to the pod, if there
# is one, or else an OCI archive of it (named after the image) in /mpc/out.
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
: > /mpc/out/started
/mpc/scripts/build "$@"
if [ -n "${MPC_EXPORT_IMAGE:-}" ]; then
  if [ -n "${STORAGE_DRIVER:-}" ]; then set -- --storage-driver "$STORAGE_DRIVER"; else set --; fi
  if ! buildah "$@" inspect --type image "$MPC_EXPORT_IMAGE" >/dev/null 2>&1; then
    echo "mpc: no local image $MPC_EXPORT_IMAGE after the build: nothing to bring back" >&2
    exit 0
  fi
  # Working containers of the built image the script left mounted (older build
  # scripts hand `buildah mount`'s path to later steps): the pod makes its own.
  mpc_image_id="$(buildah "$@" inspect --type image --format '{{.FromImageID}}' "$MPC_EXPORT_IMAGE")"
  buildah "$@" mount 2>/dev/null | while read -r mpc_name mpc_path; do
    if [ "$(buildah "$@" inspect --type container --format '{{.FromImageID}}' "$mpc_name" 2>/dev/null)" \
      = "$mpc_image_id" ]; then
      printf '%s\t%s\n' "$mpc_name" "$mpc_path"
    fi
  done > /mpc/out/containers
  # A Docker-format image (buildah build --format=docker) goes back as a docker
  # archive: through OCI it would lose its manifest type and the Docker-only config
  # (HEALTHCHECK, SHELL, ...), and a later step that pushes it as it is would push
  # something else than the same Task building in the pod.
  mpc_docker=no
  case "$(buildah "$@" inspect --type image --format '{{.Manifest}}' "$MPC_EXPORT_IMAGE")" in
    *'"mediaType":"application/vnd.docker.distribution.manifest.v2+json"'*) mpc_docker=yes ;;
  esac
  # The build may have saved the image itself as an OCI layout (buildah push
  # "$IMAGE" oci:<dir>:"$IMAGE") in a directory that goes back to the pod: then
  # the pod loads it from there, and the image crosses the network once.
  mpc_ref="\"org.opencontainers.image.ref.name\":\"$MPC_EXPORT_IMAGE\""
  if [ "$mpc_docker" = no ]; then
    while IFS= read -r mpc_dir; do
      find "$mpc_dir" -maxdepth 3 -name index.json -type f -newer /mpc/out/started 2>/dev/null || :
    done < /mpc/scripts/back-dirs | while IFS= read -r mpc_index; do
      mpc_layout="${mpc_index%/index.json}"
      case "$mpc_layout" in *:*) continue ;; esac
      if [ -f "$mpc_layout/oci-layout" ] && grep -qF "$mpc_ref" "$mpc_index"; then
        printf '%s\n' "$mpc_layout" > /mpc/out/image.layout
        break
      fi
    done
  fi
  if [ "$mpc_docker" = yes ]; then
    buildah "$@" push -q "$MPC_EXPORT_IMAGE" "docker-archive:/mpc/out/image.docker.tar:$MPC_EXPORT_IMAGE"
  elif [ ! -f /mpc/out/image.layout ]; then
    buildah "$@" push -q "$MPC_EXPORT_IMAGE" "oci-archive:/mpc/out/image.tar:$MPC_EXPORT_IMAGE"
  fi
fi
