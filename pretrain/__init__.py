"""BERT pre-training: config, model, objectives, data, optimizers, trainer, checkpoints, export."""
