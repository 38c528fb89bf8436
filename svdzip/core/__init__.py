"""The low-level machinery every stage stands on: the layer walk, calibration statistics, weight sources
(a model in memory or a checkpoint streamed from disk), run state (resume) and torch.distributed helpers.

Nothing here knows about factorisations, allocators or the saved format; everything above may import it.
"""
