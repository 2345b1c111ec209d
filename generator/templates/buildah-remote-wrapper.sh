#!/bin/bash
# mpc buildah-remote: the build step's wrapper (generated; do not edit, regenerate).
# It runs the original build script (embedded below, unchanged) on the build
# host that mpc assigned to this TaskRun, or in this pod when the host is
# "localhost", then brings back what later steps need: the workspaces, the
# writable volumes, Tekton's /workspace directory, /tekton/results and the
# built image.
set -euo pipefail

ssh_dir=@SSH_DIR@
if [ -f "$ssh_dir/error" ]; then
  echo "mpc: no build host was provisioned for platform ${PLATFORM:-?}:" >&2
  cat "$ssh_dir/error" >&2
  echo >&2
  exit 1
fi

@APPEND_PLATFORM@
work="$(mktemp -d)"
cat > "$work/build" <<'@EOF_MARK@'
@ORIGINAL_SCRIPT@
@EOF_MARK@
chmod 0755 "$work/build"

ssh_host="$(cat "$ssh_dir/host")"
if [ "$ssh_host" = localhost ]; then
  echo "mpc: host is localhost: building in this pod" >&2
  "$work/build" "$@"
  rm -rf "$work"
  exit 0
fi

user_dir="$(cat "$ssh_dir/user-dir")"
# how the host runs the build: in the builder container (the default), or, for a
# host the pool says cannot run containers, as root on the host itself
builder=container
if [ -s "$ssh_dir/builder" ]; then builder="$(cat "$ssh_dir/builder")"; fi
case "$builder" in
  container | host) ;;
  *) echo "mpc: the secret names an unknown builder: $builder" >&2; exit 1 ;;
esac
remote="$user_dir/mpc-build"
# the namespace's layer cache on the host, when the pool gives it one (docs/layer-cache.md)
cache_dir=""
if [ -s "$ssh_dir/cache-dir" ] && [ "$builder" = container ]; then cache_dir="$(cat "$ssh_dir/cache-dir")"; fi
install -m 0600 "$ssh_dir/id_rsa" "$work/id"
ssh_opts=(-F /dev/null -i "$work/id" -o IdentitiesOnly=yes -o BatchMode=yes -o LogLevel=ERROR
  -o ConnectTimeout=30 -o ServerAliveInterval=60 -o ServerAliveCountMax=10
  -o ControlMaster=auto -o "ControlPath=$work/cm" -o ControlPersist=120)
if [ -s "$ssh_dir/known_hosts" ]; then
  ssh_opts+=(-o StrictHostKeyChecking=yes -o "UserKnownHostsFile=$ssh_dir/known_hosts")
else
  echo "mpc: warning: the secret has no known_hosts; the host key is not verified" >&2
  ssh_opts+=(-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null)
