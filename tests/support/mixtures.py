"""Mixtures for the tests (`data.sources`): the built-in training file cut into sources of their own."""

from __future__ import annotations

import json
import os


def split_sources(shapes_root: str, folder) -> list[str]:
    """The built-in SFT training records cut into three files, part0-2.json in `folder`: 12, 8 and 7 records."""
    records = json.load(open(os.path.join(shapes_root, "sft_train.json")))
    paths = []
    for k, part in enumerate((records[:12], records[12:20], records[20:27])):
        paths.append(os.path.join(str(folder), f"part{k}.json"))
        json.dump(part, open(paths[-1], "w"))
    return paths


def sources_overrides(shapes_root: str, paths: list[str], spec: str = "weight: 1") -> list[str]:
    """Overrides that train the shrunk quickstart on `paths` as a mixture, each source with `spec`."""
    sources = ", ".join(f"{{file: {path}, {spec}}}" for path in paths)
    return [
        "data.builtin=null",
        f"model.tokenizer={shapes_root}/tokenizer",
        f"data.image_folder={shapes_root}",
        f"data.sources=[{sources}]",
    ]
