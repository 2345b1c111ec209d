# mpc: IMAGE_APPEND_PLATFORM=true tags the image per platform (the tag gets -<platform>)
if [ "${IMAGE_APPEND_PLATFORM:-false}" = true ]; then
  mpc_platform="$(printf '%s' "${PLATFORM:-}" | tr -c 'A-Za-z0-9' '-')"
  case "${@IMAGE_VAR@##*/}" in
    *:*) @IMAGE_VAR@="$@IMAGE_VAR@-$mpc_platform" ;;
    *) @IMAGE_VAR@="$@IMAGE_VAR@:$mpc_platform" ;;
  esac
  export @IMAGE_VAR@
fi
