"""The pure core: state, steps, random keys. No files, processes, clocks or global RNG."""
