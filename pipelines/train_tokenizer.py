"""Train one tokenizer (stage 1, optional stage 2) on Ray Train + DeepSpeed, tracked in MLflow.

    python pipelines/train_tokenizer.py --preset tokenizer-demo
    python pipelines/train_tokenizer.py --preset smoke --set train.steps=50 --set train.zero_stage=2
    python pipelines/train_tokenizer.py --config my.yaml --data /data/UCF-101

Rerunning the same command after a crash resumes from the latest checkpoint and continues
the same MLflow run.
"""

from __future__ import annotations

import sys
import time

from vitok.pipelines.cli import config_from_args, config_parser, print_run_summary, show_config
from vitok.pipelines.tokenizer_stage import run_tokenizer
from vitok.platform.data.prepare import ensure_ray, prepare


def main(argv: list[str] | None = None) -> int:
    parser = config_parser(__doc__.split("\n")[0])
    parser.add_argument("--no-model", action="store_true", help="skip logging an MLflow model")
    args = parser.parse_args(argv)
    cfg = config_from_args(parser, args, "tokenizer-demo")
    if show_config(args, cfg):
        return 0
    t0 = time.perf_counter()
    ensure_ray()
    prepared = prepare(cfg.data, cfg.storage.uri)
    run = run_tokenizer(cfg, prepared, log_model=not args.no_model)
    tok = cfg.tokenizer
    what = f"{tok.variant} c={tok.channels} E={tok.latent_floats}"
    print_run_summary(what, run, cfg.tracking.uri, started=t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
