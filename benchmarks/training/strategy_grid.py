"""The grid of ``strategies.py``: strategies, client and server lrs, the cells and their run order.

Why each value is in the grid is told in ``strategies.py``'s docstring.
"""

from __future__ import annotations

from dataclasses import dataclass

STRATEGIES = ("flower_fedavg", "fedavg", "fedavgm", "fedadam", "fedyogi")
SERVER_OPTIMIZERS = ("fedavgm", "fedadam", "fedyogi")
# The grid with the conf's client momentum 0.9 (train.momentum).
CLIENT_LRS = (0.1, 0.05, 0.02, 0.01)
SERVER_LRS: dict[str, tuple[float | None, ...]] = {
    "flower_fedavg": (None,),
    "fedavg": (1.0,),
    "fedavgm": (2.0, 1.0, 0.5, 0.1),
    "fedadam": (0.1, 0.05, 0.03, 0.01, 0.003, 0.001),
    "fedyogi": (0.1, 0.05, 0.03, 0.01, 0.003, 0.001),
}


@dataclass(frozen=True)
class Cell:
    strategy: str
    client_lr: float
    server_lr: float | None  # None: the strategy has none (Flower's FedAvg)

    @property
    def key(self) -> str:
        server = "" if self.server_lr is None else f"-slr{self.server_lr:g}"
        return f"{self.strategy}-clr{self.client_lr:g}{server}"

    def overrides(self) -> list[str]:
        out = [f"strategy={self.strategy}", f"train.lr={self.client_lr:g}"]
        if self.server_lr is not None:
            out.append(f"strategy.server_lr={self.server_lr:g}")
        return out


# Run order: a grid cut short by time keeps the most informative cells. FedAvg (Flower's and
# ours) at client lr 0.1 first; the server optimizers at client lr 0.1 with their largest, then
# their gentlest server lr; those all collapsed to chance level (client lr 0.1 with client
# momentum 0.9 is on the edge: even FedAvg sits at chance for rounds and swings), so then FedAdam
# at client lr 0.05 and Flower's FedAvg at 0.05 (13 rounds: client lr 0.05 is the stable regime),
# then every server optimizer at client lr 0.05 from the largest server lr down. Last the cells
# least likely to matter: our FedAvg at 0.05 (Flower's FedAvg step for step,
# ``tests/test_strategies_e2e.py``) and FedAvgM's smaller server lrs at client lr 0.1. Server lr
# 0.03 for FedAdam/FedYogi came last, once 0.01 (then the grid's edge) was their best; then 0.1
# (flwr's FedAdam default) and FedAvgM 2.0, once 0.03 and 1.0 were the best, again at the edge.
ORDER = (
    "flower_fedavg-clr0.1",
    "fedavg-clr0.1-slr1",
    "fedadam-clr0.1-slr0.01",
    "fedyogi-clr0.1-slr0.01",
    "fedavgm-clr0.1-slr1",
    "fedadam-clr0.1-slr0.003",
    "fedyogi-clr0.1-slr0.003",
    "fedadam-clr0.1-slr0.001",
    "fedyogi-clr0.1-slr0.001",
    "fedadam-clr0.05-slr0.001",
    "flower_fedavg-clr0.05",
    "fedavgm-clr0.05-slr0.1",
    "fedadam-clr0.05-slr0.01",
    "fedyogi-clr0.05-slr0.01",
    "fedavgm-clr0.05-slr0.5",
    "fedadam-clr0.05-slr0.003",
    "fedyogi-clr0.05-slr0.003",
    "fedavgm-clr0.05-slr1",
    "fedyogi-clr0.05-slr0.001",
    "fedavg-clr0.05-slr1",
    "fedavgm-clr0.1-slr0.1",
    "fedadam-clr0.05-slr0.03",
    "fedyogi-clr0.05-slr0.03",
    "fedavgm-clr0.1-slr0.5",
    "fedadam-clr0.05-slr0.1",
    "fedyogi-clr0.05-slr0.1",
    "fedavgm-clr0.05-slr2",
    "fedadam-clr0.1-slr0.03",
    # client lr 0.02, added last: the adaptive optimizers' best server lr at 0.05 first
    "flower_fedavg-clr0.02",
    "fedyogi-clr0.02-slr0.03",
    "fedadam-clr0.02-slr0.03",
    "fedavg-clr0.02-slr1",
    "fedavgm-clr0.02-slr1",
    "fedavgm-clr0.02-slr0.5",
    "fedadam-clr0.02-slr0.1",
    "fedyogi-clr0.02-slr0.1",
    "fedadam-clr0.02-slr0.01",
    "fedyogi-clr0.02-slr0.01",
    "fedavgm-clr0.02-slr2",
    "fedavgm-clr0.02-slr0.1",
    "fedadam-clr0.02-slr0.003",
    "fedyogi-clr0.02-slr0.003",
    "fedadam-clr0.02-slr0.001",
    "fedyogi-clr0.02-slr0.001",
    # the largest server lrs at client lr 0.1, where every smaller one collapsed to chance
    "fedyogi-clr0.1-slr0.03",
    "fedadam-clr0.1-slr0.1",
    "fedyogi-clr0.1-slr0.1",
    "fedavgm-clr0.1-slr2",
    # server lr 0.05, between the best (0.03) and 0.1, for the adaptive optimizers
    "fedadam-clr0.02-slr0.05",
    "fedyogi-clr0.02-slr0.05",
    "fedadam-clr0.05-slr0.05",
    "fedyogi-clr0.05-slr0.05",
    "fedadam-clr0.1-slr0.05",
    "fedyogi-clr0.1-slr0.05",
    # client lr 0.01, added once 0.02 (then the grid's edge) was the best of every server
    # optimizer: the adaptive ones around their best server lr first, Flower's FedAvg next
    "fedadam-clr0.01-slr0.05",
    "fedyogi-clr0.01-slr0.03",
    "fedadam-clr0.01-slr0.1",
    "fedyogi-clr0.01-slr0.05",
    "fedadam-clr0.01-slr0.03",
    "fedavgm-clr0.01-slr2",
    "flower_fedavg-clr0.01",
    "fedyogi-clr0.01-slr0.1",
    "fedavgm-clr0.01-slr1",
)


