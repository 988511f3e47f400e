"""Stable Diffusion pipelines: load one (folder, single file, hub id, built-in), build the tiny random-weight ones."""
