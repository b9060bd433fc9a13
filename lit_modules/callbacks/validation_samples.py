"""A callback that shows validation samples in TensorBoard: each image with its question, the reference
answer and the model's output beside it, and the same as a table."""

from __future__ import annotations

import textwrap

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image, ImageDraw, ImageFont

PANEL_WIDTH = 360  # pixels of text beside each image
MIN_SIDE = 224  # small images (the quickstart's 64 px) are enlarged so their text panel stays readable


def tensorboard(trainer: L.Trainer):
    """The run's TensorBoard `SummaryWriter`, or None without a TensorBoard logger."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def annotate(image: np.ndarray | None, lines: dict[str, str]) -> np.ndarray:
    """An image [H, W, 3] uint8 (or None for a text-only sample) with `lines` ("question": ..., ...)
    written in a panel to its right -> [H', W', 3] uint8."""
    if image is None:
        picture = Image.new("RGB", (MIN_SIDE, MIN_SIDE), (240, 240, 240))
    else:
        picture = Image.fromarray(image)
        if min(picture.size) < MIN_SIDE:
            scale = MIN_SIDE / min(picture.size)
            picture = picture.resize((round(picture.width * scale), round(picture.height * scale)), Image.NEAREST)
    font = ImageFont.load_default()
    text = []
    for label, value in lines.items():
        text += textwrap.wrap(f"{label}: {value}", width=PANEL_WIDTH // 7) or [f"{label}:"]
    height = max(picture.height, 14 * len(text) + 16)
    canvas = Image.new("RGB", (picture.width + PANEL_WIDTH, height), (255, 255, 255))
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, line in enumerate(text):
        draw.text((picture.width + 8, 8 + 14 * k), line, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


class ValidationSamples(L.Callback):
    """At every validation (not the sanity check), the first `num_samples` samples of the first batch:
    `val/sample_<k>` (the image, un-normalised with the vision tower's mean and std, with question,
    reference and model output beside it) and a markdown table `val/samples`.

    Args:
        num_samples: samples shown (0: none).
    """

    def __init__(self, num_samples: int = 4) -> None:
        self.num_samples = num_samples

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        tb = tensorboard(trainer)
        if batch_idx or not outputs or tb is None or not self.num_samples or trainer.sanity_checking:
            return
        k, step = self.num_samples, trainer.global_step
        samples = list(zip(batch["ids"], batch["questions"], batch["answers"], outputs["outputs"]))[:k]
        rows = ["| id | question | answer | model |", "|---|---|---|---|"]
        rows += [f"| {i} | {q} | {a} | {o} |" for i, q, a, o in samples]
        tb.add_text("val/samples", "\n".join(rows), step)
        images = self._images(pl_module, batch)
        for n, (i, q, a, o) in enumerate(samples):
            panel = annotate(images[n], {"id": i, "question": q, "reference": a, "model": o})
            tb.add_image(f"val/sample_{n}", panel, step, dataformats="HWC")

    @staticmethod
    def _images(pl_module, batch: dict) -> list[np.ndarray | None]:
        """Per sample, its image as [H, W, 3] uint8 (None for text-only samples). With a tiling (AnyRes) the
        pixels are every image's views [K, 3, S, S], the base view (the whole image at S x S) first; the
        image's size (`image_sizes` rows) says how many views it took; a sample of several images (`num_images`)
        shows its first."""
        pixels, has_image = batch.get("pixel_values"), batch["has_image"].tolist()
        vision = pl_module.model.vision
        sizes = batch.get("image_sizes")
        per_sample = batch.get("num_images")  # several images (or a video's frames) in a sample: its first is shown
        per_sample = per_sample.tolist() if per_sample is not None else [int(p) for p in has_image]
        views = [1] * sum(per_sample) if sizes is None else [vision.num_views(tuple(s)) for s in sizes.tolist()]
        out, m, k = [], 0, 0  # k: the next image's first view
        for present, n in zip(has_image, per_sample):
            if not present:
                out.append(None)
                continue
            mean = torch.tensor(vision.pixel_mean, device=pixels.device).view(3, 1, 1)
            std = torch.tensor(vision.pixel_std, device=pixels.device).view(3, 1, 1)
            image = (pixels[k].float() * std + mean).clamp(0, 1)  # [3, S, S] back to 0-1
            out.append((image.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8))
            k += sum(views[m : m + n])
            m += n
        return out
