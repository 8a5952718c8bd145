"""Metrics: PSNR, SSIM, LPIPS, FID and FVD, per batch and over a split.

Owns the metric functions and the reconstruction evaluator of a training job (``evaluate``),
the pixel conversions (``pixel_metrics``), the feature networks loaded from user-supplied
weight files (``inception``, ``fvd``, ``features``), Frechet distances (``frechet``), the
feature actor pool of generation metrics (``feature_pool``), and the reconstruction and
sample images logged beside the numbers (``artifacts``).

Imports: the root modules, ``data`` (the clips to score) and ``tracking`` (the logger that
stores images); never ``training`` or ``study``.
"""
