"""The layer-wise engine: calibration, the compress driver, streaming, resume and torch.distributed."""
