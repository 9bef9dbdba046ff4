"""One run from its config: checks, building the parts, training, finishing, resuming, sweeps."""
