"""Parallelism beyond data parallelism, wired from DeepSpeed's own parts: sequence.py
(Ulysses sequence parallelism)."""
