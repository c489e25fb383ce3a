"""Launchers for the train job: Cloud TPU pods, SLURM GPU clusters, local processes, and sweeps.

Each is a module run as `python -m launch.<name> ... [--dry_run]`; `launch.common` builds the one train
command they all share.
"""
