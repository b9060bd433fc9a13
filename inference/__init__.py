"""Using a trained run without the Trainer: load it from its checkpoint (load.py), answer with it, or
export it to transformers' LLaVA (export.py) and answer with the export (exported.py)."""
