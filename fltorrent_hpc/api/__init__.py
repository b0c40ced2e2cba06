"""The torch-facing layer: the ProcessGroup "fltorrent", fedavg_ and the aggregation rules."""
