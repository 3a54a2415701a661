"""Sweeps: Ray Tune over how stage 2 is trained (and, when asked, stage 1), tracked in MLflow.

    space     the search-space file (tune_spaces/*.yaml): schema, distributions, coupled "cases", validation
              of every key and value against the experiment config before anything starts
    upstream  prepare + train_forward through the pipeline's step cache (trained once, shared by trials)
    trial     one trial: train the reverse model, report a validation metric as it goes, then FD/FID
    tracking  a Tune callback: one MLflow child run per trial under the sweep's parent run
    report    Pareto front, FD-vs-ms/image figure, trials.csv, the paper-style ablation table, best pipeline
    runner    run_sweep: resolve upstream, Tuner (or Tuner.restore), time the samplers, write the report
"""
