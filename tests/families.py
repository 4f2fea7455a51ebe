"""Tiny random configs of the model families added after the first five (issue #15).

Each is 2 layers, 32 wide, vocabulary ``VOCAB``. Decoders have GQA (4 heads, 2 kv heads;
Gemma 1 multi-query, 1 kv head), Qwen3 a head_dim wider than hidden / heads, Mistral, Gemma
2 and Gemma 3 a sliding window shorter than the test sequences, Gemma 2 logit soft-capping
(eager attention), Phi-3 fused q|k|v and gate|up projections. ELECTRA's embeddings are
narrower than its blocks (as in the released checkpoints), DeBERTa-v2 has v3's disentangled
relative attention. ``INFERRED`` are families with no registered layout whose module names
follow a known convention; ``NOT_INFERABLE`` follow none.
"""

from __future__ import annotations

import transformers as T

from conftest import VOCAB

DECODERS = ("qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "phi3")
ENCODERS = ("xlm-roberta", "electra", "deberta-v2")
FAMILIES = DECODERS + ENCODERS
INFERRED_DECODERS = ("granite", "olmo", "stablelm", "starcoder2")
INFERRED_ENCODERS = ("camembert",)
INFERRED = INFERRED_DECODERS + INFERRED_ENCODERS

_ROBERTA_IDS = dict(pad_token_id=1, bos_token_id=0, eos_token_id=2)


def family_config(family: str, window: int = 4, width: int = 32, vocab: int = VOCAB):
    """The tiny config of ``family``; ``window`` is the sliding window where the family has one,
    ``width`` the hidden size (the FFN is 1.5 times as wide)."""
    _DECODER = dict(vocab_size=vocab, hidden_size=width, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=width * 3 // 2, max_position_embeddings=64,
                    bos_token_id=0, eos_token_id=0, pad_token_id=0)
    _ENCODER = dict(vocab_size=vocab, hidden_size=width, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=width * 3 // 2, max_position_embeddings=70)
    if family == "qwen2":
        return T.Qwen2Config(**_DECODER)
    if family == "qwen3":
        return T.Qwen3Config(**_DECODER, head_dim=width // 2)  # wider than hidden / heads
    if family == "mistral":
        return T.MistralConfig(**_DECODER, sliding_window=window)
    if family == "gemma":
        return T.GemmaConfig(**{**_DECODER, "num_key_value_heads": 1}, head_dim=width // 4)
    if family == "gemma2":
        return T.Gemma2Config(**_DECODER, head_dim=width // 4, sliding_window=window, query_pre_attn_scalar=8)
    if family == "gemma3_text":
        return T.Gemma3TextConfig(**_DECODER, head_dim=width // 4, sliding_window=window, query_pre_attn_scalar=8,
                                  layer_types=["sliding_attention", "full_attention"])
    if family == "phi3":
        return T.Phi3Config(**_DECODER)
    if family == "xlm-roberta":
        return T.XLMRobertaConfig(**_ENCODER, **_ROBERTA_IDS)
    if family == "electra":
        return T.ElectraConfig(**_ENCODER, embedding_size=width // 2)
    if family == "deberta-v2":
        return T.DebertaV2Config(**_ENCODER, relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=8,
                                 share_att_key=True, norm_rel_ebd="layer_norm", type_vocab_size=0,
                                 position_biased_input=False)
    if family == "granite":
        return T.GraniteConfig(**_DECODER, attention_multiplier=0.2, residual_multiplier=0.5)
    if family == "olmo":
        return T.OlmoConfig(**_DECODER)
    if family == "stablelm":
        return T.StableLmConfig(**_DECODER)
    if family == "starcoder2":
        return T.Starcoder2Config(**_DECODER, sliding_window=None)
    if family == "camembert":
        return T.CamembertConfig(**_ENCODER, **_ROBERTA_IDS)
    if family == "gpt_neox":  # fused query_key_value with heads interleaved: no convention we can trust
        return T.GPTNeoXConfig(**{k: v for k, v in _DECODER.items() if k != "num_key_value_heads"})
    raise KeyError(family)


def task_of(family: str) -> str:
    """Classification heads for encoders, causal LM for decoders."""
    return "classification" if family in ENCODERS + INFERRED_ENCODERS else "causal_lm"


def save_folder(family: str, path, **kwargs) -> None:
    """A plain Hugging Face folder (config, random weights, a word-level tokenizer) that
    ``peftbench solve --backbone PATH`` loads like a downloaded checkpoint."""
    import torch
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    config = family_config(family, **kwargs)
    torch.manual_seed(0)
    auto = T.AutoModelForCausalLM if task_of(family) == "causal_lm" else T.AutoModelForSequenceClassification
    auto.from_config(config).save_pretrained(path)
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + [f"w{i}" for i in range(config.vocab_size - len(specials))])}
    core = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = Whitespace()
    T.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                              unk_token="<unk>").save_pretrained(path)
