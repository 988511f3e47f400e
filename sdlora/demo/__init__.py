"""The demo base model's pretraining and the style classifier that measures what a LoRA on it learnt."""
