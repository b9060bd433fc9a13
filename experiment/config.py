"""Experiment configs: YAML composition, then validation against the registries.

An experiment YAML may list `defaults: [base.yaml, encoders/x.yaml]` (paths relative to that file);
bases are merged in order, then the file itself, then command-line `key=value` overrides, on top of
the schema's defaults (foundation/schema.py). The merged config is validated (experiment/validate.py) before
anything is built: an unknown key, a wrong type, an unknown encoder / reducer / enhancer / projector
/ template name or builder option, or an unknown `lightning.Trainer` argument fails at once, naming
the key and the valid choices.

`model.from_hf: <LLaVA directory>` puts the model section that directory matches (model/llava_hf.py) after the
files, in place of their model (the blocks it names are replaced whole, other weight sources cleared; training
options such as `model.llm.lora` stay), and before the command-line overrides, which adjust it.

The named blocks (foundation/schema.py `NAMED_BLOCKS`: encoder, reducer, enhancer) and `model.llm.config`
are taken whole, not merged, when a later source sets their `name` (`model_type`):
`model.encoder.name=clip_vit_l_336` swaps the encoder without inheriting the old one's options.
"""

from __future__ import annotations

import copy
import functools
import io
import os
import re

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from experiment.validate import validate
from foundation.schema import NAMED_BLOCKS, ConfigError, ExperimentConfig
from model.llava_hf import llava_hf_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS_DIR = os.path.join(REPO, "experiments")
DEFAULT_EXPERIMENT = os.path.join(EXPERIMENTS_DIR, "quickstart.yaml")
# Blocks that name what they build, and the key that names it: a source that sets that key replaces the
# whole block instead of merging into it, so no option of the previous encoder / LLM shape leaks in.
REPLACED_WHOLE = {**{f"model.{block}": "name" for block in NAMED_BLOCKS}, "model.llm.config": "model_type"}


def _read_yaml(path: str, chain: tuple[str, ...] = ()) -> list[tuple[str, DictConfig]]:
    """The file's `defaults` (recursively, in order) followed by the file itself."""
    path = os.path.abspath(path)
    if path in chain:
        raise ConfigError(f"{path}: circular defaults: {' -> '.join(chain + (path,))}")
    if not os.path.exists(path):
        raise ConfigError(f"config file not found: {path}")
    node, defaults = _parsed(path)
    sources = []
    for base in defaults:
        sources += _read_yaml(os.path.join(os.path.dirname(path), base), chain + (path,))
    return sources + [(path, node)]


# path -> (the file's text, its node without `defaults`, the defaults): a process that composes many configs
# (the tests: ~300) parses each file once, not once per composition (3.5 ms for the quickstart's three files).
# The nodes are only read: merging copies them (_merge).
_PARSED: dict[str, tuple[str, DictConfig, tuple[str, ...]]] = {}


def _parsed(path: str) -> tuple[DictConfig, tuple[str, ...]]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path in _PARSED and _PARSED[path][0] == text:
        return _PARSED[path][1:]
    stream = io.StringIO(text)
    stream.name = path  # yaml's error marks name the file
    try:
        node = OmegaConf.load(stream)
    except Exception as err:  # yaml's scanner / constructor errors
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: an experiment YAML must be a mapping at the top level")
    defaults = node.pop("defaults", None) or []
    if not isinstance(defaults, (list, ListConfig)):
        raise ConfigError(f"{path}: 'defaults' must be a list of YAML paths, got {defaults!r}")
    _PARSED[path] = (text, node, tuple(str(base) for base in defaults))
    return _PARSED[path][1:]


def _merge(cfg: DictConfig, source: DictConfig, where: str) -> DictConfig:
    for block, key in REPLACED_WHOLE.items():
        new = OmegaConf.select(source, block, default=None)
        if isinstance(new, DictConfig) and key in new:
            OmegaConf.update(cfg, block, OmegaConf.to_container(new), merge=False)
    try:
        # In place: OmegaConf.merge would deep-copy the whole structured config once per source and per override.
        # The source's nodes are copied as they merge, so a source can be merged again (model.from_hf).
        cfg.merge_with(source)
        return cfg
    except OmegaConfBaseException as err:
        raise ConfigError(_explain(err, where, cfg)) from None


