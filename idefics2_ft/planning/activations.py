"""Activations autograd saves for the backward, layer by layer, and the FLOPs of a step."""

from __future__ import annotations

from transformers import Idefics2Config

from idefics2_ft.models.recompute import CHUNK_PATCHES
from idefics2_ft.planning.shapes import Setup, Workload


def _text_layer_bytes(D: int, inter: int, heads: int, T: int, s: Setup, lora: bool) -> float:
    """One decoder layer, per sample of T tokens, nothing recomputed."""
    a, drop = s.act_bytes, int(s.dropout and lora)
    per_token = (
        2 * D * 4  # the two RMSNorms' fp32 inputs
        + a * D * (2 + 3 + 1)  # normed inputs (attention, MLP), q, k and v expanded to all heads, attention output
        + a * D * lora * (3 * drop + 1 * drop + 2 * drop)  # dropout copies for q/k/v, o, gate/up
        + D * (3 + 1 + 2) * drop  # their masks (1 byte)
        + a * inter * 4  # gate, up, act(gate), act(gate) * up
        + (a + 1) * inter * drop  # down_proj's dropout copy and mask
    )
    attention = heads * T * T * a * 2 if s.attn == "eager" else 0  # scores and probabilities
    return per_token * T + attention


def activation_terms(config: Idefics2Config, w: Workload, s: Setup) -> tuple[float, float, dict[str, float], float]:
    """Bytes of the batch's pixels, of the vision tower's largest layer (transient: it runs before
    anything else is saved), of what is saved for backward by part, and of the gradients alive in
    the connector's backward."""
    v, p, t = config.vision_config, config.perceiver_config, config.text_config
    a = s.act_bytes
    targets = {"text": True, "connector": "connector" in s.target or s.target == "all", "vision": s.target == "all"}
    if s.method == "full":
        targets = dict.fromkeys(targets, True)
    N, S = w.images, w.patches
    drop = int(s.dropout)
    # vision tower: frozen, so one layer's tensors at a time (its output stays, the connector reads it)
    vision_layer = N * S * (4 * v.hidden_size + 2 * v.intermediate_size) * a
    if s.attn == "eager":
        vision_layer += N * v.num_attention_heads * S * S * a * 2
    if targets["vision"]:  # adapters in the vision tower: its graph is kept (checkpointed or not)
        per_layer = S * N * (8 * v.hidden_size + 3 * v.intermediate_size) * a
        vision_saved = v.num_hidden_layers * (N * S * v.hidden_size * a if s.checkpointing else per_layer)
    else:
        vision_saved = 0
    # connector: the modality projection (an MLP on every patch) and the perceiver, whose keys and
    # values read every patch and its latents. With LoRA in them, per patch: the vision output
    # (read by the LoRA branches) and a dropped-out copy for gate and up; gate, up, act(gate),
    # their product and down's dropped-out copy; the projection output (the context). Per perceiver
    # layer, per patch and latent: the context concatenated with the latents, dropped-out copies for
    # k and v, one more copy, and k and v. (Counted against autograd's saved tensors.)
    D, inter = t.hidden_size, t.intermediate_size
    kv_heads = p.num_key_value_heads * p.resampler_head_dim
    n_lat = p.resampler_n_latents
    projection = (2 * drop * v.hidden_size + (4 + drop) * inter + D) * a
    perceiver_layer = ((2 + 2 * drop) * D + 2 * kv_heads) * a
    recompute = targets["connector"] and s.recompute_connector
    if recompute:
        # checkpointed: kept are the inputs of what is recomputed (the vision output, the projection's
        # output read by every perceiver layer, each layer's latents); the rest comes back in the backward
        vision_out = N * S * v.hidden_size * a
        connector = N * S * D * a + p.resampler_depth * N * n_lat * D * a
    elif targets["connector"]:
        vision_out = 2 * N * S * v.hidden_size * a
        connector = N * S * projection + N * (S + n_lat) * p.resampler_depth * perceiver_layer
    else:
        vision_out = 0
        connector = N * S * (3 * inter + 3 * D) * a  # transient, one block at a time
    # text
    T, B, L = w.seq_len, w.batch, t.num_hidden_layers
    layer = B * _text_layer_bytes(D, inter, t.num_attention_heads, T, s, lora=True)
    if s.checkpointing:
        text = L * B * T * D * a + layer + B * T * (2 * D + 2 * inter) * a  # boundaries, one layer, its gradients
    else:
        text = L * layer + B * T * (2 * D + 2 * inter) * a
    # the loss's backward: log-softmax saved (fp32), the gradient it receives and the one it gives, at
    # the positions the head runs on (where some sample learns the next token)
    logits = B * (w.learned if w.learned is not None else T) * t.vocab_size * 12
    # the batch's pixels (fp32), the model's mask of padding images and its copy of the real ones
    pixels = N * S * v.patch_size**2 * 3 * (4 + 1 + a)
    saved = {
        "activations: vision tower": vision_saved + vision_out,
        "activations: connector": connector,
        "activations: text model": text,
        "activations: logits and loss": logits,
    }
    # the projection's backward: gradients of gate, up and act(gate) beside what is still saved; with
    # recompute, one chunk of patches (or one perceiver layer) at a time, re-run and then differentiated
    if recompute:
        c = min(S, CHUNK_PATCHES)
        chunk = N * c * (projection + 3 * inter * a)
        # a perceiver layer re-run, the gradients of its input and of its keys and values, and the
        # context's gradient, summed over the layers
        layer = N * (S + n_lat) * (perceiver_layer + (D + 2 * kv_heads) * a) + N * S * D * a
        connector_grads = max(chunk, layer)
    else:
        connector_grads = 3 * N * S * inter * a if targets["connector"] else 0
    return pixels, vision_layer, saved, connector_grads


