"""LoRA presets, per-component trainable counts (tiny and the real 8B shapes), QLoRA weights."""

import bitsandbytes as bnb
import pytest
import torch
from omegaconf import OmegaConf

from idefics2_ft.config import PeftConfig
from idefics2_ft.demo import ensure_tiny_base
from idefics2_ft.models import apply_peft, load_idefics2, trainable_parameters
from idefics2_ft.models.reference import idefics2_8b_on_meta
from tests.helpers import ROOT


def peft_cfg(**kw):
    return OmegaConf.structured(PeftConfig(**kw))


R = 8
# Hand-derived from the published idefics2-8b shapes: LoRA on Linear(i, o) adds r * (i + o).
MISTRAL_LAYER = 2 * (4096 + 4096) + 2 * (4096 + 1024) + 2 * (4096 + 14336) + (14336 + 4096)
TEXT_8B = 32 * R * MISTRAL_LAYER
PERCEIVER_LAYER = (4096 + 1536) + 2 * (4096 + 384) + (1536 + 4096) + 2 * (4096 + 16384) + (16384 + 4096)
CONNECTOR_8B = R * (2 * (1152 + 14336) + (14336 + 4096)) + 3 * R * PERCEIVER_LAYER
VISION_8B = 27 * R * (4 * (1152 + 1152) + 2 * (1152 + 4304))


@pytest.mark.parametrize(
    "target, expected",
    [
        ("text", {"vision": 0, "connector": 0, "text": TEXT_8B, "head": 0}),
        ("text+connector", {"vision": 0, "connector": CONNECTOR_8B, "text": TEXT_8B, "head": 0}),
        ("all", {"vision": VISION_8B, "connector": CONNECTOR_8B, "text": TEXT_8B, "head": 0}),
    ],
)
def test_lora_presets_on_the_real_8b_shapes(target, expected):
    model = apply_peft(idefics2_8b_on_meta(), peft_cfg(r=R, quantize=None, target=target), gradient_checkpointing=False)
    counts = trainable_parameters(model)
    assert {k: counts[k] for k in expected} == expected
    assert counts["total"] == sum(expected.values())
    assert TEXT_8B == 20_971_520  # the well-known figure for r=8 on all Mistral-7B linears


def test_modules_to_save_puts_the_head_in_training():
    model = apply_peft(
        idefics2_8b_on_meta(),
        peft_cfg(r=R, quantize=None, target="text", modules_to_save=["lm_head"]),
        gradient_checkpointing=False,
    )
    assert trainable_parameters(model)["head"] == 32003 * 4096


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    from tests.helpers import TINY_RUN, compose_config

    cache = tmp_path_factory.mktemp("tiny")
    # LoRA on the connector too (as docvqa_qlora has it): its gradients cross every 4-bit text layer
    overrides = [*TINY_RUN, f"model.tiny.cache_dir={cache}", f"run_dir={cache}/run", "peft.target=text+connector"]
    cfg = compose_config(overrides)
    return cfg, str(ensure_tiny_base(cfg))


def test_qlora_quantizes_the_text_model_only(tiny_base):
    cfg, path = tiny_base
    model = load_idefics2(path, cfg.model, cfg.peft)
    text_linears = [
        m
        for n, m in model.named_modules()
        if n.startswith("model.text_model.layers") and isinstance(m, torch.nn.Linear)
    ]
    assert text_linears and all(isinstance(m, bnb.nn.Linear4bit) for m in text_linears)
    for prefix in ("model.vision_model", "model.connector", "lm_head"):
        linears = [m for n, m in model.named_modules() if n.startswith(prefix) and isinstance(m, torch.nn.Linear)]
        assert linears and not any(isinstance(m, bnb.nn.Linear4bit) for m in linears), prefix
    weight = text_linears[0].weight
    assert weight.quant_state.quant_type == "nf4" and weight.dtype == torch.uint8


