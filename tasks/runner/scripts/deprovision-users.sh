# Runs on the build host as the admin user (bash -s over one SSH connection).
# Inputs (assigned above this line by the runner, each shell-quoted):
#   BUILD_USERS  space-separated u-<24 hex> names to remove (already validated)
# A missing user is success: deprovisioning is idempotent.
set -euo pipefail

for user in $BUILD_USERS; do
  case "$user" in u-[0-9a-f]*) ;; *) echo "mpc: refusing to remove $user" >&2; exit 2 ;; esac
  if id -u "$user" >/dev/null 2>&1; then
    # userdel fails while the user still runs processes: kill them all first.
    for _ in 1 2 3 4 5 6 7 8 9 10; do
      sudo -n pkill -KILL -u "$user" || true
      pgrep -u "$user" >/dev/null || break
      sleep 0.2
    done
    # userdel takes the passwd lock (concurrent builds collide on it) and warns
    # about a missing mail spool: retry until the user is really gone.
    for _ in 1 2 3 4 5 6 7 8; do
      sudo -n userdel --force --remove "$user" >/dev/null 2>&1 || true
      id -u "$user" >/dev/null 2>&1 || break
      sleep "0.$((RANDOM % 9 + 1))"
    done
    if id -u "$user" >/dev/null 2>&1; then
      echo "mpc: could not delete $user" >&2
      exit 1
    fi
  fi
  sudo -n rm -f "/etc/sudoers.d/mpc-$user" "/etc/security/limits.d/mpc-$user.conf"
  printf 'MPC_REMOVED=%s\n' "$user"
done
