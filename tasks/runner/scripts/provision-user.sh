# Runs on the build host as the admin user (bash -s over one SSH connection).
# Inputs (assigned above this line by the runner, each shell-quoted):
#   BUILD_USER   u-<24 hex>, the build's user
#   PUBLIC_KEY   the build key's public half (generated in the pod)
#   SUDO_RULE    "" or the sudoers command list for this user
#   LIMIT_LINES  "" or pam_limits lines for this user
#   REGISTRY_PORT "" or the one loopback port the key may listen on (ssh -R), for
#                buildah-remote's registry proxy (credentials stay in the pod)
#   CACHE_KEY    "" or n-<24 hex>: the build's namespace has a layer cache (the pool's
#                layerCache); CACHE_ROOT is where caches live, CACHE_NAMESPACE its name
#
# The user must not exist yet: provisioning never writes into a home that a
# build user has had its hands on (a symlink planted there, ~/.ssh -> /etc or
# authorized_keys -> /etc/shadow, would turn root's writes into the user's).
# The home is made by root, stays root's while root fills it, and is handed
# over (chown -hR, which follows no symlink) as the last step. Mode 0700: the
# other build users on the host cannot look into it.
set -euo pipefail

where="$(hostname 2>/dev/null || echo "this host")"
fail() { echo "mpc: $*" >&2; exit 1; }

if id -u "$BUILD_USER" >/dev/null 2>&1; then
  fail "user $BUILD_USER already exists on $where; refusing to provision it again" \
    "(deprovision it first)"
fi
base="$(sudo -n useradd -D | sed -n 's/^HOME=//p')"
home="${base:-/home}/$BUILD_USER"
if [ -e "$home" ] || [ -L "$home" ]; then
  fail "$home already exists on $where but user $BUILD_USER does not; refusing to" \
    "provision over it (the host admin should remove it)"
fi

# useradd takes the passwd lock; concurrent builds on a host collide on it
# (exit 1 or 10). Exit 9 is "name in use": another provisioning got there first.
rc=0
for _ in 1 2 3 4 5 6 7 8 9; do
  rc=0
  sudo -n useradd --no-create-home --home-dir "$home" --shell /bin/bash \
    --comment "mpc build user" "$BUILD_USER" || rc=$?
  case "$rc" in 0 | 9) break ;; esac
  sleep "0.$((RANDOM % 9 + 1))"
done
if [ "$rc" = 9 ]; then
  fail "user $BUILD_USER already exists on $where; refusing to provision it again"
fi
[ "$rc" = 0 ] || fail "could not create user $BUILD_USER on $where (useradd exit $rc)"

# mkdir (no -p) fails on anything already there, a symlink included; then the
# user goes again, without --remove: that home is not ours to delete.
if ! sudo -n mkdir -m 0700 "$home"; then
  sudo -n userdel "$BUILD_USER" >/dev/null 2>&1 || true
  fail "$home appeared on $where while user $BUILD_USER was being created; refusing to use it"
fi
sudo -n cp -R --preserve=mode --no-dereference /etc/skel/. "$home/"
sudo -n chmod 0700 "$home"    # copying skel/. gave it skel's mode
sudo -n mkdir -m 0700 "$home/.ssh"
# restrict: no agent, X11 or port forwarding, no pty, no ~/.ssh/rc. With REGISTRY_PORT,
# forwarding comes back for exactly one remote listen, 127.0.0.1:REGISTRY_PORT
# (permitlisten); local forwards (-L, -W) may only open 255.255.255.255:1, which
# never connects. (OpenSSH has no per-key option for remote Unix-socket listens; a
# host admin who wants none sets AllowStreamLocalForwarding no in sshd_config.)
options=restrict
if [ -n "${REGISTRY_PORT:-}" ]; then
  case "$REGISTRY_PORT" in *[!0-9]*) fail "REGISTRY_PORT is not a port: $REGISTRY_PORT" ;; esac
  options+=",port-forwarding,permitlisten=\"127.0.0.1:$REGISTRY_PORT\",permitopen=\"255.255.255.255:1\""
fi
printf '%s %s\n' "$options" "$PUBLIC_KEY" | sudo -n tee "$home/.ssh/authorized_keys" >/dev/null
sudo -n chmod 0600 "$home/.ssh/authorized_keys"
sudo -n chown -hR "$BUILD_USER:" "$home"

sudoers="/etc/sudoers.d/mpc-$BUILD_USER"
if [ -n "$SUDO_RULE" ]; then
  tmp="$(mktemp)"
  printf '%s ALL=(root) NOPASSWD: %s\n' "$BUILD_USER" "$SUDO_RULE" > "$tmp"
  sudo -n visudo -cqf "$tmp"
  sudo -n install -m 0440 -o root -g root "$tmp" "$sudoers"
  rm -f "$tmp"
else
  sudo -n rm -f "$sudoers"
fi

limits="/etc/security/limits.d/mpc-$BUILD_USER.conf"
if [ -n "$LIMIT_LINES" ]; then
  printf '%s\n' "$LIMIT_LINES" | sudo -n tee "$limits" >/dev/null
  sudo -n chmod 0644 "$limits"
else
  sudo -n rm -f "$limits"
fi

