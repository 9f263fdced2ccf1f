"""Dataclass schemas under every Hydra group. YAML files extend them; a typo or a wrong type fails
when the config is composed, naming the full key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from idefics2_ft.config.choices import (
    Attention,
    Backend,
    DataFormat,
    DataSource,
    DType,
    EvalPreset,
    GroupBy,
    LoggerType,
    LoraTarget,
    MergeInto,
    Metric,
    Objective,
    OnBadSample,
    Optimizer,
    PeftMethod,
    Precision,
    QuantStorage,
    QuantType,
    Reference,
    Scheduler,
    Strategy,
    ZeroStage,
    choice,
)


@dataclass
class TinyConfig:
    """The tiny random-init Idefics2 (``model.name_or_path=tiny``), built from a seed and cached."""

    seed: int = 0
    # the vision tower: images of image_size px cut into patch_size px patches
    image_size: int = 64
    patch_size: int = 8
    vision_hidden: int = 128
    vision_layers: int = 2

    # the text model (every width a multiple of 64, for the 4-bit CPU kernels)
    text_hidden: int = 128
    text_layers: int = 2

    # the perceiver connector: n_latents image tokens per image
    n_latents: int = 8
    resampler_depth: int = 1

    # the random init: weights drawn at initializer_range, perceiver latents at latent_std
    initializer_range: float = 0.1
    latent_std: float = 1.0

    # Stage 1, a stand-in for a pretrained checkpoint, on the training images without their
    # questions (0 steps skips each part): (a) the vision tower and the connector learn to classify
    # each image's attributes (as SigLIP is pretrained before Idefics2 sees it), then (b) the whole
    # base learns to describe the images ("it is red, not blue."). The task itself is left to stage 2.
    vision_pretrain_steps: int = 0
    pretrain_steps: int = 0
    pretrain_lr: float = 2e-3
    pretrain_batch_size: int = 16
    cache_dir: str = "outputs/.tiny_base"


@dataclass
class ModelConfig:
    name_or_path: str = MISSING  # a Hub id, a local folder, or "tiny"
    revision: str | None = None
    dtype: str = choice("auto", DType)  # compute dtype: auto is bf16 on CUDA, fp32 on the CPU
    attn_implementation: str = choice("sdpa", Attention)
    gradient_checkpointing: bool = False
    # recompute the connector's projection (in chunks of patches) and perceiver in the backward instead
    # of keeping their activations; null: on when anything in the connector trains (docs/memory.md)
    checkpoint_connector: bool | None = None
    # start from a trained adapter: an SFT run folder (its adapter/) or an adapter folder; the run trains
    # it further (its rank and targets, not peft.*), and objective=dpo takes it as the reference
    adapter: str | None = None
    tiny: TinyConfig = field(default_factory=TinyConfig)


@dataclass
class PeftConfig:
    method: str = choice("lora", PeftMethod)
    quantize: str | None = choice("nf4", QuantType, optional=True)  # None: no 4-bit base (not QLoRA)
    double_quant: bool = True
    # None: uint8, or the compute dtype under strategy=fsdp (automatic)
    quant_storage: str | None = choice(None, QuantStorage, optional=True)
    # Modules kept in full precision when the base is quantized (as published 4-bit Idefics2 does).
    # transformers 5 matches these from the start of the module name, up to a dot.
    skip_modules: list[str] = field(default_factory=lambda: ["model.vision_model", "model.connector", "lm_head"])
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target: str = choice("text+connector", LoraTarget)
    modules_to_save: list[str] = field(default_factory=list)


@dataclass
class MixtureSource:
    """One source of ``data.mixture``. A key left out (null) comes from ``data.*``."""

    name: str = MISSING  # the source's name in the metric keys: val/<name>/<metric>, data/samples/<name>
    source: str | None = choice(None, DataSource, optional=True)  # null: hub when path is set, else data.source
    path: str | None = None
    subset: str | None = None
    format: str | None = choice(None, DataFormat, optional=True)
    # the sampling probability of this source; or leave it out and give max_samples (or neither):
    # such sources share what the weights leave, in proportion to their sizes
    weight: float | None = None
    max_samples: int | None = None  # this source's training records (data.max_train_samples for one source)
    max_val_samples: int | None = None
    train_split: str | None = None
    val_split: str | None = None
    train_file: str | None = None
    val_file: str | None = None
    image_dir: str | None = None
    question_column: str | None = None
    answer_column: str | None = None
    image_column: str | None = None
    id_column: str | None = None
    type_column: str | None = None
    system_prompt: str | None = None
    metric: str | None = choice(None, Metric, optional=True)


@dataclass
class DataConfig:
    source: str = choice(MISSING, DataSource)
    # hub / docvqa: a Hub dataset id, a local datasets folder (save_to_disk), a folder of data files
    # (train.jsonl, validation.parquet, ...), or one JSON / JSONL / parquet file
    path: str | None = None
    subset: str | None = None  # the Hub dataset's configuration (a Cauldron subset: docvqa, chartqa, ...)
    # how rows are read (docs/your-data.md): auto detects it from the columns; qa | trl | cauldron | llava
    format: str = choice("auto", DataFormat)
    # several sources, sampled by weight (docs/your-data.md#mixtures); null: the one source above
    mixture: list[MixtureSource] | None = None
    # read a Hub dataset or data files as a stream (nothing downloads whole); shuffling and
    # data.group_by then work within data.buffer_size records (datasets' shuffle buffer, held in
    # memory with their images undecoded); null reads a stream in its stored order, unshuffled
    streaming: bool = False
    buffer_size: int | None = 1000
    train_split: str = "train"
    val_split: str = "validation"
    train_file: str | None = None  # source=jsonl: a .jsonl / .json / .parquet file, in any format
    val_file: str | None = None
    image_dir: str | None = None  # where relative image paths start; null: the data file's folder
    question_column: str = "question"  # format=qa
    answer_column: str = "answers"
    image_column: str = "image"
    id_column: str | None = None
    type_column: str | None = None
    system_prompt: str | None = None
    # Image processing (every model): splitting gives 4 crops + the image, 5x the image tokens.
    do_image_splitting: bool = False
    longest_edge: int = 980  # images are resized so their longest edge is at most this (pixels)
    shortest_edge: int = 378
    max_train_samples: int | None = None
    max_val_samples: int | None = None
    max_length: int | None = 2048
    on_bad_sample: str = choice("skip", OnBadSample)
    # an answer that max_length cuts before its <end_of_utterance>: skipped and counted, or trained on
    train_on_truncated: bool = False
    batch_size: Any = 4  # per device; auto: the largest the plan fits in the device's memory (docs/memory.md)
    eval_batch_size: int = 8
    num_workers: int | None = None  # loader workers; null: up to 4 per GPU rank with cores to spare, 0 on the CPU
    # batches of alike records: none | length (tokens) | aspect (image count and size, then tokens)
    group_by: str = choice("none", GroupBy)
    # the validation score: accuracy (= exact_match), anls, vqa_accuracy, relaxed_accuracy, multiple_choice,
    # letter_match (each as lmms-eval scores it: docs/evaluate-and-export.md#metrics-identical-to-lmms-eval)
    metric: str = choice("accuracy", Metric)
    # rows are preference pairs (chosen, rejected): set from objective=dpo, not by hand
    pairs: bool = False


@dataclass
class OptimConfig:
    optimizer: str = choice("auto", Optimizer)  # auto: paged 8-bit AdamW on CUDA, AdamW on the CPU
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 50
    scheduler: str = choice("cosine", Scheduler)
    min_lr_ratio: float = 0.0


@dataclass
class StrategyConfig:
    name: str = choice("auto", Strategy)  # conf/strategy/*.yaml name the variants
    process_group_backend: str | None = choice(None, Backend, optional=True)  # None: nccl on CUDA, gloo on the CPU
    find_unused_parameters: bool = False  # ddp
    reshard_after_forward: bool = True  # fsdp: free gathered layers after forward (ZeRO-3-like); false: ZeRO-2-like
    zero_stage: int = choice(2, ZeroStage)  # deepspeed: 2 (optimizer state + gradients sharded), 3 (+ weights)
    offload_optimizer: bool = False  # deepspeed: optimizer state in CPU memory
    offload_params: bool = False  # deepspeed ZeRO-3: weights in CPU memory
    bucket_size: int = 200_000_000  # deepspeed: elements per communication bucket


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    precision: str = choice("auto", Precision)  # auto: bf16-mixed on CUDA, 32-true on CPU
    max_steps: int = 1000
    accumulate_grad_batches: int = 1
    # Set it to keep the global batch fixed whatever the devices and nodes: accumulation becomes
    # global_batch_size / (data.batch_size x devices x num_nodes), which must be a whole number.
    global_batch_size: int | None = None
    gradient_clip_val: float | None = 1.0
    val_check_interval: Any = None  # steps between validations; None: once at the end
    limit_val_batches: Any = None
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 200  # last.ckpt is also written when training ends
    checkpoint_every_n_minutes: float | None = 30.0  # and this often by the clock: a kill loses at most this
    keep_step_checkpoints: bool = False  # also keep each as checkpoints/epoch=E-step=S.ckpt (last.ckpt is the newest)
    enable_progress_bar: bool = True  # a bar on a terminal; where stdout is a file, one line per progress_every_s
    progress_every_s: float = 30.0
    deterministic: bool = False


@dataclass
class EvalConfig:
    max_new_tokens: int = 16
    # how `idefics2-ft evaluate` asks and scores the questions: training (as the run trained, data.metric,
    # max_new_tokens above) or a harness's preset (idefics2_ft/presets.py: docvqa_lmms, ai2d_vlmevalkit, ...)
    preset: str = choice("training", EvalPreset)
    at_end: bool = True  # validate (loss + generation metrics) once after the last step
    before_training: bool = False  # also validate the model as loaded, before any step


@dataclass
class ObjectiveConfig:
    """What the run optimises: sft (the assistant's tokens' NLL) or dpo (preference pairs; docs/preference-tuning.md)."""

    name: str = choice("sft", Objective)
    # dpo: the losses, summed with loss_weights (one each; null: 1 each): sigmoid (DPO), ipo, hinge,
    # robust, bco_pair, sft (the chosen answer's NLL), and the reference-free simpo and orpo
    loss: list[str] = field(default_factory=lambda: ["sigmoid"])
    loss_weights: list[float] | None = None
    beta: float = 0.1
    # auto: the adapter the run starts from (model.adapter), else the base; adapter, base, or none
    reference: str = choice("auto", Reference)
    label_smoothing: float = 0.0  # cDPO / robust DPO / SimPO: the probability a pair's label is flipped
    simpo_gamma: float = 0.5
    orpo_lambda: float | None = None  # null: beta


@dataclass
class PlanConfig:
    # the device memory data.batch_size=auto plans against; null: the CUDA device's, or on the CPU
    # what Linux says is available
    gpu_gb: float | None = None


@dataclass
class LoggerConfig:
    type: str = choice("csv", LoggerType)
    project: str = "idefics2-ft"
    entity: str | None = None
    log_model: bool = False  # W&B: upload the adapter as a model artifact at the end


@dataclass
class HubConfig:
    repo_id: str | None = None  # "user/name"; required to push
    private: bool = True
    revision: str | None = None  # a branch to push to (created if missing); None: main
    adapter_repo_id: str | None = None  # with export.with_adapter: where the adapter goes; None: <repo_id>-adapter
    commit_message: str = "Upload Idefics2 fine-tuned with idefics2-ft"


@dataclass
class ExportConfig:
    at_end: bool = False  # merge, check and save to export.out_dir when training ends
    push_to_hub: bool = False  # ... and push it (the token is checked before training starts)
    adapter_only: bool = False  # export just the PEFT adapter (with its own card), no merge
    with_adapter: bool = False  # both: the merged model and, beside it (<out_dir>-adapter), the adapter
    out_dir: str | None = None  # default: <run_dir>/export
    dtype: str = choice("auto", DType)  # the full-precision base to merge into: auto = bf16 on CUDA, fp32 on the CPU
    # QLoRA: merge into the dequantized NF4 weights the adapter was trained against (the export then
    # answers as the trained model did), or into the original full-precision base weights
    merge_into: str = choice("dequantized", MergeInto)
    parity_samples: int = 4  # validation records the merged and unmerged models must agree on
    parity_atol: float | None = None  # max |logit difference|; None: 1e-3 in fp32, 0.1 in bf16/fp16
    # the answer check: the model as trained (adapter on its 4-bit base) and the merged model answer this many
    # validation questions (greedy, as evaluate does); export_report.json and the card say how many answers are
    # the same and the two scores. It warns, never refuses. 0: no check. 200: one differing answer moves 0.5 points
    agreement_questions: int = 200
    max_shard_size: str = "2GB"
    hub: HubConfig = field(default_factory=HubConfig)


@dataclass
class DebugConfig:
    show_labels: bool = False  # print the first batch with learned tokens marked, then exit
    # Stop with an error when this optimizer step starts: rehearse a crash (last.ckpt is written
    # on the way out) and `resume=true` on your cluster before a long run depends on it.
    crash_at_step: int | None = None
    # Send this process SIGTERM (or `PHASE:SIGINT`) when it enters PHASE: rehearse a stop there and see
    # what it leaves (the fault tier does, for each phase: `checks`, `model loading`, `fit`, ...).
    stop_at: str | None = None


@dataclass
class TrainConfig:
    name: str = "run"
    run_dir: str = MISSING
    seed: int = 0
    resume: bool = False  # continue the run in run_dir from checkpoints/last.ckpt
    overwrite: bool = False  # replace the run in run_dir (its checkpoints, adapter, metrics, logs, exports)
    # keys a resume may change although they make it another experiment (model.*, peft.*, data.*, seed,
    # trainer.precision): resume_changes=[data.train_file] accepts that one, and the change is recorded
    resume_changes: list[str] = field(default_factory=list)
    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)


def register_configs() -> None:
    """Register the schemas so that ``conf/*.yaml`` can extend them (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    for group, node in (
        ("model", ModelConfig),
        ("peft", PeftConfig),
        ("data", DataConfig),
        ("optim", OptimConfig),
        ("trainer", TrainerConfig),
        ("logger", LoggerConfig),
        ("strategy", StrategyConfig),
        ("objective", ObjectiveConfig),
    ):
        cs.store(group=group, name=f"{group}_schema", node=node)
