"""Layouts of the built-in architectures: where each family keeps its sites.

A ``model_type`` none of them names gets a layout inferred from its module names when it
follows a known convention (``resolve_layout`` from ``layout_inference``, asked after every
other plugin's resolver).
"""

from __future__ import annotations

import peftbench

from .layout_inference import resolve_layout  # noqa: F401  (a hook of this plugin)

_BERT_SITES = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "attn_out": "attention.output.dense",
    "ffn_in": "intermediate.dense",
    "ffn_out": "output.dense",
    "attn_norm": "attention.output.LayerNorm",
    "ffn_norm": "output.LayerNorm",
    "attention": "attention.self",
}

#: LLaMA's block, shared by the families that copied its module names (Qwen2/3, Mistral, Gemma)
_LLAMA_SITES = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "attn_out": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_in": "mlp.up_proj",
    "ffn_out": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attention": "self_attn",
}

#: Gemma 2 and 3 normalise before and after each sub-layer; the norm in front of the FFN is
#: ``pre_feedforward_layernorm`` (``post_attention_layernorm`` normalises the attention's output)
_GEMMA2_SITES = {**_LLAMA_SITES, "ffn_norm": "pre_feedforward_layernorm"}


def _decoder(model_type: str, sites=_LLAMA_SITES, **kwargs) -> peftbench.ArchLayout:
    return peftbench.ArchLayout(model_type=model_type, layers="layers", sites=sites, embeddings="embed_tokens",
                                pre_norm=True, causal=True, **kwargs)


LAYOUTS = [
    peftbench.ArchLayout(
        model_type="bert", layers="encoder.layer", sites=_BERT_SITES, embeddings="embeddings.word_embeddings"
    ),
    peftbench.ArchLayout(
        model_type="roberta", layers="encoder.layer", sites=_BERT_SITES, embeddings="embeddings.word_embeddings"
    ),
    peftbench.ArchLayout(
        model_type="xlm-roberta", layers="encoder.layer", sites=_BERT_SITES, embeddings="embeddings.word_embeddings"
    ),
    # ELECTRA's embeddings may be narrower than its blocks (``embeddings_project`` widens them)
    peftbench.ArchLayout(
        model_type="electra", layers="encoder.layer", sites=_BERT_SITES, embeddings="embeddings.word_embeddings"
    ),
    peftbench.ArchLayout(
        model_type="deberta-v2",
        layers="encoder.layer",
        sites={
            **_BERT_SITES,
            "q": "attention.self.query_proj",
            "k": "attention.self.key_proj",
            "v": "attention.self.value_proj",
        },
        embeddings="embeddings.word_embeddings",
        prefix_attention=lambda module: _deberta_prefix_attention(module),
    ),
    peftbench.ArchLayout(
        model_type="distilbert",
        layers="transformer.layer",
        sites={
            "q": "attention.q_lin",
            "k": "attention.k_lin",
            "v": "attention.v_lin",
            "attn_out": "attention.out_lin",
            "ffn_in": "ffn.lin1",
            "ffn_out": "ffn.lin2",
            "attn_norm": "sa_layer_norm",
            "ffn_norm": "output_layer_norm",
            "attention": "attention",
        },
        embeddings="embeddings.word_embeddings",
        config_names={"intermediate": "hidden_dim"},
    ),
    peftbench.ArchLayout(
        model_type="gpt2",
        layers="h",
        sites={
            "attn_out": "attn.c_proj",
            "ffn_in": "mlp.c_fc",
            "ffn_out": "mlp.c_proj",
            "attn_norm": "ln_1",
            "ffn_norm": "ln_2",
            "attention": "attn",
        },
        fused={"attn.c_attn": ("q", "k", "v")},
        embeddings="wte",
        config_names={"intermediate": "n_inner"},
        pre_norm=True,
        causal=True,
    ),
    _decoder("llama"),
    _decoder("qwen2"),
    _decoder("qwen3"),  # q_norm/k_norm inside self_attn act before the attention function
    _decoder("mistral"),
    _decoder("gemma"),
    _decoder("gemma2", _GEMMA2_SITES),  # eager attention (logit soft-capping): the kv prefix follows it
    _decoder("gemma3_text", _GEMMA2_SITES),
    # Phi-3 fuses q, k, v into one projection (q is wider than k and v under GQA) and the FFN's
    # gate and up projections into ``gate_up_proj`` (gate first: Phi3MLP chunks it in that order)
    _decoder(
        "phi3",
        {k: v for k, v in _LLAMA_SITES.items() if k not in ("q", "k", "v", "ffn_gate", "ffn_in")},
        fused={"self_attn.qkv_proj": ("q", "k", "v"), "mlp.gate_up_proj": ("ffn_gate", "ffn_in")},
    ),
]


