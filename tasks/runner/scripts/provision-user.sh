# Runs on the build host as the admin user (bash -s over one SSH connection).
# Inputs (assigned above this line by the runner, each shell-quoted):
#   BUILD_USER   u-<24 hex>, the build's user
#   PUBLIC_KEY   the build key's public half (generated in the pod)
#   SUDO_RULE    "" or the sudoers command list for this user
#   LIMIT_LINES  "" or pam_limits lines for this user
#   REGISTRY_PORT "" or the one loopback port the key may listen on (ssh -R), for
#                buildah-remote's registry proxy (credentials stay in the pod)
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

printf 'MPC_USER_DIR=%s\n' "$home"
