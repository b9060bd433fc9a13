"""The LightningModule (`VLMModule`: steps, optimizer, validation) and every Lightning callback of a run, with
what they use during training: the predictor, benchmark scoring and checkpoint files."""
