"""Submitting training to clusters: SLURM (sbatch), Cloud TPU VMs (gcloud) and GKE (JobSet).

Every target runs the same `launch/train.py` once per process; `slices` holds the TPU slice
and GPU tables the targets share. Nothing here imports JAX, so submitting stays instant.
"""
