"""Tools above the public API: the CLI, the float64 reference, the checker, the benchmark and the tuner."""
