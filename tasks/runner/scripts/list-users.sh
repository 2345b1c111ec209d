# Runs on the build host as the admin user: prints the mpc build users present, one a
# line, and the namespaces' layer caches (CACHE_ROOT/ns/<key>, provision-user.sh) as
# MPC_CACHE=<key> <namespace> lines.
set -euo pipefail
getent passwd | cut -d: -f1 | grep -E '^u-[0-9a-f]{24}$' || true
if sudo -n test -d "$CACHE_ROOT/ns"; then
  for key in $(sudo -n ls "$CACHE_ROOT/ns"); do
    case "$key" in n-[0-9a-f]*) ;; *) continue ;; esac
    printf 'MPC_CACHE=%s %s\n' "$key" "$(sudo -n head -n 1 "$CACHE_ROOT/ns/$key/namespace" 2>/dev/null || true)"
  done
fi
