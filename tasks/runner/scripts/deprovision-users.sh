# Runs on the build host as the admin user (bash -s over one SSH connection).
# Inputs (assigned above this line by the runner, each shell-quoted):
#   BUILD_USERS      space-separated u-<24 hex> names to remove (already validated)
#   CONTAINER_LABEL  the label buildah-remote puts on the containers it runs
#                    (its value: the build user)
#   CACHE_ROOT       where namespaces' layer caches live (provision-user.sh)
#   HOST_BUILDER_COMMAND  the command a `builder: host` build runs as root
#                    through its sudo rule (unshare, with a PID namespace)
# A missing user is success: deprovisioning is idempotent.
#
# Everything of a build goes, in this order: no new logins; every process
# running under the user's uid or one of its subordinate uids; the root PID
# namespaces of its `builder: host` builds; the containers it started
# through `sudo podman`; then the user with its home, its
# /etc/subuid and /etc/subgid entries, its sudoers and limits files and what
# it left in /tmp, /var/tmp and /dev/shm. The uid and the subordinate range go
# to the next build user: nothing of this one may still run or lie there.
set -euo pipefail

fail() { echo "mpc: $*" >&2; exit 1; }

# Retried: useradd/usermod/userdel take the passwd lock, and concurrent builds
# on a host collide on it.
retry() {
  for _ in 1 2 3 4 5 6 7 8; do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep "0.$((RANDOM % 9 + 1))"
  done
  "$@" >/dev/null
}

# "first last" uid ranges of a user: its own uid and its subordinate uids
# (/etc/subuid lines name:first:count, or uid:first:count).
uid_ranges() {
  local user=$1 uid=$2
  echo "$uid $uid"
  if [ -r /etc/subuid ]; then
    # never a range with uid 0 in it, whatever the file says
    awk -F: -v u="$user" -v n="$uid" '($1 == u || $1 == n) && $2 > 0 && $3 > 0 { print $2, $2 + $3 - 1 }' \
      /etc/subuid
  fi
}

# Processes any of whose uids (real, effective, saved, filesystem) lies in one
# of the ranges. Why uids and not a cgroup: whatever a build user starts runs
# under its uid or, in a user namespace (rootless podman, `podman unshare`),
# under its subordinate uids and can get out of neither (a setuid program
# keeps the real uid); that holds on every host, with or without systemd,
# where rootless podman with cgroupfs gets no cgroup of its own, and it finds
# processes that left the login session. Zombies are dead already.
pids_in() {
  local ranges=$1
  { grep -s -H -E '^(State|Uid):' /proc/[0-9]*/status || true; } | awk -v ranges="$ranges" '
    BEGIN { FS = "[:\t ]+"; n = split(ranges, r, " ") }
    { split($1, p, "/"); pid = p[3] }
    $2 == "State" { dead[pid] = ($3 == "Z" || $3 == "X"); next }
    $2 == "Uid" {
      for (i = 3; i <= 6; i++)
        for (j = 1; j < n; j += 2)
          if ($i + 0 >= r[j] + 0 && $i + 0 <= r[j + 1] + 0) mine[pid] = 1
    }
    END { for (pid in mine) if (!dead[pid]) print pid }'
}

kill_all() {
  local user=$1 ranges=$2 pids
  for _ in $(seq 1 50); do
    pids="$(pids_in "$ranges")"
    [ -n "$pids" ] || return 0
    # shellcheck disable=SC2086 # one pid a word
    sudo -n kill -KILL $pids 2>/dev/null || true
    sleep 0.1
  done
  pids="$(pids_in "$ranges")"
  [ -z "$pids" ] || fail "processes of $user still run after 50 rounds of SIGKILL: ${pids//$'\n'/ }"
}

# A `builder: host` build runs as root through the user's sudo rule, in a PID
# namespace whose unshare (--kill-child) takes every process in it along when it
# dies. Those unshares are found by what sudo put into their environment, which
# only this user's sudo invocations carry: SUDO_USER=<user>, and the command.
# They and their children (each namespace's first process) are killed, and gone
# (or zombies: a namespace's first process is one only once the kernel has
# killed the rest) before the user is.
host_build_pids() {
  local files
  files="$(sudo -n grep -s -l -z -x -F "SUDO_USER=$1" /proc/[0-9]*/environ || true)"
  [ -n "$files" ] || return 0
  # shellcheck disable=SC2086 # one file a word
  { sudo -n grep -s -l -z -E "^SUDO_COMMAND=$HOST_BUILDER_COMMAND( |\$)" $files || true; } | cut -d/ -f3
}

