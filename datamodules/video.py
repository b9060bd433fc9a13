"""Video records: `{"video": path, "conversations": [...]}` with one `<image>` placeholder, which takes the video's
sampled frames, decoded with PyAV (FFmpeg's libraries).

Frames are sampled uniformly, as LLaVA-NeXT's and LLaVA-OneVision's `load_video` sample them: at most
`data.video_frames` frame numbers `linspace(0, total - 1, n)` truncated to ints (every frame of a shorter video).
Each frame goes through the several-image path (datamodules/image_tokens.py: a base view, pooled 2x2 with
`data.video_pool`, the newline after the last frame). The frames' times in seconds (frame number / the stream's
average rate) can be told to the model: `data.video_time_prompt` is a text put right after the placeholder, with
`{duration}`, `{frames}` and `{times}` filled in (LLaVA-Video writes "The video lasts for {duration:.2f}
seconds, and {frames} frames are uniformly sampled from it. These frames are located at {times}."); the
record index counts it, as the data encodes it.

What the index needs (the frame count, the frame size, the rate) is read from the container's header; a stream
that does not state its frame count has its packets counted (no decoding). A file PyAV cannot open, with no
video stream or no frames, is a `DataError`; `data.on_error: skip` skips (and counts) it.
"""

from __future__ import annotations

from dataclasses import dataclass

import av
import numpy as np
from PIL import Image

from datamodules.json_scan import DataError


@dataclass(frozen=True)
class VideoPlan:
    """Which frames of a video the data takes, from its header.

    Attributes:
        frames: the sampled frame numbers, increasing.
        times: their times in seconds.
        duration: the video's length in seconds (frames / rate).
        size: (height, width) of a frame.
    """

    frames: tuple[int, ...]
    times: tuple[float, ...]
    duration: float
    size: tuple[int, int]

    def prompt(self, template: str) -> str:
        """`data.video_time_prompt` with this video's numbers (times as "0.00s,1.50s,...")."""
        times = ",".join(f"{t:.2f}s" for t in self.times)
        return template.format(duration=self.duration, frames=len(self.frames), times=times)


def sample_frames(total: int, cap: int) -> list[int]:
    """`cap` frame numbers spread evenly over `total` (all of them when there are fewer): LLaVA-NeXT's
    `np.linspace(0, total - 1, n, dtype=int)`."""
    return np.linspace(0, total - 1, min(cap, total), dtype=int).tolist()


def plan_video(path: str, cap: int) -> VideoPlan:
    """The frames to take from the video at `path`; DataError naming why it cannot be used."""
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise DataError(f"unreadable video {path}: no video stream")
            stream = container.streams.video[0]
            total = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
            rate = float(stream.average_rate or stream.guessed_rate or 0) or 1.0
            size = (stream.codec_context.height, stream.codec_context.width)
    except (av.FFmpegError, OSError, UnicodeDecodeError) as err:
        raise DataError(f"unreadable video {path}: {err}") from None
    if total <= 0 or min(size) <= 0:
        raise DataError(f"unreadable video {path}: no frames")
    frames = sample_frames(total, cap)
    return VideoPlan(tuple(frames), tuple(k / rate for k in frames), total / rate, size)


def decode_frames(path: str, plan: VideoPlan) -> list[Image.Image]:
    """The plan's frames as PIL RGB images, in order; DataError when the file does not decode to them."""
    wanted, out = set(plan.frames), []
    try:
        with av.open(path) as container:
            for k, frame in enumerate(container.decode(video=0)):
                if k in wanted:
                    out.append(frame.to_image().convert("RGB"))
                if k >= plan.frames[-1]:
                    break
    except (av.FFmpegError, OSError) as err:
        raise DataError(f"unreadable video {path}: {err}") from None
    if len(out) != len(plan.frames):
        raise DataError(f"unreadable video {path}: {len(out)} of its {len(plan.frames)} sampled frames decoded")
    return out


def with_video_prompt(rec: dict, text: str, image_token: str) -> dict:
    """A copy of the record with `text` right after its (one) placeholder: the frames' times for the template."""
    turns = []
    done = False
    for turn in rec["conversations"]:
        value = str(turn.get("value", ""))
        if not done and image_token in value:
            value, done = value.replace(image_token, image_token + text, 1), True
        turns.append({**turn, "value": value})
    return {**rec, "conversations": turns}
