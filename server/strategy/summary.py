"""The one-paragraph log of a ParameterServer's configuration at start."""

from __future__ import annotations

import logging

from server.strategy.config import StrategyConfig

log = logging.getLogger(__name__)


def log_summary(cfg: StrategyConfig, seed: int) -> None:
    log.info(
        "ParameterServer: mode=%s optimizer=%s lr=%g momentum=%g nesterov=%s betas=(%g, %g) "
        "tau=%g aggregation=%s",
        cfg.mode,
        cfg.optimizer,
        cfg.server_lr,
        cfg.momentum,
        cfg.nesterov,
        cfg.beta1,
        cfg.beta2,
        cfg.tau,
        cfg.aggregation,
    )
    if cfg.mode == "sync":
        log.info(
            "  sync: fraction_train=%g min_replies=%d round_timeout_s=%g retries=%d",
            cfg.fraction_train,
            cfg.min_replies,
            cfg.round_timeout_s,
            cfg.max_round_retries,
        )
    else:
        log.info(
            "  async (FedBuff): buffer_size=%d concurrency=%d max_staleness=%d",
            cfg.buffer_size,
            cfg.concurrency,
            cfg.max_staleness,
        )
    log.info(
        "  validation: max_norm_ratio=%s max_update_norm=%s clip_update_norm=%s; "
        "discovery_timeout_s=%g; seed=%d",
        cfg.max_norm_ratio,
        cfg.max_update_norm,
        cfg.clip_update_norm,
        cfg.discovery_timeout_s,
        seed,
    )
