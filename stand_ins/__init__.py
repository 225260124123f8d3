"""Stand-in models built with ComfyUI's own classes (stand_ins/models.py): graphs, tests, benchmarks and the
trainer's smoke runs work on a CPU with no weight files."""
