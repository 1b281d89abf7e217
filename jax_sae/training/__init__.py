"""Training as a library: typed config, the loop, sweeps, experiment logging."""
