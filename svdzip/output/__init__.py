"""The saved format: the directory (io), quantized storage, and loading a model or an svdzip directory."""
