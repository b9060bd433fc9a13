"""Config composition (defaults, file, overrides) and each validation error."""

from __future__ import annotations

import os

import pytest

from datamodules.templates import TEMPLATES
from encoders import ENCODERS, REDUCERS
from encoders.enhancers import ENHANCERS
from experiment.config import EXPERIMENTS_DIR, ConfigError, load_config
from model.projector import PROJECTORS
from tests.support.experiments import experiment_files


def write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


BASE = """
name: base
model:
  encoder: {name: timm:vit_tiny_patch16_224, image_size: 64}
  llm: {config: {model_type: llama, hidden_size: 32}}
  tokenizer: some/dir
data: {train_json: train.json, batch_size: 4}
optim: {lr: 0.1}
"""


def test_defaults_then_file_then_overrides(tmp_path):
    write(tmp_path, "base.yaml", BASE)
    write(tmp_path, "frag.yaml", "optim: {lr: 0.2, weight_decay: 0.5}\ndata: {batch_size: 8}")
    exp = write(tmp_path, "exp.yaml", "defaults: [base.yaml, frag.yaml]\nname: exp\noptim: {lr: 0.3}")
    cfg = load_config(exp, ["data.batch_size=16", "model.llm.config.hidden_size=64"])
    assert (cfg.name, cfg.optim.lr, cfg.optim.weight_decay, cfg.data.batch_size) == ("exp", 0.3, 0.5, 16)
    assert cfg.model.llm.config == {"model_type": "llama", "hidden_size": 64}
    assert cfg.data.max_length == 2048  # schema default


def test_encoder_swap_replaces_the_block(tmp_path):
    exp = write(tmp_path, "base.yaml", BASE)
    cfg = load_config(exp, ["model.encoder.name=sam_vit_b"])
    assert dict(cfg.model.encoder) == {"name": "sam_vit_b"}  # image_size of the timm encoder is not inherited
    cfg = load_config(exp, ["model.encoder.image_size=96"])  # no name: merged
    assert dict(cfg.model.encoder) == {"name": "timm:vit_tiny_patch16_224", "image_size": 96}
    cfg = load_config(exp, ["model.llm.config={model_type: qwen2, num_hidden_layers: 2}"])  # a new LLM shape
    assert dict(cfg.model.llm.config) == {"model_type": "qwen2", "num_hidden_layers": 2}


def test_overrides_apply_in_order(tmp_path):
    """Overrides are merged in runs (experiment/config.py `_runs`): the result is still each one on top of the
    ones before it, a named block set after its options drops them, and an error names its override."""
    exp = write(tmp_path, "base.yaml", BASE)
    cases = [
        (["model.encoder.image_size=96", "model.encoder.name=sam_vit_b"], {"name": "sam_vit_b"}),
        (["model.encoder.name=sam_vit_b", "model.encoder.image_size=96"], {"name": "sam_vit_b", "image_size": 96}),
        (["data.batch_size=2", "model.encoder={name: sam_vit_b}", "data.batch_size=3"], {"name": "sam_vit_b"}),
    ]
    for overrides, encoder in cases:
        cfg = load_config(exp, overrides)
        assert dict(cfg.model.encoder) == encoder, overrides
        assert cfg.overrides == overrides
    assert load_config(exp, ["data.batch_size=2", "optim.lr=0.5", "data.batch_size=3"]).data.batch_size == 3
    llm = load_config(exp, ["model.llm.config.hidden_size=64", "model.llm.config={model_type: qwen2}"]).model.llm
    assert dict(llm.config) == {"model_type": "qwen2"}
    llm = load_config(exp, ["model.llm.config={model_type: qwen2}", "model.llm.config.hidden_size=64"]).model.llm
    assert dict(llm.config) == {"model_type": "qwen2", "hidden_size": 64}
    with pytest.raises(ConfigError, match=r"^override 'optim.lrr=1': unknown key 'optim.lrr'"):
        load_config(exp, ["data.batch_size=2", "optim.lrr=1", "optim.lr=0.1"])


def test_a_file_is_read_again_when_it_changes_and_a_loaded_config_is_its_own(tmp_path):
    exp = write(tmp_path, "base.yaml", BASE)
    first = load_config(exp)
    first.data.batch_size, first.model.encoder.name = 99, "clip"  # not seen by the next load
    assert (load_config(exp).data.batch_size, load_config(exp).model.encoder.name) == (4, "timm:vit_tiny_patch16_224")
    write(tmp_path, "base.yaml", BASE.replace("batch_size: 4", "batch_size: 5"))
    assert load_config(exp).data.batch_size == 5


