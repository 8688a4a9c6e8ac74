"""Training: the LightningModule, callbacks, checkpoints and the pipeline behind train.py."""
