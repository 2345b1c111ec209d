"""The benchmarks reuse the fixtures of the tiers they measure."""
from tests.generator.conftest import build_host, pod_rootfs  # noqa: F401
from tests.provisioning.conftest import controller  # noqa: F401
