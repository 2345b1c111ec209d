"""Real test infrastructure started by the tests themselves.

Each module owns one kind of real part: the Kubernetes control plane
(``controlplane``), SSH build hosts in network namespaces (``sshhosts``),
an OCI registry (``registry``). ``procs`` and ``pki`` are their helpers.
"""
