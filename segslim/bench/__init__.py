"""Speed against the CPU and the peers: the INT8 ceiling probe, the engines' own quantizers,
and the zoo benchmark of make bench."""