# The namespace's layer cache (docs/layer-cache.md), handed to this build user alone.
# At rest it is CACHE_ROOT/ns/<key>/cache (root's, mode 0700 all the way down to it):
# owner (the id ranges of the build user that last had it), key and data/ (the
# storage and workspace copies). Taking it is one rename to CACHE_ROOT/held/<user>,
# so of concurrent builds of the namespace exactly one gets it; the others get an
# empty one of their own. held/<user> stays root's (the user cannot swap key or
# owner, nor the data directory for a link); data/ is the user's, mode 0700.
# deprovision-users.sh renames it back once every process of the user is gone.
id_ranges() {   # "<uid> <gid> <subuid first> <subuid count> <subgid first> <subgid count>"
  local u g su sg
  u="$(id -u "$BUILD_USER")" g="$(id -g "$BUILD_USER")"
  su="$(awk -F: -v u="$BUILD_USER" -v n="$u" '$1 == u || $1 == n { print $2, $3; exit }' /etc/subuid 2>/dev/null)"
  sg="$(awk -F: -v u="$BUILD_USER" -v n="$u" '$1 == u || $1 == n { print $2, $3; exit }' /etc/subgid 2>/dev/null)"
  echo "$u $g ${su:-0 0} ${sg:-0 0}"
}
# Gives every file of $1 owned by the old ranges ($2) the same place in the new ones ($3):
# one listing first, then chown per target owner, so overlapping ranges never map twice.
# chown clears setuid/setgid bits: they are noted before and set again after.
remap() {
  local dir=$1 tmp rec u g p nu ng
  local -a o n
  read -r -a o <<< "$2"
  read -r -a n <<< "$3"
  if [ "${o[3]}" -gt "${n[3]}" ] || [ "${o[5]}" -gt "${n[5]}" ]; then return 1; fi
  map_id() {   # id old_own new_own old_first new_first count -> $mapped ("" when foreign)
    mapped=""
    if [ "$1" = "$2" ]; then mapped=$3
    elif [ "$6" -gt 0 ] && [ "$1" -ge "$4" ] && [ "$1" -lt $(($4 + $6)) ]; then mapped=$(($1 - $4 + $5))
    fi
  }
  tmp="$(mktemp -d)" || return 1
  cat > "$tmp/modes" < <(sudo -n find "$dir" -xdev -type f -perm /6000 -printf '%m:%p\0')
  while IFS= read -r -d '' rec; do
    u=${rec%%:*} rec=${rec#*:}
    g=${rec%%:*} p=${rec#*:}
    map_id "$u" "${o[0]}" "${n[0]}" "${o[2]}" "${n[2]}" "${o[3]}"
    nu=$mapped
    map_id "$g" "${o[1]}" "${n[1]}" "${o[4]}" "${n[4]}" "${o[5]}"
    ng=$mapped
    if [ -z "$nu" ] || [ -z "$ng" ]; then rm -rf "$tmp"; return 1; fi
    if [ "$nu:$ng" != "$u:$g" ]; then printf '%s\0' "$p" >> "$tmp/to-$nu:$ng"; fi
  done < <(sudo -n find "$dir" -xdev -printf '%U:%G:%p\0')
  # (called in a condition, where set -e does not apply: every failure returns)
  for p in "$tmp"/to-*; do
    if [ -f "$p" ] && ! xargs -0 -r sudo -n chown -h "${p##*/to-}" < "$p"; then
      rm -rf "$tmp"
      return 1
    fi
  done
  while IFS= read -r -d '' rec; do
    sudo -n chmod "${rec%%:*}" "${rec#*:}" || { rm -rf "$tmp"; return 1; }
  done < "$tmp/modes"
  rm -rf "$tmp"
}
if [ -n "${CACHE_KEY:-}" ]; then
  case "$CACHE_KEY" in n-[0-9a-f]*) ;; *) fail "not a cache key: $CACHE_KEY" ;; esac
  case "$CACHE_ROOT" in /*) ;; *) fail "CACHE_ROOT is not an absolute path: $CACHE_ROOT" ;; esac
  sudo -n install -d -m 0711 -o root -g root "$CACHE_ROOT" "$CACHE_ROOT/held"
  sudo -n install -d -m 0700 -o root -g root "$CACHE_ROOT/ns"
  held="$CACHE_ROOT/held/$BUILD_USER"
  sudo -n rm -rf "$held"      # a user of that name existed before (refused above) or never
  sudo -n install -d -m 0700 -o root -g root "$CACHE_ROOT/ns/$CACHE_KEY"
  printf '%s\n' "${CACHE_NAMESPACE:-}" | sudo -n tee "$CACHE_ROOT/ns/$CACHE_KEY/namespace" >/dev/null
  mine="$(id_ranges)"
  cache=cold
  if sudo -n mv -T "$CACHE_ROOT/ns/$CACHE_KEY/cache" "$held" 2>/dev/null; then
    if [ "$(sudo -n cat "$held/key" 2>/dev/null)" = "$CACHE_KEY" ] && sudo -n test -d "$held/data" \
      && remap "$held/data" "$(sudo -n cat "$held/owner")" "$mine"; then
      cache=warm
    else
      sudo -n rm -rf "$held"
    fi
  fi
  if [ "$cache" = cold ]; then
    sudo -n install -d -m 0711 -o root -g root "$held"
    sudo -n install -d -m 0700 -o "$BUILD_USER" -g "$(id -g "$BUILD_USER")" "$held/data"
    printf '%s\n' "$CACHE_KEY" | sudo -n tee "$held/key" >/dev/null
  fi
  sudo -n chmod 0711 "$held"
  sudo -n chmod 0700 "$held/data"
  printf '%s\n' "$mine" | sudo -n tee "$held/owner" >/dev/null
  sudo -n chmod 0600 "$held/key" "$held/owner"
  printf 'MPC_CACHE_DIR=%s\n' "$held/data"
  printf 'MPC_CACHE=%s\n' "$cache"
fi

printf 'MPC_USER_DIR=%s\n' "$home"
