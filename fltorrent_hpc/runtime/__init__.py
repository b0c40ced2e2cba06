"""One round's lifecycle over a Transport: engine, tracker, peer, BitTorrent stages, and the simulator driver."""
