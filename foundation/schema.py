"""The experiment schema: typed config groups with their defaults, written once.

Each group is a dataclass that the code receiving it takes whole: `ModelConfig` goes to
`model.build.build_vlm`, `LLMConfig` to `build_llm`, `DataConfig` to the DataModule,
`OptimConfig` and `EvalConfig` to `VLMModule`. A new option is one field here (with its comment)
and its use where the group is read; nothing copies fields one by one in between.

This module imports nothing from the project but the floor's `foundation.errors`: names (encoders, templates,
...) are checked against the registries by `experiment.validate`, never the other way round.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from foundation.errors import UserError


class ConfigError(UserError):
    """A config that cannot be built; the message names the key and the valid choices."""


@dataclass
class LLMConfig:
    path: Optional[str] = None  # local HF model directory (or a hub id where a network exists)
    config: Optional[Dict[str, Any]] = None  # inline transformers config ({model_type: llama, ...}) for random init
    dtype: Optional[str] = None  # weights dtype when loading from `path` (e.g. bfloat16); None keeps float32
    attn_implementation: Optional[str] = None  # eager | sdpa | flash_attention_2; None lets transformers pick
    # How packed rows (data.packing) keep their samples apart (model/attention.py): mask (a block-diagonal mask for
    # SDPA / eager) | varlen (PyTorch's varlen kernel, CUDA, fp16 / bf16) | flex (FlexAttention document mask)
    packed_attention: str = "mask"
    grad_checkpointing: bool = False
    lora: Optional[Dict[str, Any]] = None  # apply_lora's options {r, alpha, dropout, target_modules, ...}
    quantization: Optional[str] = None  # 4bit | 8bit: QLoRA base via bitsandbytes (CUDA, optional install)


# ModelConfig's blocks `{name, **options}`, in the order the vision tower is built (the encoder, then the
# wrappers around it): `name` picks a builder from the registry of the block's kind (encoders.BLOCK_REGISTRIES,
# by `Registry.kind`), and a config source that sets `name` replaces the block whole (experiment/config.py).
NAMED_BLOCKS = ("encoder", "reducer", "enhancer", "tiling")


@dataclass
class ModelConfig:
    encoder: Dict[str, Any] = field(default_factory=lambda: {"name": "clip_vit_l_336"})  # {name, **builder options}
    reducer: Optional[Dict[str, Any]] = None  # e.g. {name: conv} for SAM -> 256 tokens
    enhancer: Optional[Dict[str, Any]] = None  # e.g. {name: dual_perspective, n: 3}
    # e.g. {name: anyres, grid_pinpoints: "(1x1),...,(3x3)", max_tiles: 9}: LLaVA-NeXT's tiles (encoders/anyres/)
    tiling: Optional[Dict[str, Any]] = None
    projector: str = "mlp2x_gelu"
    mm_projector: Optional[str] = None  # LLaVA / INF-LLaVA stage-1 mm_projector.bin: projector (+ DEM) weights
    llm: LLMConfig = field(default_factory=LLMConfig)
    # a released transformers LLaVA / LLaVA-NeXT directory (llava-hf layout): the blocks above are built from it
    # (under the experiment's own settings) and all weights come from it (model/llava_hf.py)
    from_hf: Optional[str] = None
    tokenizer: Optional[str] = None  # tokenizer directory; defaults to llm.path
    image_token: str = "<image>"
    # torch.compile each LLM decoder layer and each vision-tower block (regional, model/blocks.py); generation
    # stays eager. On a CPU it needs a C++ compiler; the console reports the compile time after the second step
    compile: bool = False


@dataclass
class BuiltinDataConfig:
    root: str = "data/generated/shapes"
    seed: int = 0
    image_size: int = 64
    num_train: int = 4000
    num_val: int = 200


@dataclass
class SourceConfig:
    """One source of a training mixture (`data.sources`, datamodules/mixture.py): a LLaVA JSON / JSONL file and
    the samples an epoch takes from it: one of `weight` (the weighted sources share the sum of their records in
    proportion), `repeat` (its records times r: 2 = each twice, 0.5 = half, drawn anew each epoch) or
    `num_samples`; none: repeat 1."""

    file: str = ""
    # litdata shards (a folder or an object-storage URL; python -m tools.write_shards) instead of `file`:
    # read as the run goes, records checked as they are read (datamodules/shards.py)
    shards: Optional[str] = None
    name: Optional[str] = None  # logged as data/samples/<name>; None: the file's name without its extension
    image_folder: Optional[str] = None  # None: data.image_folder
    weight: Optional[float] = None
    repeat: Optional[float] = None
    num_samples: Optional[int] = None
    template: Optional[str] = None  # None: data.template
    system_prompt: Optional[str] = None  # None: data.system_prompt


def source_name(source) -> str:
    """A source's name: `name`, else its file's (or shards folder's) name without the extension."""
    return source.name or (source.file or source.shards or "").rstrip("/").rsplit("/", 1)[-1].split(".", 1)[0]


@dataclass
class DataConfig:
    builtin: Optional[BuiltinDataConfig] = None  # generate the built-in shapes dataset instead of reading files
    train_json: Optional[str] = None  # LLaVA-format JSON (a list, or JSON Lines when it ends in .jsonl)
    sources: List[SourceConfig] = field(default_factory=list)  # a mixture instead of train_json (SourceConfig)
    val_json: Optional[str] = None
    image_folder: Optional[str] = None  # record image paths are relative to it
    val_fraction: float = 0.0  # held out from train_json when there is no val_json
    template: Optional[str] = None  # None: "plain" for align, the tokenizer's chat template for sft
    system_prompt: Optional[str] = None  # None: the template's default
    # True: <image> is placed by the template's reference rule (LLaVA's preprocess_multimodal for plain,
    # vicuna_v1, llama3; LLaVA-NeXT's for chatml, chat_template), so ids match the reference's; False: it stays
    # where the text puts it (interleaved text). datamodules/templates.py PLACEMENTS
    image_first: bool = True
    max_length: int = 2048  # tokens, image tokens included; longer records are errors (or skipped)
    pad_to_square: bool = False  # pad with the mean colour before resizing (LLaVA-1.5 SFT)
    # a record with several images (`image: [paths]`), with a tiling (AnyRes): "base" takes each at its base view
    # and one newline (LLaVA-OneVision's rule), "tiles" tiles each as a single image (datamodules/image_tokens.py)
    multi_image: str = "base"
    video_frames: int = 32  # `video: path` records: at most this many frames, sampled uniformly (datamodules/video.py)
    video_pool: bool = True  # with a tiling: each frame's map pooled 2x2 (LLaVA-OneVision: 196 tokens at 384 px)
    # text after a video's placeholder with {duration}, {frames}, {times} (the sampled frames' times) filled in
    video_time_prompt: Optional[str] = None
    batch_size: int = 16  # per device, in samples
    val_batch_size: Optional[int] = None  # None: batch_size
    num_workers: int = 0
    persistent_workers: bool = True  # keep DataLoader workers alive between epochs (with num_workers > 0)
    group_by_length: bool = False  # batches grouped by modality and length (LLaVA's modality_length_grouped)
    packing: bool = False  # pack training samples into rows of max_length (datamodules/packing.py)
    on_error: str = "raise"  # raise | skip (bad records and unreadable images are dropped and counted)
    # A shards source's records are checked as they are read: bad ones are skipped and counted, up to this
    # fraction of the samples an epoch takes from the source; above it the run stops naming the record
    max_bad_fraction: float = 0.001
    images_outside_folder: bool = False  # allow record image paths that resolve outside image_folder
    # The record index of each data file (offsets, token counts, check verdicts; datamodules/record_index.py):
    # None keeps it in .vlm_index/ beside the file, or in ~/.cache/vlm-lab/index when that is not writable.
    index_dir: Optional[str] = None
    index_workers: Optional[int] = None  # processes that build an index (None: every core this process may use)


@dataclass
class OptimConfig:
    lr: float = 1e-3
    lr_per_part: Dict[str, float] = field(default_factory=dict)  # e.g. {llm: 2e-5}
    weight_decay: float = 0.0  # AdamW; never on biases and norm weights
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    # AdamW's fused kernel (one kernel per step for all parameters, on CUDA and CPU alike); where the parameters'
    # device has none, the multi-tensor (foreach) one. False: torch's default choice
    fused: bool = False
    # step each parameter inside backward as soon as its gradient is complete, freeing it at once (no step holds
    # every gradient): one device, no gradient accumulation, no clipping, no fp16 loss scaling
    # (lit_modules/optim_in_backward.py)
    in_backward: bool = False
    # AdamW's two moment states: fp32 (torch's AdamW, 8 bytes per trained parameter) | 8bit (bitsandbytes'
    # AdamW8bit, block-quantized, about 2 bytes; the `lowmem` extra). AdamW's trajectory up to the states' rounding;
    # one device or DDP (lit_modules/optimizer.py)
    states: str = "fp32"
    warmup_ratio: float = 0.03  # share of the total steps with linear warm-up
    min_lr_ratio: float = 0.0  # cosine floor as a share of each group's peak lr
    # a resumed run whose length changed (max_steps, max_epochs, world size, batch): refuse | cosine | constant
    extend: str = "refuse"


@dataclass
class EvalSetConfig:
    """A benchmark file: JSON list or JSONL of {"id", "image"? (relative to image_folder), "question" (the
    whole prompt the model sees), "reference" (what `metric` compares with; see metrics/)}."""

    name: str = "eval"
    file: str = ""
    image_folder: Optional[str] = None
    metric: str = "exact_match"  # a METRICS name: vqa_accuracy, exact_match, multiple_choice, pope, anls, cider
    options: Dict[str, Any] = field(default_factory=dict)  # the metric's options (e.g. {protocol: textvqa})
    prompt_suffix: str = ""  # appended to every question, e.g. "\nAnswer the question using a single word or phrase."
    max_samples: Optional[int] = None  # the first N records (None: all)
    max_new_tokens: int = 16
    batch_size: int = 8


@dataclass
class EvalConfig:
    max_new_tokens: int = 16
    num_logged_samples: int = 4  # validation images with question, answer and output in TensorBoard
    max_generate_batches: Optional[int] = None  # None: exact-match over the whole validation set
    sets: List[EvalSetConfig] = field(default_factory=list)  # benchmark files scored during and after training
    every_n_steps: Optional[int] = None  # score the sets every N steps (None: only when training ends)


@dataclass
class CheckpointConfig:
    monitor: str = "val/loss"
    mode: str = "min"
    save_top_k: int = 1
    every_n_train_steps: Optional[int] = None


@dataclass
class LoggingConfig:
    root: str = "runs"
    # The run directory's name under <root>/<name>/; None: the command-line overrides the run started
    # with (`encoder=sam_vit_b,lr=3e-4`), or `defaults` (experiment/run_dir.py)
    run_name: Optional[str] = None


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    seed: int = 0
    stage: str = "sft"  # align | sft: what trains, the default template, the built-in files (foundation/stages.py)
    trainable: Optional[List[str]] = None  # None: the stage's default parts
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: Dict[str, Any] = field(default_factory=dict)  # lightning.Trainer keyword arguments
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    resume: Optional[str] = None  # checkpoint path, or "auto" for the newest last.ckpt of this experiment
    init_from: Optional[str] = None  # load module weights (e.g. an alignment run) before training
    # Set by load_config, not by hand: the command-line `key=value` overrides the run started with
    # (shown in TensorBoard's HPARAMS tab; the build never reads it).
    overrides: List[str] = field(default_factory=list)