kill_host_builds() {
  local user=$1 pids tree alive pid state
  for _ in $(seq 1 50); do
    pids="$(host_build_pids "$user")"
    [ -n "$pids" ] || return 0
    # with their children: the PPid lines of /proc
    tree="$({ grep -s -H '^PPid:' /proc/[0-9]*/status || true; } | awk -v pids="$pids" '
      BEGIN { n = split(pids, p, "\n"); for (i = 1; i <= n; i++) { want[p[i]] = 1; print p[i] } }
      { split($1, f, "/"); if ($2 in want) print f[3] }')"
    # shellcheck disable=SC2086 # one pid a word
    sudo -n kill -KILL $tree 2>/dev/null || true
    for _ in $(seq 1 100); do
      alive=""
      for pid in $tree; do
        state="$(awk '$1 == "State:" { print $2 }' "/proc/$pid/status" 2>/dev/null || true)"
        case "$state" in "" | Z | X) ;; *) alive=1 ;; esac
      done
      [ -n "$alive" ] || break
      sleep 0.1
    done
  done
  fail "root processes of $user's host builds still run after 50 rounds of SIGKILL: ${pids//$'\n'/ }"
}

# Containers the user ran as root through a sudo rule: buildah-remote labels
# them with the user. (A user allowed `sudo podman` is root on the host; the
# label finds what mpc's own build ran, not what such a user could hide.)
remove_containers() {
  local user=$1 ids
  command -v podman >/dev/null 2>&1 || return 0
  for _ in 1 2 3; do
    ids="$(sudo -n podman ps -a -q --filter "label=$CONTAINER_LABEL=$user")" ||
      fail "cannot list root's podman containers on $(hostname)"
    [ -n "$ids" ] || return 0
    # shellcheck disable=SC2086 # one id a word
    sudo -n podman rm -f -v -t 0 $ids >/dev/null 2>&1 || true
  done
  ids="$(sudo -n podman ps -a -q --filter "label=$CONTAINER_LABEL=$user")"
  [ -z "$ids" ] || fail "containers of $user could not be removed: ${ids//$'\n'/ }"
}

# find's -uid for one "first last" range
uid_test() {
  if [ "$1" = "$2" ]; then echo "-uid $1"; else echo "-uid +$(($1 - 1)) -uid -$(($2 + 1))"; fi
}

# The namespace's layer cache this user had (provision-user.sh) goes back to its place,
# once nothing of the user runs: one rename, which fails when another build of the
# namespace returned one meanwhile (then this one goes). Nothing else of the build
# stays: the workspace copies in it are the next build's basis, in the same cache.
return_cache() {
  local held="$CACHE_ROOT/held/$1" key
  sudo -n test -d "$held" || return 0
  key="$(sudo -n cat "$held/key" 2>/dev/null || true)"
  case "$key" in
    n-[0-9a-f]*)
      if sudo -n test -d "$CACHE_ROOT/ns/$key" && sudo -n test -s "$held/owner" \
        && sudo -n mv -T "$held" "$CACHE_ROOT/ns/$key/cache" 2>/dev/null; then
        return 0
      fi ;;
  esac
  sudo -n rm -rf "$held"
}

remove_leftovers() {
  local ranges=$1 expr=() first last
  while read -r first last; do
    [ "${#expr[@]}" = 0 ] || expr+=(-o)
    # shellcheck disable=SC2207 # -uid N or -uid +A -uid -B
    expr+=(\( $(uid_test "$first" "$last") \))
  done <<< "$ranges"
  sudo -n find /tmp /var/tmp /dev/shm -xdev -mindepth 1 \( "${expr[@]}" \) -delete 2>/dev/null || true
}

for user in $BUILD_USERS; do
  case "$user" in u-[0-9a-f]*) ;; *) echo "mpc: refusing to remove $user" >&2; exit 2 ;; esac
  if uid="$(id -u "$user" 2>/dev/null)"; then
    # read before userdel drops the entries
    ranges="$(uid_ranges "$user" "$uid")"
    # no new logins while its processes go (sshd refuses expired accounts)
    retry sudo -n usermod --expiredate 1 "$user"
    kill_all "$user" "$ranges"
    kill_host_builds "$user"
    remove_containers "$user"
    kill_all "$user" "$ranges"
    retry sudo -n userdel --force --remove "$user" || true
    if id -u "$user" >/dev/null 2>&1; then
      fail "could not delete $user"
    fi
    if grep -s -q "^$user:" /etc/subuid /etc/subgid; then
      fail "userdel left the /etc/subuid or /etc/subgid entries of $user"
    fi
    return_cache "$user"
    remove_leftovers "$ranges"
  else
    kill_host_builds "$user"
    remove_containers "$user"
    return_cache "$user"
  fi
  sudo -n rm -f "/etc/sudoers.d/mpc-$user" "/etc/security/limits.d/mpc-$user.conf"
  printf 'MPC_REMOVED=%s\n' "$user"
done
