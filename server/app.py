"""fedserve ServerApp: compose conf/ from the run config, then run the experiment.

Run config keys (``[tool.flwr.app.config]``): ``overrides`` — Hydra overrides applied to conf/
(``"strategy=fedadam partition=dirichlet partition.alpha=0.3"``, or a JSON list of them), and
``output-dir`` — where history, checkpoints and plots go (empty: ``outputs/flwr-<run id>``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.config_loader import compose_experiment, parse_overrides
from server.experiment import run_experiment
from server.run_lock import run_lock

log = logging.getLogger(__name__)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    _enable_info_logging()
    overrides = parse_overrides(str(context.run_config.get("overrides", "")))
    cfg = compose_experiment(overrides)
    output_dir = str(context.run_config.get("output-dir", "") or cfg.output_dir or "")
    if not output_dir:
        output_dir = str(Path("outputs") / f"flwr-{context.run_id}")
    cfg.output_dir = str(Path(output_dir).resolve())
    log.info("composed conf/ with overrides %s; outputs in %s", overrides, cfg.output_dir)
    with run_lock(cfg.output_dir):
        run_experiment(grid, cfg)


def _enable_info_logging() -> None:
    """Our modules log progress at INFO; Flower's ServerApp process leaves the root at WARNING."""
    for name in ("server", "task", "serving"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        if not logger.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            logger.addHandler(handler)
            logger.propagate = False
