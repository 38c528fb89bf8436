"""What a run leaves behind: the saved directory (io), quantized storage, reports and plots."""
