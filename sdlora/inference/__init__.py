"""Using a LoRA: load it into a pipeline, generate images, merge it into a model's weights."""
