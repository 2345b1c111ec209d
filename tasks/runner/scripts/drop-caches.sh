# Runs on the build host as the admin user (bash -s over one SSH connection).
# Inputs (assigned above this line by the runner, each shell-quoted):
#   CACHE_ROOT  where the namespaces' layer caches live (provision-user.sh)
#   CACHE_KEYS  space-separated n-<24 hex> keys of caches to remove (the pool no
#               longer gives their namespace one)
# Removes the cache at rest. One a build holds now (CACHE_ROOT/held/<user>) is
# removed when that build is deprovisioned: its place is gone, so it is not returned.
set -euo pipefail
for key in $CACHE_KEYS; do
  case "$key" in n-[0-9a-f]*) ;; *) echo "mpc: refusing to remove cache $key" >&2; exit 2 ;; esac
  sudo -n rm -rf "$CACHE_ROOT/ns/$key"
  printf 'MPC_DROPPED=%s\n' "$key"
done
