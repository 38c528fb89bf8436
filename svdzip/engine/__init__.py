"""The runner: the one driver of a compression run, its stages, the streamed writer and the memory check."""
