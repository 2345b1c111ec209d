# Runs on the build host as the admin user: prints the mpc build users present.
set -euo pipefail
getent passwd | cut -d: -f1 | grep -E '^u-[0-9a-f]{24}$' || true