def step_flops(config: Idefics2Config, w: Workload, s: Setup, params: dict[str, int]) -> float:
    """FLOPs of one optimizer step as executed: forward, backward (input gradients only through
    frozen weights), the text model's recomputation under checkpointing, the connector's under
    ``model.checkpoint_connector``; the head on the learned positions only."""
    v, t = config.vision_config, config.text_config
    N, S, tokens = w.images, w.patches, w.tokens
    vision = 2 * params["vision"] * N * S + 4 * N * S * S * v.hidden_size * v.num_hidden_layers
    connector = 2 * params["connector"] * N * S
    text = 2 * params["text"] * tokens + 4 * w.batch * w.seq_len**2 * t.hidden_size * t.num_hidden_layers
    head = 2 * params["head"] * w.batch * (w.learned if w.learned is not None else w.seq_len)
    backward = 2 if s.method == "full" else 1  # weight gradients only for full fine-tuning
    recompute = text if s.checkpointing else 0
    connector_trains = s.method == "full" or s.target in ("text+connector", "all")
    if s.recompute_connector and connector_trains:  # the projection on every patch, the perceiver's keys and values
        p_cfg, D, inter = config.perceiver_config, t.hidden_size, t.intermediate_size
        kv = p_cfg.num_key_value_heads * p_cfg.resampler_head_dim
        projection = 2 * (2 * v.hidden_size * inter + inter * D) * N * S
        perceiver = 2 * p_cfg.resampler_depth * 2 * D * kv * N * (S + p_cfg.resampler_n_latents)
        recompute += projection + perceiver
    vision_backward = vision * backward if s.target == "all" or s.method == "full" else 0
    micro = vision + vision_backward + (connector + text + head) * (1 + backward) + recompute
    return micro * s.accumulate


def reference_terms(config: Idefics2Config, w: Workload, s: Setup) -> tuple[float, float, float, float]:
    """objective=dpo: the reference's pass over the pairs (``pair_forward.py``), under no_grad, after the
    policy's forward and before the backward: everything the policy's forward saved is held meanwhile.

    Returns the bytes of what the policy holds of its head then (its fp32 log-softmax at the learned
    positions, saved for the backward; the loss's gradients do not exist yet), of what its text model
    has saved by then (the forward's share of ``activation_terms``' text term: with checkpointing the
    layer boundaries, the layer recomputed and the gradients come in the backward), and of the pass's
    text pass's largest transient: one decoder layer at a time, or its head, whose logits at the learned
    positions of every row are copied to fp32 beside their log-softmax (``sequence_logps``); and of the
    reference's connector, run again where adapters sit in it (the reference's connector differs)
    without grad, right after the policy's connector and before either text pass (``pair_passes``), so
    in one piece over every patch rather than in the recomputed chunks: the projection's
    gate-activated, up and product tensors, ``intermediate_size`` wide per patch. Nothing of the pass
    is kept but each row's log-probability: no cache (``use_cache`` is off in training), no second model."""
    t = config.text_config
    a = s.act_bytes
    D, inter = t.hidden_size, t.intermediate_size
    T, B, L = w.seq_len, w.batch, t.num_hidden_layers
    positions = B * (w.learned if w.learned is not None else T)
    kept = positions * t.vocab_size * 4
    if s.checkpointing:
        text = L * B * T * D * a
    else:
        text = L * B * _text_layer_bytes(D, inter, t.num_attention_heads, T, s, lora=True)
    head = positions * t.vocab_size * (a + 4 + (4 if a != 4 else 0))  # logits, their fp32 copy, the log-softmax
    layer = B * T * (3 * inter + 3 * D) * a  # the MLP's three wide tensors, the residual stream
    connector_differs = s.method == "full" or "connector" in s.target or s.target == "all"
    connector = w.images * w.patches * 3 * inter * a if connector_differs else 0
    return kept, text, max(head, layer), connector