@peftbench.hookimpl
def register_architectures(register):
    for layout in LAYOUTS:
        register(layout)


def _deberta_prefix_attention(attention):
    """DeBERTa-v2's ``DisentangledSelfAttention`` with key/value prefixes: the module's own computation
    (content scores plus its relative-position terms over the real tokens), with the prefix's keys as
    extra columns scored by content only (a prefix has no position, so no c2p/p2c term), never masked,
    and its values beside the real ones. The instance's ``forward`` is replaced; the undo deletes it."""
    import torch
    from transformers.models.deberta_v2.modeling_deberta_v2 import scaled_size_sqrt

    original = attention.forward

    def forward(hidden_states, attention_mask, output_attentions=False, query_states=None, relative_pos=None,
                rel_embeddings=None):
        heads = attention.num_attention_heads
        key_layer = attention.transpose_for_scores(attention.key_proj(hidden_states), heads)  # (B*H, k, D)
        batch = key_layer.shape[0] // heads
        prefix = peftbench.kv_prefix_for(attention, key_layer.view(batch, heads, -1, key_layer.shape[-1]))
        if prefix is None:
            return original(hidden_states, attention_mask, output_attentions, query_states, relative_pos,
                            rel_embeddings)
        query_layer = attention.transpose_for_scores(
            attention.query_proj(hidden_states if query_states is None else query_states), heads)
        value_layer = attention.transpose_for_scores(attention.value_proj(hidden_states), heads)
        scale_factor = 1 + ("c2p" in attention.pos_att_type) + ("p2c" in attention.pos_att_type)
        scale = scaled_size_sqrt(query_layer, scale_factor).to(query_layer.dtype)
        scores = torch.bmm(query_layer, key_layer.transpose(-1, -2) / scale)
        if attention.relative_attention:
            scores = scores + attention.disentangled_attention_bias(
                query_layer, key_layer, relative_pos, attention.pos_dropout(rel_embeddings), scale_factor)
        prefix_key, prefix_value = (p.reshape(batch * heads, -1, p.shape[-1]) for p in prefix)
        n = prefix_key.shape[1]
        scores = torch.cat([torch.bmm(query_layer, prefix_key.transpose(-1, -2) / scale), scores], dim=-1)
        scores = scores.view(-1, heads, scores.size(-2), scores.size(-1))
        mask = attention_mask.bool()
        mask = torch.cat([torch.ones(*mask.shape[:-1], n, dtype=torch.bool, device=mask.device),
                          mask.expand(*mask.shape[:-2], scores.size(-2), mask.shape[-1])], dim=-1)
        scores = scores.masked_fill(~mask, torch.finfo(query_layer.dtype).min)
        probs = attention.dropout(torch.nn.functional.softmax(scores, dim=-1))
        context = torch.bmm(probs.view(-1, probs.size(-2), probs.size(-1)), torch.cat([prefix_value, value_layer], 1))
        context = context.view(-1, heads, context.size(-2), context.size(-1)).permute(0, 2, 1, 3).contiguous()
        context = context.view(context.size()[:-2] + (-1,))
        return (context, probs if output_attentions else None)

    attention.forward = forward
    return lambda: attention.__dict__.pop("forward", None)
