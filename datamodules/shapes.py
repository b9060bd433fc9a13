"""A built-in LLaVA-format dataset of rendered shapes, so the quickstart needs no download.

Each image (white background, side `image_size`) holds 1-4 copies of one shape in one colour, each in
its own quadrant. Questions need the image: colour (6 choices), shape (4), count (4) and, for a single
shape, its position (4), so chance is at most 25% on every question kind. Files written:

    <root>/images/<id>.png
    <root>/align.json        one caption per training image ("plain" alignment stage)
    <root>/sft_train.json    multi-turn questions per image, plus a few text-only records
    <root>/sft_val.json      held-out images, one question each (exact-match accuracy)

(the names each stage reads, from `foundation.stages.STAGES`)
    <root>/tokenizer/        a word-level tokenizer trained on the texts above (tokenizers library)

Everything is a function of the seed; a finished dataset is reused (marked by <root>/DONE).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil

from PIL import Image, ImageDraw

from datamodules.templates import TEMPLATES, tokenizer_chat_template
from foundation.schema import DataConfig
from foundation.stages import STAGES

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (140, 50, 170),
    "orange": (240, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "cross")
COUNTS = ("one", "two", "three", "four")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
QUESTIONS = {
    "colour": "What color are the shapes?",
    "shape": "What shape are they?",
    "count": "How many shapes are there?",
    "position": "Where is the shape?",
}
# Text-only records: answerable without an image, so batches mix both kinds.
TEXT_ONLY = [
    ("How many sides does a square have?", "four"),
    ("How many sides does a triangle have?", "three"),
    ("What color is the sky?", "blue"),
    ("What color is grass?", "green"),
    ("What shape is a ball?", "circle"),
    ("What color is a banana?", "yellow"),
]
# bump when rendering, records or the tokenizer change, so old generated datasets are rebuilt
# (3: the tokenizer's chat template is the chatml template's own Jinja form; 4: no space before punctuation)
FORMAT_VERSION = 4
CHAT_TEMPLATE = "chatml"  # the built-in tokenizer's chat template and special tokens (datamodules/templates.py)


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], rgb) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=rgb)
    elif shape == "square":
        draw.rectangle(box, fill=rgb)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=rgb)
    else:  # cross
        w = (x1 - x0) / 3
        draw.rectangle((x0 + w, y0, x1 - w, y1), fill=rgb)
        draw.rectangle((x0, y0 + w, x1, y1 - w), fill=rgb)


def render(rng: random.Random, image_size: int) -> tuple[Image.Image, dict]:
    """One image and its facts: {"colour", "shape", "count", "quadrants"}."""
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    count = rng.randint(1, 4)
    quadrants = sorted(rng.sample(range(4), count))
    img = Image.new("RGB", (image_size, image_size), (250, 250, 250))
    draw = ImageDraw.Draw(img)
    half = image_size / 2
    for q in quadrants:
        # Large shapes near the quadrant centre: from-scratch encoders learn them in minutes on a CPU.
        size = rng.uniform(0.6, 0.85) * half
        slack = (half - size) / 4
        x = (q % 2) * half + (half - size) / 2 + rng.uniform(-slack, slack)
        y = (q // 2) * half + (half - size) / 2 + rng.uniform(-slack, slack)
        _draw(draw, shape, (x, y, x + size, y + size), COLOURS[colour])
    return img, {"colour": colour, "shape": shape, "count": count, "quadrants": quadrants}


def answers(facts: dict) -> dict[str, str]:
    out = {"colour": facts["colour"], "shape": facts["shape"], "count": COUNTS[facts["count"] - 1]}
    if facts["count"] == 1:
        out["position"] = QUADRANTS[facts["quadrants"][0]]
    return out


def caption(facts: dict) -> str:
    noun = facts["shape"] + (
        "es" if facts["shape"] == "cross" and facts["count"] > 1 else "s" if facts["count"] > 1 else ""
    )
    where = " and ".join(QUADRANTS[q] for q in facts["quadrants"])
    return f"{COUNTS[facts['count'] - 1]} {facts['colour']} {noun} at the {where}."


def _record(rid: str, image: str | None, qa: list[tuple[str, str]]) -> dict:
    turns = []
    for k, (q, a) in enumerate(qa):
        q = f"<image>\n{q}" if image is not None and k == 0 else q
        turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    rec = {"id": rid, "conversations": turns}
    if image is not None:
        rec["image"] = image
    return rec


def generate_shapes(root: str, seed: int = 0, image_size: int = 64, num_train: int = 4000, num_val: int = 200) -> str:
    """Write the dataset under `root` (skipped when already complete) and return `root`.

    Args:
        root: output folder.
        seed: everything (images, questions, split) is a function of it.
        image_size: rendered image side in pixels.
        num_train: training images (alignment captions and SFT conversations).
        num_val: held-out images, one question each.
    """
    spec = {
        "version": FORMAT_VERSION,
        "seed": seed,
        "image_size": image_size,
        "num_train": num_train,
        "num_val": num_val,
    }
    if _is_complete(root, spec):
        return root
    # Write into a private folder and rename it into place, so concurrent ranks never see half a dataset.
    final, root = root, f"{root}.tmp-{os.getpid()}"
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    rng = random.Random(seed)
    align, sft, val = [], [], []
    for i in range(num_train + num_val):
        img, facts = render(rng, image_size)
        name = f"images/{i:06d}.png"
        img.save(os.path.join(root, name))
        qa = answers(facts)
        if i < num_train:
            align.append(
                {
                    "id": f"align-{i}",
                    "image": name,
                    "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": caption(facts)}],
                }
            )
            kinds = rng.sample(list(qa), k=min(len(qa), rng.randint(1, 3)))
            sft.append(_record(f"sft-{i}", name, [(QUESTIONS[k], qa[k]) for k in kinds]))
            if i % 20 == 0:
                sft.append(_record(f"text-{i}", None, [rng.choice(TEXT_ONLY)]))
        else:
            kind = rng.choice(list(qa))
            val.append(_record(f"val-{i}", name, [(QUESTIONS[kind], qa[kind])]))
    align_stage, sft_stage = STAGES.get("align"), STAGES.get("sft")
    files = {align_stage.builtin_train: align, sft_stage.builtin_train: sft, sft_stage.builtin_val: val}
    for fname, records in files.items():
        with open(os.path.join(root, fname), "w") as f:
            json.dump(records, f, indent=1)
    train_tokenizer(os.path.join(root, "tokenizer"), align + sft + val)
    with open(os.path.join(root, "DONE"), "w") as f:
        json.dump(spec, f)
    if os.path.exists(final) and not _is_complete(final, spec):
        shutil.rmtree(final)  # an older dataset with other settings
    try:
        os.rename(root, final)
    except OSError:  # another process finished first
        shutil.rmtree(root, ignore_errors=True)
    return final


def _is_complete(root: str, spec: dict) -> bool:
    done = os.path.join(root, "DONE")
    if not os.path.exists(done):
        return False
    with open(done) as f:
        return json.load(f) == spec


def train_tokenizer(out_dir: str, records: list[dict]) -> None:
    """A word-level tokenizer over the dataset's texts, saved as a transformers tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    chat_specials = list(TEMPLATES.get(CHAT_TEMPLATE).special_tokens)
    specials = ["<pad>", "<unk>", "<s>", "</s>", "<image>"] + chat_specials
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # Words joined by spaces, with no space before punctuation ("top left.", not "top left ."): decoded answers
    # then read as the references are written, and exact match scores captions as it scores short answers.
    tok.decoder = decoders.WordPiece(cleanup=True)
    # Every word the generator can emit, so a small dataset still gets the full vocabulary.
    vocab_text = [
        " ".join(QUESTIONS.values()),
        " ".join(COLOURS),
        " ".join(SHAPES),
        " ".join(COUNTS),
        " ".join(QUADRANTS),
        "crosses squares circles triangles at the and . user assistant system",
    ]
    vocab_text += [q + " " + a for q, a in TEXT_ONLY]
    texts = [t["value"] for r in records for t in r["conversations"]] + vocab_text
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=specials))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=["<image>"] + chat_specials,
    )
    fast.chat_template = tokenizer_chat_template(CHAT_TEMPLATE)
    fast.save_pretrained(out_dir)


def builtin_data(data: DataConfig, stage: str) -> DataConfig:
    """`data` with the built-in dataset generated (once) and the stage's files filled in (`STAGES`); `data`
    itself when it reads files (`data.builtin` unset). Alignment trains on the captions and holds out
    `val_fraction` of them (5% by default); SFT validates on the held-out images."""
    if data.builtin is None:
        return data
    b, s = data.builtin, STAGES.get(stage)
    root = generate_shapes(b.root, seed=b.seed, image_size=b.image_size, num_train=b.num_train, num_val=b.num_val)
    if s.builtin_val is None:
        files = dict(val_json=None, val_fraction=data.val_fraction or s.builtin_val_fraction)
    else:
        files = dict(val_json=f"{root}/{s.builtin_val}", val_fraction=0.0)
    return dataclasses.replace(data, image_folder=root, train_json=f"{root}/{s.builtin_train}", **files)


def builtin_tokenizer(data: DataConfig) -> str | None:
    """The tokenizer directory the built-in dataset ships (None for file data)."""
    return None if data.builtin is None else os.path.join(data.builtin.root, "tokenizer")
