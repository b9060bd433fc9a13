"""The data layer at the scale of the recipes: a LLaVA-665K-shaped SFT file, indexed cold and warm.

    python bench/bench_data_scale.py                                   # 665,000 records, Vicuna's tokenizer
    python bench/bench_data_scale.py --records 20000 --tokenizer DIR --template chatml --json out.json

Generates (once per --root, --records and --seed) an SFT file shaped like LLaVA-1.5's mix665k: about 10%
text-only ShareGPT-style conversations (long, several turns), a quarter LLaVA-Instruct-style ones (a few turns,
answers of sentences) and the rest academic VQA (many short question / answer turns with LLaVA's "Answer the
question using a single word or phrase."), about 1.5 KB a record. Words are the tokenizer's own whole-word
tokens, drawn with Zipf's law, one in five a compound of two of them (words of several tokens). Images are 16
real-size JPEGs (640 x 480) in LLaVA's folder layout, each path shared by many records, so the disk holds
the JSON and 2 MB of images. Then, each in a fresh process, as a new start of train.py would be:

- cold:  `prepare_data()` + `setup()` with no index: the record index is built (records/s, and records per
  CPU-second of the process and its pool, which a machine shared with other jobs still measures);
- warm:  the same again: the index is mapped (seconds; the process's imports and tokenizer load not counted);
- memory: PSS (/proc/<pid>/smaps_rollup) of the process and its DataLoader workers after `--batches` batches,
  minus the process's PSS before `setup()`; and the process's own growth over `setup()` (index + sampler): the
  rest is the workers' own (image batches in flight, their heaps), the same at 50,000 records as at 665,000;
- loader: training samples/s through the DataLoader (images decoded and preprocessed at 336 px, CLIP's recipe,
  576 tokens per image as CLIP-L/14-336).

The tokenizer defaults to tests' Vicuna (data/generated/tokenizers/vicuna: python tests/fixtures/build_tokenizers.py
data/generated/tokenizers).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARK = "BENCH_RESULT "
FOLDERS = ("coco/train2017", "gqa/images", "ocr_vqa/images", "textvqa/train_images", "vg/VG_100K")
SHORT = "Answer the question using a single word or phrase."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=665_000)
    parser.add_argument("--root", default=os.path.join(ROOT, "data", "generated", "bench_data_scale"))
    parser.add_argument("--tokenizer", default=os.path.join(ROOT, "data", "generated", "tokenizers", "vicuna"))
    parser.add_argument("--template", default="vicuna_v1")
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=20, help="batches read through the DataLoader")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument("--phase", help=argparse.SUPPRESS)  # internal: cold | warm, in a fresh process
    return parser.parse_args(argv)


# ---- the data ---------------------------------------------------------------------------------------
def word_list(tokenizer) -> list[str]:
    """The tokenizer's whole-word tokens ("▁word" / "Ġword"), most frequent (lowest id) first."""
    words = []
    for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        if token[:1] in ("▁", "Ġ") and token[1:].isalpha() and token[1:].isascii() and len(token) > 2:
            words.append(token[1:])
    return words


class Text:
    """Zipf-distributed words: the tokenizer's whole words, and one in five from 20,000 fixed compounds of two
    (words of several tokens, as names and rare words are; a fixed set, as a corpus' vocabulary is)."""

    def __init__(self, words: list[str], rng: random.Random) -> None:
        self.rng = rng
        compounds = [rng.choice(words[:5000]) + rng.choice(words) for _ in range(20_000)]
        self.words = words, compounds
        self.cum = [list(itertools.accumulate(1.0 / (k + 10) for k in range(len(w)))) for w in self.words]

    def sentence(self, n: int) -> str:
        plain = self.rng.choices(self.words[0], cum_weights=self.cum[0], k=n)
        rare = self.rng.choices(self.words[1], cum_weights=self.cum[1], k=n)
        picks = [r if self.rng.random() < 0.2 else p for p, r in zip(plain, rare)]
        return " ".join(picks).capitalize() + self.rng.choice(".....?!,")

    def paragraph(self, lo: int, hi: int) -> str:
        n, out = self.rng.randint(lo, hi), []
        while n > 0:
            k = min(n, self.rng.randint(6, 18))
            out.append(self.sentence(k))
            n -= k
        return " ".join(out)


