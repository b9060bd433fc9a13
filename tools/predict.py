"""Ask a trained run questions: one question, a whole LLaVA-format file, or a chat in the terminal.

    python -m tools.predict runs/quickstart/defaults --image photo.png --question "What color are the shapes?"
    python -m tools.predict runs/quickstart/defaults --data questions.json --image-folder images --out answers.jsonl
    python -m tools.predict runs/quickstart/defaults --chat --image photo.png

RUN is a run directory (its checkpoints/last.ckpt, or the best one with --checkpoint best) or a checkpoint
file; the model, template and image preprocessing come from the config stored in the checkpoint. RUN may
also be an export (python -m tools.export): transformers' LLaVA with its processor and chat template. Greedy by
default; --temperature > 0 samples (with --top-p). Generation stops at the template's end-of-turn token.
--data takes a LLaVA JSON list or JSONL records and writes JSONL: id, question, answer, and reference
when the record has a last gpt turn.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from tqdm import tqdm

from datamodules.llava_data import load_records
from foundation.errors import run_command
from inference.load import load_predictor
from lit_modules.predictor import Predictor


def read_records(path: str) -> list[dict]:
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    return load_records(path)


def predict_file(predictor: Predictor, path: str, image_folder: str | None, out: str, batch_size: int, **gen) -> int:
    records = read_records(path)
    with open(out, "w", encoding="utf-8") as f:
        for start in tqdm(range(0, len(records), batch_size), desc="answering", unit="batch"):
            chunk = records[start : start + batch_size]
            for record, answer in zip(chunk, predictor.answer_records(chunk, image_folder, batch_size, **gen)):
                turns = record["conversations"]
                humans = [t for t in turns if t.get("from") == "human"]
                row = {"id": record.get("id"), "question": humans[-1]["value"] if humans else "", "answer": answer}
                if turns and turns[-1].get("from") == "gpt":
                    row["reference"] = turns[-1]["value"]
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return len(records)


def chat(predictor: Predictor, image: str | None, lines, write=print, **gen) -> list[tuple[str, str]]:
    """A multi-turn conversation about `image`: each line of `lines` is a question ('exit' or EOF ends)."""
    history: list[tuple[str, str]] = []
    for line in lines:
        question = line.strip()
        if question in ("exit", "quit"):
            break
        if not question:
            continue
        answer = predictor.ask(question, image, history, **gen)
        write(answer)
        history.append((question, answer))
    return history


def _stdin_lines():
    while True:
        try:
            yield input(">>> ")
        except EOFError:
            return


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", help="run directory, checkpoint file or export directory")
    parser.add_argument("--checkpoint", default="last", choices=["last", "best"], help="which checkpoint of a run")
    parser.add_argument("--image", help="an image file (one question, or the chat's image)")
    parser.add_argument("--question", help="one question")
    parser.add_argument("--data", help="LLaVA-format JSON / JSONL records to answer")
    parser.add_argument("--image-folder", help="folder the records' image paths are relative to")
    parser.add_argument("--out", default="answers.jsonl", help="JSONL output for --data")
    parser.add_argument("--chat", action="store_true", help="an interactive multi-turn chat")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the run's eval.max_new_tokens")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    args = parser.parse_args(argv)
    if sum(x is not None and x is not False for x in (args.question, args.data, args.chat or None)) != 1:
        parser.error("give exactly one of --question, --data, --chat")
    for path in (args.image, args.data):  # before the model loads (seconds to minutes), not after
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file")
    gen = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    predictor = load_predictor(args.run, args.checkpoint)
    if args.question:
        print(predictor.ask(args.question, args.image, **gen))
    elif args.data:
        n = predict_file(predictor, args.data, args.image_folder, args.out, args.batch_size, **gen)
        print(f"{n} answers: {args.out}", file=sys.stderr)
    else:
        print("chat: type a question, 'exit' to stop", file=sys.stderr)
        chat(predictor, args.image, _stdin_lines(), **gen)


if __name__ == "__main__":
    sys.exit(run_command(main))  # a user-fixable error: one line `error: ...`, status 2
