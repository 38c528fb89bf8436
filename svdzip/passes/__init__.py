"""Passes that run the model layer by layer, above the maths of `methods/`: calibration statistics, the
per-unit spectra, FWSVD's Fisher information and SVD-LLM's closed-form update."""