# The grid with plain-SGD clients (train.momentum=0), as in Reddi et al. 2021 and the issue's
# reference runs of Flower's FedAvg (round 34 at client lr 0.05, 23 at 0.1). Without momentum a
# client's step is 10x smaller than with 0.9, so the client lrs go up to 0.5; server lrs are the
# neighbourhood of the momentum-0.9 grid's best.
CLIENT_LRS_MOMENTUM0 = (0.5, 0.2, 0.1, 0.05)
SERVER_LRS_MOMENTUM0: dict[str, tuple[float | None, ...]] = {
    "flower_fedavg": (None,),
    "fedavg": (1.0,),
    "fedavgm": (2.0, 1.0, 0.5),
    "fedadam": (0.1, 0.05, 0.03, 0.01),
    "fedyogi": (0.1, 0.05, 0.03, 0.01),
}
# Flower's FedAvg first (the reference), then the adaptive optimizers at their momentum-0.9 best
# server lrs, FedAvgM, our FedAvg (Flower's FedAvg step for step), the other server lrs last.
ORDER_MOMENTUM0 = (
    "flower_fedavg-clr0.2",
    "flower_fedavg-clr0.1",
    "flower_fedavg-clr0.5",
    "flower_fedavg-clr0.05",
    *(
        f"{s}-clr{clr:g}-slr{slr:g}"
        for slr in (0.05, 0.03)
        for clr in (0.1, 0.2, 0.05, 0.5)
        for s in ("fedadam", "fedyogi")
    ),
    *(f"fedavgm-clr{clr:g}-slr{slr:g}" for clr in (0.1, 0.2, 0.05) for slr in (1.0, 2.0, 0.5)),
    "fedavg-clr0.2-slr1",
    "fedavg-clr0.1-slr1",
)


@dataclass(frozen=True)
class Grid:
    client_lrs: tuple[float, ...]
    server_lrs: dict[str, tuple[float | None, ...]]
    order: tuple[str, ...]

    def cells(self, order_by_promise: bool = True) -> list[Cell]:
        """Every cell; in ``order`` (then the grid's own order) unless ``order_by_promise`` is
        False."""
        cells = [
            Cell(s, clr, slr)
            for s in STRATEGIES
            for clr in self.client_lrs
            for slr in self.server_lrs[s]
        ]
        if not order_by_promise:
            return cells
        rank = {key: i for i, key in enumerate(self.order)}
        return sorted(cells, key=lambda c: rank.get(c.key, len(self.order)))


# By client momentum (train.momentum).
GRIDS = {
    0.9: Grid(CLIENT_LRS, SERVER_LRS, ORDER),
    0.0: Grid(CLIENT_LRS_MOMENTUM0, SERVER_LRS_MOMENTUM0, ORDER_MOMENTUM0),
}


def grid(order_by_promise: bool = True, momentum: float = 0.9) -> list[Cell]:
    """Every cell of the grid for client ``momentum``; see :meth:`Grid.cells`."""
    return GRIDS[momentum].cells(order_by_promise)
