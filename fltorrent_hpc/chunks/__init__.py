"""Tensors to chunks and back: layout, pack/accumulate kernels, device arena, chunk digests."""
