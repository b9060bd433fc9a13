"""The LightningDataModule for LLaVA-format data (either stage) and the built-in dataset."""

from datamodules.images import ImageSpec
from datamodules.llava_datamodule import LLaVADataModule
from datamodules.shapes import builtin_data, builtin_tokenizer, generate_shapes
from datamodules.tokenizer import load_tokenizer

__all__ = [
    "ImageSpec",
    "LLaVADataModule",
    "builtin_data",
    "builtin_tokenizer",
    "generate_shapes",
    "load_tokenizer",
]