fi
proxy_pid=""
cleanup() {
  if [ -n "$proxy_pid" ]; then kill "$proxy_pid" 2>/dev/null || true; fi
  ssh "${ssh_opts[@]}" -O exit "$ssh_host" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
rsh="ssh ${ssh_opts[*]}"
rsync_opts=(@RSYNC_OPTS@)
q() { printf '%q' "$1"; }

# Proxies: one the pod reaches by a name only the cluster resolves (a Service:
# *.svc, *.cluster.local, a bare name the pod's DNS search list completes, or
# any name the build host cannot resolve) is no proxy on the build host. The
# build runs there without it, and without the NO_PROXY that goes with it.
proxy_host() {
  local h=${1#*://}
  h=${h%%/*}
  h=${h##*@}
  case "$h" in
    \[*) h=${h%%]*}; h=${h#[} ;;
    *) h=${h%%:*} ;;
  esac
  printf '%s' "$h"
}
drop_env() {
  echo "mpc: not passing $1 to the build host: $2" >&2
  unset "$1"
}
proxy_vars=(BUILDAH_HTTP_PROXY HTTP_PROXY HTTPS_PROXY ALL_PROXY FTP_PROXY
  http_proxy https_proxy all_proxy ftp_proxy)
cluster_name() {
  case "$1" in
    *.svc | *.svc.* | *.cluster.local | *.cluster.local.) return 0 ;;
    *) return 1 ;;
  esac
}
ip_address() {
  case "$1" in
    *:* | *[0-9].[0-9]*) [ -z "${1//[0-9a-fA-F:.]/}" ] ;;
    *) return 1 ;;
  esac
}
ask=()
for v in "${proxy_vars[@]}"; do
  h="$(proxy_host "${!v:-}")"
  if [ -n "$h" ] && ! ip_address "$h" && ! cluster_name "$h"; then ask+=("$h"); fi
done
unknown=" "
if [ "${#ask[@]}" -gt 0 ]; then
  # shellcheck disable=SC2029 # expanded here on purpose, each name quoted for the remote shell
  unknown+="$(ssh "${ssh_opts[@]}" "$ssh_host" "for n in$(printf ' %q' "${ask[@]}"); do
    getent hosts \"\$n\" >/dev/null 2>&1 || [ \$? = 127 ] || printf '%s ' \"\$n\"; done" </dev/null)"
fi
dropped_std=0 kept_std=0
for v in "${proxy_vars[@]}"; do
  if [ -z "${!v:-}" ]; then continue; fi
  h="$(proxy_host "${!v}")"
  why=""
  if cluster_name "$h"; then
    why="$h is a name inside the cluster"
  elif [[ "$unknown" == *" $h "* ]]; then
    why="the build host cannot resolve $h"
  fi
  if [ -z "$why" ]; then
    if [ "$v" != BUILDAH_HTTP_PROXY ]; then kept_std=1; fi
    continue
  fi
  drop_env "$v" "$why (a proxy only the pod can reach)"
  if [ "$v" = BUILDAH_HTTP_PROXY ]; then
    if [ -n "${BUILDAH_NO_PROXY+set}" ]; then drop_env BUILDAH_NO_PROXY "it goes with BUILDAH_HTTP_PROXY"; fi
  else
    dropped_std=1
  fi
done
if [ "$dropped_std" = 1 ] && [ "$kept_std" = 0 ]; then
  for v in NO_PROXY no_proxy; do
    if [ -n "${!v+set}" ]; then drop_env "$v" "it goes with the proxies not passed"; fi
  done
fi

# The directories the build sees, each: <pod path> <name on the host> <rw|ro> <copy back: yes|no>
dirs=()
# Tekton's own /workspace (an emptyDir every step shares: scripts leave files there for
# later steps), first: the directories mounted inside it are copied on their own
if [ -d /workspace ]; then dirs+=(/workspace workspace rw yes); fi
@DIRS@
if [ -d /tekton/results ]; then dirs+=(/tekton/results results rw yes); fi

# Remote paths are passed with --protect-args: the remote shell never splits them.
# A directory inside another one of dirs is copied on its own, not as part of that one.
nested() {
  local j=0
  excl=()
  while [ "$j" -lt "${#dirs[@]}" ]; do
    case "${dirs[j]}" in
      "$1"/*) excl+=(--exclude "/${dirs[j]#"$1"/}/") ;;
    esac
    j=$((j + 4))
  done
}
to_host() { nested "$1"; rsync "${rsync_opts[@]}" --delete "${excl[@]}" -s -e "$rsh" "$1/" "$ssh_host:$2/"; }
from_host() { nested "$2"; rsync "${rsync_opts[@]}" "${excl[@]}" -s -e "$rsh" "$ssh_host:$1/" "$2/"; }

mkdirs=("$remote/scripts" "$remote/out" "$remote/env")
# @PRIVILEGED_NESTED@ begin
# The Task's PRIVILEGED_NESTED=true ("only with remote VMs", as here): the build nests
# containers (RUN gets every capability, /dev/fuse, no SELinux label), so the builder
# runs privileged, with /var/tmp on the host's disk rather than in the container's
# overlay (image-mode tools keep caches there that need a real file system).
privileged_nested=no
if [ "${MPC_PRIVILEGED_NESTED:-}" = true ]; then
  privileged_nested=yes
  mkdirs+=("$remote/var-tmp")
fi
# @PRIVILEGED_NESTED@ end
i=0
while [ "$i" -lt "${#dirs[@]}" ]; do
  mkdirs+=("$remote/${dirs[i+1]}")
  i=$((i + 4))
done
# With the namespace's layer cache, the writable workspaces (and /workspace) live in it:
# the last build's copy there is rsync's basis, so only what changed crosses. $remote
# links to them; volumes and results stay this build's own (and go after it).
links=""
i=0
while [ -n "$cache_dir" ] && [ "$i" -lt "${#dirs[@]}" ]; do
  case "${dirs[i+1]}:${dirs[i+2]}" in
    workspace:rw | workspaces/*:rw)
      kept="$cache_dir/inputs/${dirs[i+1]}" link="$remote/${dirs[i+1]}"
      links+=" && mkdir -p $(q "$kept") && rmdir $(q "$link") && ln -s $(q "$kept") $(q "$link")" ;;
  esac
  i=$((i + 4))
done
# shellcheck disable=SC2029 # expanded here on purpose, each word quoted for the remote shell
ssh "${ssh_opts[@]}" "$ssh_host" "rm -rf $(q "$remote") && mkdir -p$(printf ' %q' "${mkdirs[@]}")$links"

mkdir -p "$work/scripts"
cp "$work/build" "$work/scripts/build"
cat > "$work/scripts/run" <<'MPC_RUNNER_EOF'
@RUNNER@
MPC_RUNNER_EOF
cat > "$work/scripts/host.sh" <<'MPC_HOST_EOF'
@HOST_SCRIPT@
MPC_HOST_EOF
chmod 0755 "$work/scripts/run" "$work/scripts/build"

# The builder container: same image, user, working directory, env, mount paths and args.
run_opts=(--user "$(id -u):$(id -g)" --workdir "$PWD"
  -v "$remote/scripts:/mpc/scripts:ro,Z" -v "$remote/out:/mpc/out:Z")
@PODMAN_OPTS@
# @PRIVILEGED_NESTED@ begin
if [ "$privileged_nested" = yes ]; then
  echo "mpc: PRIVILEGED_NESTED=true: the build runs privileged on the host, /var/tmp bind-mounted from $remote/var-tmp" >&2
  run_opts+=(--privileged -v "$remote/var-tmp:/var/tmp:z")
fi
# @PRIVILEGED_NESTED@ end

# Registry credentials stay in this pod. The build host pulls from the
# registries the pod has credentials for through a pull-only proxy running
# here (it answers the registries' challenges itself), on a port forwarded
# back over this SSH connection: the one listen the build key's
# authorized_keys allows (permitlisten). The builder container finds it
# through a registries.conf mirror (with a random path only this build
# knows), in the host's network namespace where that port listens.
if [ -s "$ssh_dir/registry-port" ]; then
  registry_port="$(cat "$ssh_dir/registry-port")"
  if command -v python3 >/dev/null 2>&1; then
    mkdir -m 0700 "$work/proxy"
    cat > "$work/registry-proxy.py" <<'MPC_PROXY_EOF'
@REGISTRY_PROXY@
MPC_PROXY_EOF
    python3 "$work/registry-proxy.py" "$work/proxy" "$registry_port" </dev/null &
    proxy_pid=$!
    n=0
    while [ ! -f "$work/proxy/port" ] && [ ! -f "$work/proxy/none" ] && kill -0 "$proxy_pid" 2>/dev/null \
      && [ "$n" -lt 300 ]; do
      sleep 0.1
      n=$((n + 1))
    done
    if [ -f "$work/proxy/port" ]; then
      if ssh "${ssh_opts[@]}" -o ExitOnForwardFailure=yes -O forward \
        -R "127.0.0.1:$registry_port:127.0.0.1:$(cat "$work/proxy/port")" "$ssh_host"; then
        cp "$work/proxy/registries.conf" "$work/scripts/registries.conf"
        run_opts+=(--network host
          -v "$remote/scripts/registries.conf:/etc/containers/registries.conf.d/zz-mpc-pod-registries.conf:ro,Z")
      else
        echo "mpc: warning: the build host refused to forward port $registry_port; pulls that need the pod's registry credentials will fail" >&2
      fi
    elif [ ! -f "$work/proxy/none" ]; then
      echo "mpc: warning: the registry proxy did not start; pulls that need the pod's registry credentials will fail" >&2
    fi
  else
    echo "mpc: warning: no python3 in the step image, so no registry proxy: pulls that need the pod's registry credentials will fail (they never go to the host)" >&2
  fi
fi
# The env reaches podman in a file (--env-file) that only the build user and
# root can read, never on a command line: every user of the host can read
# every process's command line. One NAME=value a line, the value verbatim;
# a value with a newline or carriage return cannot be one line, so it goes
# escaped for printf %b and listed in MPC_ENV_ESCAPED (the runner decodes it).
mkdir -m 0700 "$work/env"
env_file="$work/env/build.env"
(umask 077 && : > "$env_file")
escaped=()
env_add() {
  local name=$1 value=$2 bs=\\ nl=$'\n' cr=$'\r'
  case "$value" in
    *"$nl"* | *"$cr"*)
      value="${value//"$bs"/"$bs$bs"}"
      value="${value//"$nl"/"${bs}n"}"
      value="${value//"$cr"/"${bs}r"}"
      escaped+=("$name") ;;
  esac
  # podman reads the file line by line, at most 64 KiB a line
  if [ "$(printf '%s=%s' "$name" "$value" | wc -c)" -gt 65535 ]; then
    echo "mpc: env $name is too long to pass to the build host (at most 64 KiB)" >&2
    return 1
  fi
  printf '%s=%s\n' "$name" "$value" >> "$env_file"
}
if [ -n "${HOME:-}" ]; then env_add HOME "$HOME"; fi
@FORWARD_ENV@
if [ -n "${@IMAGE_VAR@:-}" ]; then env_add MPC_EXPORT_IMAGE "$@IMAGE_VAR@"; fi
if [ "${#escaped[@]}" -gt 0 ]; then env_add MPC_ENV_ESCAPED "${escaped[*]}"; fi
# builder: host: the same directories, bind-mounted (<host path> <pod path> <rw|ro> each)
binds=("$remote/scripts" /mpc/scripts ro "$remote/out" /mpc/out rw
  "$remote/storage" /var/lib/containers rw "$remote/run-containers" /run/containers rw)
# @PRIVILEGED_NESTED@ begin
if [ "$privileged_nested" = yes ]; then binds+=("$remote/var-tmp" /var/tmp rw); fi
# @PRIVILEGED_NESTED@ end
i=0
while [ "$i" -lt "${#dirs[@]}" ]; do
  opt="${dirs[i+2]},Z"
  run_opts+=(-v "$remote/${dirs[i+1]}:${dirs[i]}:${opt/rw,/}")
  binds+=("$remote/${dirs[i+1]}" "${dirs[i]}" "${dirs[i+2]}")
  i=$((i + 4))
done
{
  printf 'BUILD_DIR=%q\n' "$remote"
  printf 'BUILDER=%q\n' "$builder"
  printf 'BUILDER_IMAGE=%q\n' "$MPC_BUILDER_IMAGE"
  printf 'CACHE_DIR=%q\n' "$cache_dir"
  printf 'WORKDIR=%q\n' "$PWD"
  printf 'RUN_OPTS=('; printf ' %q' "${run_opts[@]}"; printf ' )\n'
  printf 'BINDS=('; printf ' %q' "${binds[@]}"; printf ' )\n'
  printf 'ARGS=('; printf ' %q' "$@"; printf ' )\n'
} > "$work/scripts/params.sh"
# what comes back anyway: an OCI layout of the image the build left there is not sent twice
i=0
while [ "$i" -lt "${#dirs[@]}" ]; do
  if [ "${dirs[i+3]}" = yes ]; then printf '%s\n' "${dirs[i]}"; fi
  i=$((i + 4))
done > "$work/scripts/back-dirs"

echo "mpc: copying the build's inputs to $ssh_host" >&2
to_host "$work/scripts" "$remote/scripts"
to_host "$work/env" "$remote/env"
i=0
while [ "$i" -lt "${#dirs[@]}" ]; do
  to_host "${dirs[i]}" "$remote/${dirs[i+1]}"
  i=$((i + 4))
done

if [ "$builder" = host ]; then
  echo "mpc: building on $ssh_host as root on the host (builder: host), not in $MPC_BUILDER_IMAGE" >&2
else
  echo "mpc: building on $ssh_host in $MPC_BUILDER_IMAGE" >&2
fi
# shellcheck disable=SC2029 # one quoted word for the remote shell
ssh "${ssh_opts[@]}" "$ssh_host" "bash $(q "$remote/scripts/host.sh")" </dev/null

echo "mpc: copying the results back from $ssh_host" >&2
i=0
while [ "$i" -lt "${#dirs[@]}" ]; do
  if [ "${dirs[i+3]}" = yes ]; then from_host "$remote/${dirs[i+1]}" "${dirs[i]}"; fi
  i=$((i + 4))
done
mkdir -p "$work/out"
from_host "$remote/out" "$work/out"
# @IMAGE_LOAD@ begin
storage=()
if [ -n "${STORAGE_DRIVER:-}" ]; then storage=(--storage-driver "$STORAGE_DRIVER"); fi
if [ -f "$work/out/image.layout" ]; then
  # the build wrote the image as an OCI layout into a directory that came back above
  layout="$(cat "$work/out/image.layout")"
  id="$(buildah "${storage[@]}" pull -q "oci:$layout:$@IMAGE_VAR@")"
  buildah "${storage[@]}" tag "$id" "$@IMAGE_VAR@"
  echo "mpc: loaded $@IMAGE_VAR@ ($id) built on $ssh_host, from the OCI layout $layout" >&2
elif [ -f "$work/out/image.docker.tar" ]; then
  # a Docker-format image, as a docker archive: it stays Docker-format here too
  id="$(buildah "${storage[@]}" pull -q "docker-archive:$work/out/image.docker.tar")"
  buildah "${storage[@]}" tag "$id" "$@IMAGE_VAR@"
  echo "mpc: loaded $@IMAGE_VAR@ ($id, Docker format) built on $ssh_host" >&2
elif [ -f "$work/out/image.tar" ]; then
  id="$(buildah "${storage[@]}" pull -q "oci-archive:$work/out/image.tar")"
  buildah "${storage[@]}" tag "$id" "$@IMAGE_VAR@"
  echo "mpc: loaded $@IMAGE_VAR@ ($id) built on $ssh_host" >&2
fi
if [ -s "$work/out/containers" ]; then
  # The build left working containers of the image mounted, and files naming their
  # host paths: the pod gets the same containers (same names), mounted here, and
  # the files that came back name the pod's paths instead.
  while IFS=$'\t' read -r cname cpath; do
    buildah "${storage[@]}" rm "$cname" >/dev/null 2>&1 || true
    buildah "${storage[@]}" from --name "$cname" --pull-never "$@IMAGE_VAR@" >/dev/null
    pod_path="$(buildah "${storage[@]}" mount "$cname")"
    i=0
    while [ "$i" -lt "${#dirs[@]}" ]; do
      if [ "${dirs[i+3]}" = yes ]; then
        { grep -rlF -- "$cpath" "${dirs[i]}" 2>/dev/null || :; } | while IFS= read -r f; do
          content="$(cat "$f"; printf x)"
          content="${content%x}"
          printf '%s' "${content//"$cpath"/"$pod_path"}" > "$f"
        done
      fi
      i=$((i + 4))
    done
    echo "mpc: working container $cname of $@IMAGE_VAR@ mounted at $pod_path (on $ssh_host: $cpath)" >&2
  done < "$work/out/containers"
fi
# @IMAGE_LOAD@ end
# shellcheck disable=SC2029
ssh "${ssh_opts[@]}" "$ssh_host" "rm -rf $(q "$remote")" || true
