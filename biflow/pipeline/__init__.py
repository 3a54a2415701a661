"""The experiment platform: the BiFlow experiment as a cached DAG of steps on Ray, tracked in MLflow.

    spec         PipelineConfig (experiment sections + `pipeline:`), load_pipeline, storage/tracking resolution
    cache        step keys, the storage root (local or pyarrow.fs), atomic publishing, done records, locks
    codeset      which sources a step's result depends on (derived from its run function's imports)
    steps        prepare -> [latent] -> train_forward -> train_reverse -> evaluate -> report: what each declares and does
    context      StepContext: what a step function receives, and how it finds its inputs and training data
    evaluation   the evaluate and report steps
    raytrain     the Ray glue of stage training: in-process or on Ray Train (TorchTrainer, DDP, Ray Data)
    tracking     MLflow parent/child runs, batched metrics, images, figures, artifacts, the model registry
    ray_session  connecting to Ray (or starting a local one), GPU checks
    runner       plan (cache lookup) and run_pipeline (Ray tasks in dependency order)
"""
