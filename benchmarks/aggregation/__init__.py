"""Server memory and throughput aggregating client updates, ours vs Flower's FedAvg
(``memory``; each measurement runs in a fresh ``worker`` subprocess)."""
