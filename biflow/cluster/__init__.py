"""Running biflow on a Ray cluster: job submission, token auth, shared storage, a loopback cluster for tests.

    auth       Ray 2.60 token authentication as the CLI sees it: where the token comes from, how it is sent
    dashboard  the head's HTTP API (jobs, nodes, tasks) behind one client with one-line errors
    jobs       the runtime environment of a submitted job, following its logs, its exit status
    storage    the multi-node checks: a storage root and a tracking store every node can reach
    local      a real multi-node Ray cluster and an MLflow server on loopback addresses (tests, trying it out)

`biflow submit` (biflow/commands/submit.py) is the command line over `dashboard` and `jobs`;
docs/CLUSTER.md is the walk-through (docker compose, submission, MLflow UI, KubeRay, cloud launcher).
"""
