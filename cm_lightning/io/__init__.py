"""Checkpoint files: atomic writes and ``latest_checkpoint`` (files), a diffusion checkpoint read as a teacher
(teacher_file), and older files in today's terms (upgrade: 0.1's hyper-parameters; module_paths: 0.2's module
names). Imports only ``core``."""
