"""Data: from source files to clips a worker trains on.

Owns the sources and their decoding (``sources``, ``media``, ``clip_decode``,
``decoder_process``, ``synthetic``), ``prepare`` and its units (``prepare``, ``ingest``,
``ingest_units``, ``progress``), the shards' layout and checks (``shard_layout``,
``shard_checks``), what a training job reads and how (``shard_splits``, ``read_plan``,
``shard_reader``), clip batches (``clips``) and latent shards (``latents``). ``config`` holds
``DataConfig`` and ``PreparedData``; ``prepare`` is the package's front door.

Imports: the platform's root modules (``config``, ``storage``, ``runtime``) and nothing else
of ``vitok.platform``; no subpackage imports it back except those that build on data
(``metrics``, ``training``, ``study``).
"""
