"""The LightningModule and every Lightning callback of a run (the layout: docs/ARCHITECTURE.md)."""
