"""Running biflow on a Ray cluster: job submission, token auth, shared storage.

    auth       Ray 2.60 token authentication as the CLI sees it: where the token comes from, how it is sent
    dashboard  the head's HTTP API (jobs, nodes, tasks) behind one client with one-line errors
    jobs       the runtime environment of a submitted job, following its logs, its exit status
    storage    storage locations (`is_uri`) and the multi-node checks: a root and a tracking store every node reaches

The loopback cluster the tests start (a real multi-node Ray and an MLflow server on 127.0.0.1) is test
infrastructure: tests/support/local_cluster.py (`python -m tests.support.local_cluster --workers 1`).

`biflow submit` (biflow/commands/submit.py) is the command line over `dashboard` and `jobs`;
docs/CLUSTER.md is the walk-through (docker compose, submission, MLflow UI, KubeRay, cloud launcher).
"""
