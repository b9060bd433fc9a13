"""The nn.Module VLM, its one composition root (`model.build.build_vlm`), projectors, LoRA, the loss and the FLOP
model (the layout: docs/ARCHITECTURE.md)."""
