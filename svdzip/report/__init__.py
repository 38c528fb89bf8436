"""What a person reads: the per-matrix tables and the plots of a run (spectra, ranks, effective ranks)."""
