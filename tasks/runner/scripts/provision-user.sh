# Runs on the build host as the admin user (bash -s over one SSH connection).
# Inputs (assigned above this line by the runner, each shell-quoted):
#   BUILD_USER   u-<24 hex>, the build's user
#   PUBLIC_KEY   the build key's public half (generated in the pod)
#   SUDO_RULE    "" or the sudoers command list for this user
#   LIMIT_LINES  "" or pam_limits lines for this user
set -euo pipefail

# useradd/userdel take the passwd lock; concurrent builds on a host collide on it.
retry() {
  for _ in 1 2 3 4 5 6 7 8; do
    if "$@"; then return 0; fi
    sleep "0.$((RANDOM % 9 + 1))"
  done
  "$@"
}

if ! id -u "$BUILD_USER" >/dev/null 2>&1; then
  retry sudo -n useradd --create-home --shell /bin/bash --comment "mpc build user" "$BUILD_USER"
fi
home="$(getent passwd "$BUILD_USER" | cut -d: -f6)"
[ -n "$home" ] || { echo "mpc: user $BUILD_USER has no home directory" >&2; exit 1; }

sudo -n install -d -m 0700 -o "$BUILD_USER" -g "$BUILD_USER" "$home/.ssh"
# restrict: no agent, X11 or port forwarding, no pty, no ~/.ssh/rc
keys="$home/.ssh/authorized_keys"
printf 'restrict %s\n' "$PUBLIC_KEY" | sudo -n tee "$keys" >/dev/null
sudo -n chown "$BUILD_USER:$BUILD_USER" "$keys"
sudo -n chmod 0600 "$keys"

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
