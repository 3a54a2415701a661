"""The experiment platform: the BiFlow experiment as a cached DAG of steps on Ray, tracked in MLflow.

    spec      PipelineConfig (experiment sections + `pipeline:`), load_pipeline, storage/tracking resolution
    cache     step keys, the storage root (local or pyarrow.fs), atomic publishing, done records, locks
    steps     prepare -> train_forward -> train_reverse -> evaluate -> report: what each declares and does
    raytrain  stage training in-process or on Ray Train (TorchTrainer, DDP, Ray Data, fault tolerance)
    tracking  MLflow parent/child runs, batched metrics, images, figures, artifacts, the model registry
    runner    plan (cache lookup) and run_pipeline (Ray tasks in dependency order)
"""
