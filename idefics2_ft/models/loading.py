"""``load_idefics2`` (quantization, dtype, attention), ``apply_peft`` (LoRA presets, k-bit preparation).

QLoRA is LoRA on a base loaded with a 4-bit ``BitsAndBytesConfig``: one code path, two settings.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoProcessor, BitsAndBytesConfig, Idefics2ForConditionalGeneration

from idefics2_ft.models.architecture import COMPONENTS, lora_target_regex
from idefics2_ft.models.chat_template import IDEFICS2_CHAT_TEMPLATE
from idefics2_ft.models.recompute import connector_trains, recompute_connector

log = logging.getLogger(__name__)


def resolve_dtype(name: str, on_gpu: bool | None = None) -> torch.dtype:
    """``auto`` is bfloat16 on CUDA and float32 on the CPU (CPU bf16 matmuls are slow)."""
    if name == "auto":
        on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
        return torch.bfloat16 if on_gpu else torch.float32
    return getattr(torch, name)


def build_quantization_config(peft_cfg: DictConfig, compute_dtype: torch.dtype) -> BitsAndBytesConfig | None:
    """NF4 (or FP4) with optional double quantization; ``skip_modules`` stay in full precision."""
    if peft_cfg.quantize is None:
        return None
    storage = resolve_dtype(peft_cfg.quant_storage) if peft_cfg.quant_storage else torch.uint8
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=peft_cfg.quantize,
        bnb_4bit_use_double_quant=peft_cfg.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=storage,
        llm_int8_skip_modules=list(peft_cfg.skip_modules),
    )


def load_processor(path: str, data_cfg: DictConfig, revision: str | None = None):
    """``AutoProcessor.from_pretrained`` with the image settings of ``data.*`` and the chat template.

    Args:
        path: a Hub id or a folder holding the processor files.
        data_cfg: the ``data`` group: ``do_image_splitting``, ``longest_edge``, ``shortest_edge``.
        revision: the Hub revision (``model.revision``).

    Returns:
        An ``Idefics2Processor`` whose chat template is the published Idefics2 one.
    """
    processor = AutoProcessor.from_pretrained(path, revision=revision)
    image_processor = processor.image_processor
    image_processor.do_image_splitting = data_cfg.do_image_splitting
    sizes = {"longest_edge": data_cfg.longest_edge, "shortest_edge": min(data_cfg.shortest_edge, data_cfg.longest_edge)}
    image_processor.size = type(image_processor.size)(**sizes)  # a dict or transformers' SizeDict
    if processor.chat_template is None:
        log.info("The processor at %s has no chat template: using the published Idefics2 template.", path)
        processor.chat_template = IDEFICS2_CHAT_TEMPLATE
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.unk_token
    return processor


def load_idefics2(
    path: str,
    model_cfg: DictConfig,
    peft_cfg: DictConfig,
    device_map: dict | str | None = None,
) -> Idefics2ForConditionalGeneration:
    """Load Idefics2 from the Hub or a folder, 4-bit quantized when ``peft.quantize`` is set.

    Args:
        path: a Hub id or a folder (``resolve_base`` gives it).
        model_cfg: the ``model`` group: revision, dtype, attention implementation.
        peft_cfg: the ``peft`` group: quantization type, storage, and the modules kept unquantized.
        device_map: passed to ``from_pretrained``; None keeps the model on the CPU until Lightning moves it.

    Returns:
        The model, in eval mode as ``from_pretrained`` returns it (``train`` puts it in train mode).
    """
    dtype = resolve_dtype(model_cfg.dtype)
    quantization = build_quantization_config(peft_cfg, dtype)
    if quantization is not None and device_map is None and torch.cuda.is_available():
        # bitsandbytes quantizes as the weights reach the GPU: each process loads onto its own,
        # which Lightning has not selected yet at this point (LOCAL_RANK is set by the launcher).
        device_map = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    model = Idefics2ForConditionalGeneration.from_pretrained(
        path,
        revision=model_cfg.revision,
        dtype=dtype,
        quantization_config=quantization,
        attn_implementation=model_cfg.attn_implementation,
        device_map=device_map,
    )
    model.config.use_cache = False  # training; generation turns it back on per call
    return model


def _prepare_kbit(model: torch.nn.Module, gradient_checkpointing: bool) -> None:
    """What k-bit training needs, without peft's blanket fp32 upcast of every non-4-bit weight.

    ``prepare_model_for_kbit_training`` casts every float weight (vision tower included) to fp32,
    which costs gigabytes on the 8B model. Frozen weights stay in the compute dtype here: the
    norms already upcast internally and LoRA weights are created in fp32 by PEFT.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    if gradient_checkpointing:
        # The text embeddings' output requires grad, as peft's preparation does. Not the vision
        # tower's: transformers' ``enable_input_require_grads`` hooks every sub-model's embeddings,
        # and the frozen 400 M-parameter vision tower would then be recomputed and back-propagated
        # through on every step for gradients nothing uses (no adapter sits below it).
        model.get_input_embeddings().register_forward_hook(_outputs_require_grad)


