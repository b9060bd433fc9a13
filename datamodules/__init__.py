"""LightningDataModules for LLaVA-format data (alignment and SFT stages) and the built-in dataset."""

from datamodules.llava_datamodule import AlignmentDataModule, LLaVADataModule, SFTDataModule
from datamodules.shapes import generate_shapes
from datamodules.tokenizer import load_tokenizer

__all__ = ["AlignmentDataModule", "LLaVADataModule", "SFTDataModule", "generate_shapes", "load_tokenizer"]
