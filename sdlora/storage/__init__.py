"""Bytes on disk: atomic writes and streaming safetensors rewrites. Imports nothing else of sdlora."""
