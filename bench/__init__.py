"""fxpress benchmarks: `make bench` (full, ≤ 15 min on 2 cores) or `make bench-quick`."""
