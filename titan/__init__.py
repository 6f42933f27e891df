"""Training core: model, data, optimizer, trainer, checkpoint, metrics."""
