"""Training: one Ray Train + DeepSpeed worker loop for every stage.

Owns what a stage is made of (``config``: ``TrainConfig``, the ``Task`` protocol,
``TrainJob``), its optimizers and engines (``engines``), the driver (``train``:
``run_training``), the loop in named pieces (``train_loop``, ``train_metrics``), a worker's
share of the data (``train_data``), checkpoints and weights (``checkpoints``, ``weights``).
``train`` is the package's front door.

Imports: the root modules, ``data`` (the read path) and ``tracking`` (the run a worker logs
to); never ``metrics`` (a job gets its evaluator from the pipeline) or ``study``.
"""
