"""Procedural captioned scenes in three styles: the example LoRA datasets, the demo model's pretraining pictures
and the style classifier's. Needs only numpy and Pillow, and imports nothing else from sdlora."""