def _explain(err: OmegaConfBaseException, where: str, cfg: DictConfig) -> str:
    key = getattr(err, "full_key", None) or "?"
    msg = str(err).splitlines()[0]
    section = key.rsplit(".", 1)[0] if "." in key else ""
    node = OmegaConf.select(cfg, section) if section else cfg
    parent = getattr(err, "parent_node", None)
    if "not in" in msg and "." not in key and isinstance(parent, DictConfig) and parent is not cfg:
        # An item of a list of blocks (data.sources, eval.sets): OmegaConf names the key without its path.
        kind = getattr(getattr(err, "object_type", None), "__name__", "block")
        return f"{where}: unknown key '{key}' in a {kind} item; valid keys: {', '.join(parent.keys())}"
    if "not in" in msg and isinstance(node, DictConfig):
        return f"{where}: unknown key '{key}'; valid keys in '{section or '<top>'}': {', '.join(node.keys())}"
    return f"{where}: bad value for '{key}': {msg}"


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Compose an experiment: schema <- defaults (in order) <- the file <- `key=value` overrides; validate.

    Args:
        path: experiment YAML (default: experiments/quickstart.yaml).
        overrides: command-line style `key=value` strings, e.g. `optim.lr=1e-4`, `model.encoder.name=sam_vit_b`.
    """
    return _compose(_read_yaml(path or DEFAULT_EXPERIMENT), overrides, from_hf=True)


def config_from_dict(config: dict, overrides: list[str] | tuple[str, ...] = (), where: str = "config") -> DictConfig:
    """A resolved config saved as a mapping (e.g. in a checkpoint) + `key=value` overrides, validated. A resolved
    config already holds what its `model.from_hf` gave, as the run adjusted it: it is not read again."""
    return _compose([(where, OmegaConf.create(config))], overrides)


def _compose(sources: list[tuple[str, DictConfig]], overrides, from_hf: bool = False) -> DictConfig:
    cfg = _merged(sources, overrides)
    if from_hf and cfg.model.from_hf is not None:
        # the LLaVA directory's model replaces the files' (it names every weight's source); overrides adjust it
        base = OmegaConf.create({"model": llava_hf_config(cfg.model.from_hf)})
        cfg = _merged([*sources, (f"model.from_hf={cfg.model.from_hf}", base)], overrides)
    validate(cfg)
    return cfg


@functools.cache
def _schema() -> DictConfig:
    return OmegaConf.structured(ExperimentConfig)


# (path, text) of each file of a composition -> the schema with those files merged in: a process composing many
# configs merges the same files once (5 ms for the quickstart's three) and copies the result (2 ms).
_FILES_MERGED: dict[tuple[tuple[str, str], ...], DictConfig] = {}


def _files_merged(sources: list[tuple[str, DictConfig]]) -> DictConfig:
    parsed = [_PARSED.get(where) for where, _ in sources]
    files = None  # a source that is no file (a saved config, a LLaVA directory's model section): not kept
    if all(p is not None and p[1] is source for p, (_, source) in zip(parsed, sources)):
        files = tuple((where, p[0]) for p, (where, _) in zip(parsed, sources))
        if files in _FILES_MERGED:
            return copy.deepcopy(_FILES_MERGED[files])
    cfg = copy.deepcopy(_schema())  # a copy takes 1.5 ms, reading the dataclasses again 8
    for where, source in sources:
        cfg = _merge(cfg, source, where)
    if files is not None:
        _FILES_MERGED[files] = copy.deepcopy(cfg)
    return cfg


def _merged(sources: list[tuple[str, DictConfig]], overrides, one_by_one: bool = False) -> DictConfig:
    cfg = _files_merged(sources)
    cfg.overrides = [*cfg.overrides, *overrides]
    if not one_by_one:
        # Each merge walks the structured config (about 1 ms): overrides go in runs that give what merging them
        # one by one gives (_runs), so the shrunk quickstart's 13 overrides take 2 merges. A bad override is
        # found by merging them again one by one, whose error names it.
        try:
            for run in _runs(overrides):
                cfg = _merge(cfg, OmegaConf.from_dotlist(run), "overrides")
            return cfg
        except Exception:
            return _merged(sources, overrides, one_by_one=True)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        try:
            source = OmegaConf.from_dotlist([item])
        except OmegaConfBaseException as err:
            raise ConfigError(f"override {item!r}: {err}") from None
        except yaml.YAMLError as err:  # the value is not YAML, e.g. a {mapping} split by the shell
            where = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(
                f"override {item!r}: the value is not valid YAML ({where}); quote the whole override "
                "when its value has spaces, e.g. 'model.llm.config={hidden_size: 64, num_hidden_layers: 2}'"
            ) from None
        cfg = _merge(cfg, source, f"override {item!r}")
    return cfg


_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_BLOCKS = [tuple(block.split(".")) for block in REPLACED_WHOLE]
_NAME_KEYS = [(*block, key) for block, key in zip(_BLOCKS, REPLACED_WHOLE.values())]


def _runs(overrides) -> list[list[str]]:
    """`key=value` overrides cut into runs whose keys are plain dotted paths, none inside another's: merging a run
    at once is merging its overrides one by one. A run also ends before an override that may replace a named block
    whole (the block, its name key or a section holding it), which would drop what the run put in that block."""
    runs, keys = [], []
    for item in overrides:
        if "=" not in item:  # merged one by one, which says so
            raise ConfigError(f"override {item!r} is not key=value")
        key = item.split("=", 1)[0]
        path = tuple(key.split("."))
        plain = _PLAIN_KEY.fullmatch(key) is not None
        names_a_block = path in _NAME_KEYS or any(block[: len(path)] == path for block in _BLOCKS)
        nested = any(k[: len(path)] == path or path[: len(k)] == k for k in keys)
        if not runs or not plain or names_a_block or nested:
            runs.append([])
            keys = []
        runs[-1].append(item)
        keys.append(path if plain else ())  # () is inside every path: an irregular key ends its run
    return runs


def save_config(cfg: DictConfig, run_dir: str) -> str:
    """Write the resolved config next to the run's logs and return its path."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "config.yaml")
    OmegaConf.save(cfg, path, resolve=True)
    return path
