"""Layouts of the built-in architectures: where each family keeps its sites."""

from __future__ import annotations

import peftbench

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

LAYOUTS = [
    peftbench.ArchLayout(
        model_type="bert", layers="encoder.layer", sites=_BERT_SITES, embeddings="embeddings.word_embeddings"
    ),
    peftbench.ArchLayout(
        model_type="roberta", layers="encoder.layer", sites=_BERT_SITES, embeddings="embeddings.word_embeddings"
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
    peftbench.ArchLayout(
        model_type="llama",
        layers="layers",
        sites={
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
        },
        embeddings="embed_tokens",
        pre_norm=True,
        causal=True,
    ),
]


@peftbench.hookimpl
def register_architectures(register):
    for layout in LAYOUTS:
        register(layout)
