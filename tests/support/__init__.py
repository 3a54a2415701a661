"""Test infrastructure that is not part of the biflow package.

    local_cluster  a real multi-node Ray cluster and an MLflow server on loopback addresses (LocalCluster);
                   `python -m tests.support.local_cluster --workers 1` starts one by hand
    processes      free ports, the process groups of the cluster's nodes, waiting for HTTP services

Importable as `tests.support.*` (pyproject's `[tool.pytest.ini_options] pythonpath` puts the repository root on
sys.path for pytest; `python -m` from the repository root does so by itself).
"""
