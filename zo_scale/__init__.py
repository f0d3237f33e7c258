"""zo-scale: zeroth-order (forward-only) fine-tuning of large language models."""
