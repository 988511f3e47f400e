"""LoRA files made from others and from models: any kind as a plain LoRA, resize, combine, extract."""