@pytest.mark.parametrize(
    "override, needle",
    [
        ("optim.lrr=1", "unknown key 'optim.lrr'; valid keys in 'optim': lr, lr_per_part"),
        ("optim.lr=fast", "bad value for 'optim.lr'"),
        ("data.batch_size=1.5", "bad value for 'data.batch_size'"),
        ("nonsense=1", "unknown key 'nonsense'"),
        (
            "model.encoder.name=resnet",
            "'model.encoder.name' = 'resnet' is not valid; choose one of: clip, clip_vit_l_224",
        ),
        (
            "model.encoder.depth=3",
            "unknown key 'model.encoder.depth' for encoder 'timm:vit_tiny_patch16_224'; valid options",
        ),
        ("model.projector=qformer", "'model.projector' = 'qformer' is not valid; choose one of: linear, mlp2x_gelu"),
        (
            "model.enhancer={name: magic}",
            "'model.enhancer.name' = 'magic' is not valid; choose one of: dual_perspective",
        ),
        ("model.enhancer={name: dual_perspective, crops: 4}", "unknown key 'model.enhancer.crops'"),
        ("stage=pretrain", "'stage' = 'pretrain' is not valid; choose one of: align, sft"),
        ("trainable=[vision]", "'trainable' = 'vision' is not valid"),
        ("data.template=alpaca", "'data.template' = 'alpaca' is not valid"),
        ("data.on_error=ignore", "'data.on_error' = 'ignore' is not valid; choose one of: raise, skip"),
        ("trainer.max_step=3", "unknown key 'trainer.max_step' (not a lightning.Trainer argument)"),
        ("model.llm.path=some/dir", "set exactly one of 'model.llm.path'"),
        ("optim.lr_per_part={vision: 0.1}", "'optim.lr_per_part.vision' = 'vision' is not valid"),
        ("novalue", "is not key=value"),
        # a mapping the shell split at its spaces: the override names itself and says to quote it
        ("model.llm.config={model_type:", "override 'model.llm.config={model_type:': the value is not valid YAML"),
    ],
)
def test_validation_errors_name_the_key(tmp_path, override, needle):
    exp = write(tmp_path, "base.yaml", BASE)
    with pytest.raises(ConfigError) as err:
        load_config(exp, [override])
    assert needle in str(err.value)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"))
    a = write(tmp_path, "a.yaml", "defaults: [b.yaml]")
    write(tmp_path, "b.yaml", "defaults: [a.yaml]")
    with pytest.raises(ConfigError, match="circular defaults"):
        load_config(a)
    bad = write(tmp_path, "bad.yaml", BASE.replace("batch_size: 4", "max_length: lots"))
    with pytest.raises(ConfigError, match=r"bad.yaml: bad value for 'data.max_length'"):
        load_config(bad)
    broken = write(tmp_path, "broken.yaml", BASE + "\ndata: {batch_size: 4")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config(broken)


@pytest.mark.parametrize(
    "override, registry",
    [
        ("model.encoder.name=nope", ENCODERS),
        ("model.reducer={name: nope}", REDUCERS),
        ("model.enhancer={name: nope}", ENHANCERS),
        ("model.projector=nope", PROJECTORS),
        ("data.template=nope", TEMPLATES),
    ],
)
def test_unknown_names_list_every_registered_one(tmp_path, override, registry):
    with pytest.raises(ConfigError, match="is not valid; choose one of: ") as err:
        load_config(write(tmp_path, "base.yaml", BASE), [override])
    for name in registry.names():
        assert name in str(err.value)


def test_a_new_registry_entry_is_valid_at_once(tmp_path):
    """Adding a projector is one registered function: validation and the builder take it, options included."""
    from torch import nn

    @PROJECTORS.register("test_only_linear_no_bias")
    def no_bias(in_dim: int, out_dim: int, scale: float = 1.0) -> nn.Module:
        return nn.Linear(in_dim, out_dim, bias=False)

    try:
        cfg = load_config(write(tmp_path, "base.yaml", BASE), ["model.projector=test_only_linear_no_bias"])
        assert PROJECTORS.options(cfg.model.projector) == ["scale"]
        assert PROJECTORS.build(cfg.model.projector, 4, 8).weight.shape == (8, 4)
    finally:
        PROJECTORS.unregister("test_only_linear_no_bias")


@pytest.mark.parametrize("path", experiment_files(), ids=lambda p: os.path.relpath(p, EXPERIMENTS_DIR))
def test_every_experiment_loads_and_validates(path):
    cfg = load_config(path)
    assert cfg.name and cfg.stage in ("align", "sft")
    first = open(path).readline()
    assert first.startswith("# python train.py"), f"{path} must start with the command that runs it"
