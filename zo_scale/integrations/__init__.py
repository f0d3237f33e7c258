"""zo-scale inside other training frameworks: a Hugging Face ``Trainer`` whose step is a ZO step.

``from zo_scale.integrations import ZOTrainer`` imports transformers; ``import zo_scale`` does not.
"""

from zo_scale.integrations.hf_trainer import ZOTrainer

__all__ = ["ZOTrainer"]
