"""specprof: profile the singular values of neural-network layers."""
