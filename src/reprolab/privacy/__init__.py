"""Privacy attacks on fine-tuning: recovering training text from (PEFT) gradients."""