def test_an_optimizer_step_moves_lora_and_leaves_the_4bit_base_unchanged(tiny_base, processor):
    from idefics2_ft.data.collator import Idefics2Collator
    from idefics2_ft.models import load_processor

    cfg, path = tiny_base
    model = apply_peft(load_idefics2(path, cfg.model, cfg.peft), cfg.peft, gradient_checkpointing=True)
    counts = trainable_parameters(model)
    assert counts["vision"] == 0 and counts["head"] == 0 and counts["text"] > 0 and counts["connector"] > 0
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n for n in lora)
    from PIL import Image

    proc = load_processor(path, cfg.data)
    record = {
        "images": [Image.new("RGB", (64, 64), "red")],
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Color?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        ],
    }
    batch = Idefics2Collator(proc)([record, record])
    batch.pop("bad_samples")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):  # lora_B starts at zero: lora_A gets gradient from the second step on
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p.detach(), frozen[n]), f"frozen weight changed: {n}"
    moved = [n for n, p in model.named_parameters() if n in lora and not torch.equal(p.detach(), lora[n])]
    assert len(moved) == len(lora)
    # the 4-bit text weights took part in the step: their LoRA pairs got gradients through them
    assert any("text_model" in n and "lora_A" in n for n in moved)


@pytest.mark.parametrize("quantize", ["nf4", None])
def test_the_frozen_vision_tower_builds_no_graph_and_lora_gradients_do_not_change(tiny_base, quantize):
    """With checkpointing, only the text embeddings' output requires grad: the vision tower is not
    recomputed and back-propagated for nothing. The adapters' gradients are those of the model
    with transformers' hooks on every embedding (the old behaviour)."""
    from idefics2_ft.data.collator import Idefics2Collator
    from idefics2_ft.models import load_processor

    cfg, path = tiny_base
    peft = OmegaConf.merge(cfg.peft, {"quantize": quantize, "dropout": 0.0})
    proc = load_processor(path, cfg.data)
    from PIL import Image

    pixels = (torch.rand(48, 64, 3) * 255).to(torch.uint8).numpy()
    record = {
        "images": [Image.fromarray(pixels)],
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Color?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        ],
    }
    batch = Idefics2Collator(proc)([record])
    batch.pop("bad_samples")

    def gradients(hook_every_embedding: bool):
        torch.manual_seed(0)
        model = apply_peft(load_idefics2(path, cfg.model, peft), peft, gradient_checkpointing=True)
        if hook_every_embedding:
            model.base_model.model.enable_input_require_grads()
        seen = {}
        vision = model.base_model.model.model.vision_model
        vision.register_forward_hook(lambda m, i, out: seen.update(vision=out.last_hidden_state.requires_grad))
        model.train()
        model(**batch).loss.backward()
        return seen["vision"], {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    vision_graph, ours = gradients(hook_every_embedding=False)
    assert not vision_graph
    old_graph, old = gradients(hook_every_embedding=True)
    assert old_graph  # the old way really did build the vision tower's graph
    assert ours.keys() == old.keys() and any("connector" in n for n in ours)
    for name in ours:
        torch.testing.assert_close(ours[name], old[name], rtol=1e-5, atol=1e-7, msg=name)


def test_full_finetuning_trains_everything(tiny_base):
    cfg, path = tiny_base
    full = OmegaConf.merge(cfg.peft, {"method": "full", "quantize": None})
    model = apply_peft(load_idefics2(path, cfg.model, full), full, gradient_checkpointing=False)
    counts = trainable_parameters(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert min(counts[c] for c in ("vision", "connector", "text", "head")) > 0


def test_kbit_preparation_keeps_frozen_weights_in_the_compute_dtype(tiny_base):
    """No blanket fp32 upcast (prepare_model_for_kbit_training's raises memory a lot): the vision tower stays in bf16 when the base is bf16."""
    cfg, path = tiny_base
    model_cfg = OmegaConf.merge(cfg.model, {"dtype": "bfloat16"})
    model = apply_peft(load_idefics2(path, model_cfg, cfg.peft), cfg.peft, gradient_checkpointing=True)
    vision = [p.dtype for n, p in model.named_parameters() if ".vision_model." in n]
    assert vision and set(vision) == {torch.bfloat16}
    assert model.base_model.model.is_gradient_checkpointing


def test_untested_versions_are_refused(monkeypatch):
    from idefics2_ft import versions

    def installed(transformers: str):  # transformers as given; peft, lightning, torch, bitsandbytes in range
        return lambda name: transformers if name == "transformers" else "0.21.2" if name == "peft" else "2.6.6"

    monkeypatch.setattr(versions, "version", installed("4.40.0"))
    with pytest.raises(RuntimeError, match=r"transformers 4\.40\.0 \(idefics2-ft needs transformers[^)]*>=5\.18"):
        versions.check_versions()
    # 5.19.0 is in range but cannot import Idefics2's image processor: refused by name
    monkeypatch.setattr(versions, "version", installed("5.19.0"))
    with pytest.raises(RuntimeError, match=r"transformers 5\.19\.0"):
        versions.check_versions()


def test_the_version_guard_reads_the_ranges_pip_installs_by():
    import tomllib

    from packaging.requirements import Requirement

    from idefics2_ft import versions

    def ranges(texts):
        return {(r.name, r.specifier) for r in map(Requirement, texts) if r.marker is None}

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert ranges(versions.declared_requirements()) == ranges(declared)  # the installed metadata is pyproject's
    versions.check_versions()  # what is installed here passes


def test_gradients_through_the_4bit_base_equal_those_through_its_dequantized_weights(tiny_base, processor):
    """torch warns that bitsandbytes' CPU 4-bit op has no autograd kernel; the gradients are right."""
    from PIL import Image

    from idefics2_ft.data.collator import Idefics2Collator
    from idefics2_ft.models import load_processor

    cfg, path = tiny_base
    peft_q = OmegaConf.merge(cfg.peft, {"dropout": 0.0})
    peft_fp = OmegaConf.merge(peft_q, {"quantize": None})
    quantized = apply_peft(load_idefics2(path, cfg.model, peft_q), peft_q, gradient_checkpointing=False)
    dense = apply_peft(load_idefics2(path, cfg.model, peft_fp), peft_fp, gradient_checkpointing=False)
    q_modules, q_params = dict(quantized.named_modules()), dict(quantized.named_parameters())
    with torch.no_grad():
        for name, param in quantized.named_parameters():
            if "lora_B" in name:  # non-zero, so every LoRA pair takes part
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
        for name, module in dense.named_modules():
            if isinstance(q_modules.get(name), bnb.nn.Linear4bit):
                w = q_modules[name].weight
                module.weight.copy_(bnb.functional.dequantize_4bit(w.data, w.quant_state))
        for name, param in dense.named_parameters():
            if param.requires_grad:
                param.copy_(q_params[name])
    record = {
        "images": [Image.new("RGB", (64, 64), "red")],
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Color?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        ],
    }
    batch = Idefics2Collator(load_processor(path, cfg.data))([record, record])
    batch.pop("bad_samples")
    for model in (quantized, dense):
        model.train()
        model(**batch).loss.backward()
    d_params = dict(dense.named_parameters())
    connector = [n for n, p in quantized.named_parameters() if p.requires_grad and "connector" in n]
    assert connector  # their gradients pass through every 4-bit text layer
    for name, param in quantized.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, d_params[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_dora_adds_a_magnitude_vector_per_adapted_layer():
    lora = trainable_parameters(apply_peft(idefics2_8b_on_meta(), peft_cfg(r=R, quantize=None, target="text"), False))
    dora = trainable_parameters(
        apply_peft(idefics2_8b_on_meta(), peft_cfg(r=R, quantize=None, target="text", method="dora"), False)
    )
    # one magnitude per output feature of every adapted Mistral linear
    per_layer = 4096 + 1024 + 1024 + 4096 + 14336 + 14336 + 4096
    assert dora["text"] - lora["text"] == 32 * per_layer


def test_the_frozen_fingerprint_ignores_cpu_repacking_and_sees_any_update(tiny_base, processor):
    from PIL import Image

    from idefics2_ft.data.collator import Idefics2Collator
    from idefics2_ft.models import frozen_fingerprint, load_processor

    cfg, path = tiny_base
    model = apply_peft(load_idefics2(path, cfg.model, cfg.peft), cfg.peft, gradient_checkpointing=False)
    before = frozen_fingerprint(model)
    assert any("text_model" in n and "base_layer" in n for n in before)  # the 4-bit weights are in it
    record = {
        "images": [Image.new("RGB", (64, 64), "red")],
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Color?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        ],
    }
    batch = Idefics2Collator(load_processor(path, cfg.data))([record])
    batch.pop("bad_samples")
    model.eval()
    with torch.no_grad():
        model(**batch)  # on CPUs with AVX512-BF16, bitsandbytes repacks the 4-bit codes here
    assert frozen_fingerprint(model) == before
    packed = next(p for n, p in model.named_parameters() if p.dtype == torch.uint8)
    with torch.no_grad():
        packed.view(-1)[0] ^= 0x01  # one 4-bit code changed
    assert frozen_fingerprint(model) != before
    packed.data.view(-1)[0] ^= 0x01
    vision = next(p for n, p in model.named_parameters() if "vision_model" in n and p.dim() == 2)
    with torch.no_grad():
        vision[0, 0] += 1e-3
    assert frozen_fingerprint(model) != before
