"""The canonical LoRA form and everything that needs no model: families, formats, file I/O, inspection, matching."""
