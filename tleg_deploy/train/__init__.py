"""Training: data loading, Aux-Net distillation (``train_learngene``) and descendant fine-tuning
(``finetune``), single-process or under ``torchrun``. Submodules import torch; import them directly."""
