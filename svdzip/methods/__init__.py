"""The maths of the factorisations: whitened spectra (linalg, decompose), the methods' metrics, materialising."""
