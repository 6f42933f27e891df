"""`python -m launch`: torchrun across nodes made safe to use, plus SLURM and Kubernetes files.

Stands alone: it builds and runs torchrun commands and scheduler files and imports neither the
training core nor the parallel library.
"""