def _outputs_require_grad(module: torch.nn.Module, inputs, output: torch.Tensor) -> None:
    output.requires_grad_(True)


def apply_peft(
    model: Idefics2ForConditionalGeneration,
    peft_cfg: DictConfig,
    gradient_checkpointing: bool,
    checkpoint_connector: bool | None = None,
):
    """Attach LoRA / DoRA adapters (or unfreeze everything for ``full``) and return the model.

    Args:
        model: the base, as ``load_idefics2`` returns it (4-bit for QLoRA).
        peft_cfg: the ``peft`` group: method, rank, alpha, dropout, target preset, modules to save.
        gradient_checkpointing: recompute the decoder and encoder layers in the backward
            (non-reentrant, with input gradients so that adapters below a frozen layer still learn).
        checkpoint_connector: recompute the connector's projection and perceiver in the backward
            (``recompute_connector``); None: when anything in the connector trains.

    Returns:
        The PEFT model (the same model unwrapped for ``peft=full``).
    """
    if gradient_checkpointing:
        # use_reentrant=False: the re-entrant variant drops gradients of inputs that do not require
        # grad, which is every input of a frozen PEFT base.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.disable_input_require_grads()  # it hooks every embedding, the vision tower's too (see _prepare_kbit)
    if peft_cfg.method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return _maybe_recompute_connector(model, checkpoint_connector)
    from peft import LoraConfig, get_peft_model

    _prepare_kbit(model, gradient_checkpointing)
    lora = LoraConfig(
        r=peft_cfg.r,
        lora_alpha=peft_cfg.alpha,
        lora_dropout=peft_cfg.dropout,
        target_modules=lora_target_regex(peft_cfg.target),
        modules_to_save=list(peft_cfg.modules_to_save) or None,
        use_dora=peft_cfg.method == "dora",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    # For a base that is not quantized, peft prepares checkpointing with the same hooks again.
    model.disable_input_require_grads()
    return _maybe_recompute_connector(peft_model, checkpoint_connector)


def start_from_adapter(
    model: Idefics2ForConditionalGeneration,
    adapter_dir: str,
    gradient_checkpointing: bool,
    checkpoint_connector: bool | None = None,
    reference: bool = True,
):
    """The base with a trained adapter (an SFT run's ``adapter/``) to go on training, and beside it,
    frozen, the same adapter as ``reference`` (preference tuning's reference: no second model).

    The policy's adapter (``default``) is the saved one with its own rank, alpha and targets (the
    ``peft.*`` keys do not apply); the reference adapter is never trained and never saved.

    Returns:
        The PEFT model, ``default`` active and trainable.
    """
    from peft import PeftModel

    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.disable_input_require_grads()
    _prepare_kbit(model, gradient_checkpointing)
    peft_model = PeftModel.from_pretrained(model, adapter_dir, adapter_name="default", is_trainable=True)
    if reference:
        peft_model.load_adapter(adapter_dir, adapter_name="reference", is_trainable=False)
        peft_model.base_model.set_adapter("default")  # active and trainable; the reference frozen
    model.disable_input_require_grads()
    return _maybe_recompute_connector(peft_model, checkpoint_connector)


def _maybe_recompute_connector(model: torch.nn.Module, wanted: bool | None) -> torch.nn.Module:
    trains = connector_trains(model)
    if wanted if wanted is not None else trains:
        if not trains:
            log.info("model.checkpoint_connector=true, but nothing in the connector trains: nothing to recompute")
        recompute_connector(model)
    return model


def trainable_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Trainable parameter counts per component.

    Args:
        model: any Idefics2, wrapped by PEFT or not.

    Returns:
        ``{"vision": n, "connector": n, "text": n, "head": n, "total": n}``, with ``"other"`` when
        anything outside those trains.
    """
    counts: dict[str, int] = defaultdict(int)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        name = name.removeprefix("base_model.model.")
        component = next((c for c, prefix in COMPONENTS if name.startswith(prefix)), "other")
        counts[component] += param.numel()
    out = {c: counts.get(c, 0) for c, _ in COMPONENTS}
    if counts.get("other"):
        out["other"] = counts["other"]
    out["total"] = sum(counts.values())
    return out


def non_finite_parameters(model_or_state: torch.nn.Module | dict[str, torch.Tensor]) -> list[str]:
    """Names of the trainable parameters (or state-dict tensors) holding a NaN or an infinity.

    Under FSDP a parameter is a DTensor and only this rank's shard is checked.
    """
    if isinstance(model_or_state, torch.nn.Module):
        items = [(n, p) for n, p in model_or_state.named_parameters() if p.requires_grad]
    else:
        items = list(model_or_state.items())
    bad = []
    for name, tensor in items:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        if local.is_floating_point() and not bool(torch.isfinite(local.detach()).all()):
            bad.append(name)
    return bad


@torch.no_grad()
def frozen_fingerprint(model: torch.nn.Module) -> dict[str, int]:
    """An exact integer sum per frozen parameter: two fingerprints differ if any frozen weight was
    updated (``train/frozen_base_unchanged``). Float weights are summed as their bit patterns in
    64-bit words (wrapping, so exact), which takes one pass, copies nothing (a second or two on the
    8B) and gives the same number on any device: a CPU sum before training equals a GPU sum after.

    Packed 4-bit weights give the sum of their 4-bit codes (from a histogram of their bytes), which
    does not depend on how the codes are paired into bytes: bitsandbytes' CPU kernel repacks them
    on its first forward in eval mode. Sharded parameters (FSDP's DTensors) are skipped: their
    layout changes when the strategy shards them.
    """
    out = {}
    nibbles = None
    for name, param in model.named_parameters():
        if param.requires_grad or hasattr(param, "to_local"):
            continue
        flat = param.detach().reshape(-1)
        if flat.dtype == torch.uint8:  # two 4-bit codes per byte
            if nibbles is None or nibbles.device != flat.device:
                codes = torch.arange(256, device=flat.device)
                nibbles = (codes & 15) + (codes >> 4)
            out[name] = int((torch.bincount(flat, minlength=256) * nibbles).sum())
        else:
            bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]
            try:
                out[name] = int(flat.view(torch.int64).sum())  # whole 64-bit words: fastest
            except RuntimeError:  # a size or storage offset that is not a whole number of words
                out[name] = int(flat.view(bits).sum(dtype=torch.int64))
    return out


@torch.no_grad()
def dequantized_weights(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The weight of every 4-bit linear layer, dequantized as its training forward does: ``{module name: W}``."""
    import bitsandbytes as bnb

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = module.weight
            out[name] = bnb.functional.dequantize_4bit(weight.data, weight.quant_state).to("cpu", dtype)
    return out


def load_full_precision(
    path: str, model_cfg: DictConfig, peft_cfg: DictConfig, dtype: torch.dtype, dequantized: bool = True
) -> Idefics2ForConditionalGeneration:
    """The base in ``dtype`` with no quantization, to merge an adapter into or evaluate it on.

    With ``dequantized`` and a 4-bit ``peft.quantize``, the layers that training held in 4 bits get
    the dequantized NF4 weights the adapter was trained against, instead of the original weights
    (which differ from them by the quantization error).
    """
    full_cfg = OmegaConf.merge(model_cfg, {"dtype": str(dtype).removeprefix("torch.")})
    no_quant = OmegaConf.merge(peft_cfg, {"quantize": None})
    if not dequantized or peft_cfg.quantize is None:
        return load_idefics2(path, full_cfg, no_quant)
    quantized = load_idefics2(path, full_cfg, peft_cfg)  # as trained
    weights = dequantized_weights(quantized, dtype)
    del quantized
    model = load_idefics2(path, full_cfg, no_quant)
    for name, weight in weights.items():
        model.get_submodule(name).weight.data.copy_(weight)
    log.info(
        "Full-precision base with the dequantized %s weights of %d layers.", peft_cfg.quantize.upper(), len(weights)
    )
    return model
