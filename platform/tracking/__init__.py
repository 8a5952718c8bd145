"""Tracking: MLflow runs and everything that reaches the server.

Owns ``TrackingConfig`` and ``owned_run`` (``runs``), the client and its retries
(``tracking_client``), the queued, spooled logger of a run (``run_logger``, ``tracking_spool``,
``system_metrics``) and the command that sends what a dead logger left
(``python -m vitok.platform.tracking replay``, ``spool_cli``).

Imports: the platform's root modules (``config``, ``storage``) only; ``metrics``,
``training`` and ``study`` import it.
"""
