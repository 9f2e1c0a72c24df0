"""Fixtures for the Slurm tests: a real local cluster (2 emulated nodes x 2 CPUs) for the session.

The cluster needs root (SlurmUser=root) and the Debian packages slurmctld, slurmd, slurm-client and
munge; as root they are installed with apt-get when missing. Otherwise tests that use ``slurm_cluster``
are skipped with the reason. ``SLURM_FIXTURE_ROOT`` picks the parent of the cluster directory (it must
be world-traversable: munged checks every directory of its socket path).
"""
from __future__ import annotations

import os
import shutil

import pytest

from tests.slurm.slurm_cluster import LocalSlurm, ensure_slurm_installed


@pytest.fixture(scope="session")
def slurm_cluster():
    """A started :class:`LocalSlurm` with nodes n1, n2 (2 CPUs each); stopped at the end of the session."""
    reason = ensure_slurm_installed()
    if reason is not None:
        pytest.skip(reason)
    if os.geteuid() != 0:
        pytest.skip("the local test cluster needs root (SlurmUser=root, jobs run as uid 0)")
    cluster = LocalSlurm(nodes=2, cpus_per_node=2, root=os.environ.get("SLURM_FIXTURE_ROOT"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
        if os.environ.get("SLURM_KEEP_CLUSTER_DIR") != "1":
            shutil.rmtree(cluster.base, ignore_errors=True)