def record(k: int, text: Text, rng: random.Random) -> dict:
    kind = rng.random()
    turns = []
    if kind < 0.10:  # ShareGPT: text only, long
        for _ in range(rng.randint(1, 4)):
            turns += [text.paragraph(8, 50), text.paragraph(60, 260)]
        return {"id": f"sharegpt_{k}", "conversations": _turns(turns)}
    folder = FOLDERS[k % len(FOLDERS)]
    image = f"{folder}/{k % 16:012d}.jpg"
    if kind < 0.35:  # LLaVA-Instruct: a few turns, answers of sentences
        for _ in range(rng.randint(1, 5)):
            turns += [text.sentence(rng.randint(6, 16))[:-1] + "?", text.paragraph(20, 90)]
    else:  # academic VQA: many short turns
        for _ in range(rng.randint(2, 10)):
            turns += [text.sentence(rng.randint(4, 10))[:-1] + "?\n" + SHORT, text.sentence(rng.randint(1, 2))[:-1]]
    turns[0] = "<image>\n" + turns[0] if rng.random() < 0.5 else turns[0] + "\n<image>"
    return {"id": f"{k:09d}", "image": image, "conversations": _turns(turns)}


def _turns(values: list[str]) -> list[dict]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


def write_images(folder: str) -> None:
    """16 JPEGs of 640 x 480 (gradients and noise, about 100 KB each), under each of LLaVA's folders."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:480, 0:640]
    for k in range(16):
        base = np.stack([(x * (k + 1)) % 256, (y * (k + 3)) % 256, ((x + y) * 7) % 256], -1)
        pixels = (base + np.random.default_rng(k).integers(0, 64, (480, 640, 3))).clip(0, 255).astype("uint8")
        for sub in FOLDERS:
            os.makedirs(os.path.join(folder, sub), exist_ok=True)
            Image.fromarray(pixels).save(os.path.join(folder, sub, f"{k:012d}.jpg"), quality=90)


def generate(args, tokenizer) -> str:
    """The SFT file under --root (kept for the next run with the same --records and --seed)."""
    path = os.path.join(args.root, f"sft_{args.records}_{args.seed}.json")
    if os.path.exists(path):
        return path
    rng = random.Random(args.seed)
    write_images(os.path.join(args.root, "images"))
    text = Text(word_list(tokenizer), rng)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("[\n")
        for k in range(args.records):
            f.write(("," if k else "") + json.dumps(record(k, text, rng)) + "\n")
        f.write("]\n")
    os.replace(tmp, path)
    return path


# ---- one start, in a fresh process ------------------------------------------------------------------
def pss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Pss:"))


def _cpu_s() -> float:
    """CPU seconds of this process and its finished children (the index build's pool)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def start(args, path: str) -> dict:
    """prepare_data + setup as a training start, then the DataLoader: times and memory."""
    sys.path.insert(0, ROOT)
    import torch

    from datamodules import ImageSpec, LLaVADataModule, load_tokenizer
    from encoders.preprocess import ResizeCrop
    from foundation.schema import DataConfig

    torch.set_num_threads(1)
    tokenizer = load_tokenizer(args.tokenizer)
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # CLIP's
    image = ImageSpec(336, mean, std, num_tokens=576, preprocess=ResizeCrop.clip(336, mean, std))
    data = DataConfig(
        train_json=path, image_folder=os.path.join(args.root, "images"), template=args.template, max_length=8192,
        batch_size=args.batch_size, num_workers=args.workers, pad_to_square=True, group_by_length=True,
        on_error="skip", index_dir=os.path.join(args.root, "index"),
    )  # fmt: skip
    dm = LLaVADataModule(tokenizer, data, image, stage="sft", seed=args.seed)
    before = pss_kb(os.getpid())
    t0, cpu0, load0 = time.perf_counter(), _cpu_s(), os.getloadavg()[0]
    dm.prepare_data()
    dm.setup()
    seconds, cpu = time.perf_counter() - t0, _cpu_s() - cpu0
    out = {"setup_s": seconds, "cpu_s": cpu, "load": [load0, os.getloadavg()[0]]}
    out.update(records=len(dm.train_set.samples.index), usable=len(dm.train_set))
    out["pss_setup_mb"] = (pss_kb(os.getpid()) - before) / 1024  # what the index and the sampler's arrays add
    out["skipped"] = dict(dm.skipped)
    out["counting"] = dm.train_set.samples.index.meta["counting"]
    loader = dm.train_dataloader()
    it = iter(loader)
    next(it)  # workers started, first batch
    t0, samples = time.perf_counter(), 0
    for _ in range(args.batches):
        samples += len(next(it)["ids"])
    out["loader_samples_s"] = samples / (time.perf_counter() - t0)
    workers = [w.pid for w in getattr(it, "_workers", [])]
    after = pss_kb(os.getpid()) + sum(pss_kb(pid) for pid in workers)
    out.update(pss_before_mb=before / 1024, pss_after_mb=after / 1024, pss_growth_mb=(after - before) / 1024)
    out["workers"] = len(workers)
    del it
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.phase:
        print(MARK + json.dumps(start(args, args.phase)), flush=True)
        return 0
    sys.path.insert(0, ROOT)
    if not os.path.isdir(args.tokenizer):
        print(f"error: no tokenizer at {args.tokenizer} (build it: python tests/fixtures/build_tokenizers.py "
              f"data/generated/tokenizers, or pass --tokenizer)", file=sys.stderr)  # fmt: skip
        return 2
    from datamodules import load_tokenizer

    t0 = time.perf_counter()
    path = generate(args, load_tokenizer(args.tokenizer))
    generated = time.perf_counter() - t0
    shutil.rmtree(os.path.join(args.root, "index"), ignore_errors=True)  # cold: no index
    results = {"records": args.records, "file_mb": os.path.getsize(path) / 2**20, "generate_s": generated}
    for phase in ("cold", "warm"):
        cmd = [sys.executable, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:])]
        t0 = time.perf_counter()
        run = subprocess.run(cmd + ["--phase", path], capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - t0
        lines = [line for line in run.stdout.splitlines() if line.startswith(MARK)]
        if run.returncode != 0 or not lines:
            print(run.stdout[-2000:], run.stderr[-4000:], file=sys.stderr)
            return 1
        results[phase] = dict(json.loads(lines[-1][len(MARK) :]), process_s=wall)
    cold, warm = results["cold"], results["warm"]
    rows = [
        ("records (file MB)", f"{args.records:,} ({results['file_mb']:.0f} MB)"),
        ("cold index build", f"{cold['setup_s']:.1f} s = {args.records / cold['setup_s']:,.0f} records/s"),
        ("  its CPU time", f"{cold['cpu_s']:.1f} s = {args.records / cold['cpu_s']:,.0f} records per CPU-second"),
        ("  load average (start, end)", " ".join(f"{x:.1f}" for x in cold["load"]) + f" on {os.cpu_count()} cores"),
        ("warm start (setup)", f"{warm['setup_s']:.2f} s (whole process {warm['process_s']:.1f} s)"),
        ("PSS growth, process + workers", f"{warm['pss_growth_mb']:.0f} MB ({warm['workers']} workers)"),
        ("  of it the index and sampler", f"{warm['pss_setup_mb']:.0f} MB (the process, after setup)"),
        ("loader", f"{warm['loader_samples_s']:.0f} samples/s"),
        ("token counts", cold["counting"]),
    ]
    for name, value in rows:
        print(f"{name:<32} {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
