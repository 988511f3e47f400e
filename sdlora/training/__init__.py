"""Training a LoRA: the recipe (setup -> run_steps -> save_outputs) and the parts its loop is made of."""
