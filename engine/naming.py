"""Block and role of a layer, read from its name.

One small table per naming scheme (Llama/Mistral/Qwen, GPT-2, GPT-NeoX/Falcon, BERT/RoBERTa,
T5, Meta's original Llama, GGUF), tried in order: the first pattern that matches the end of
the name (without ``.weight``) gives the role. Specific patterns come before generic ones,
because the schemes reuse words: T5's ``DenseReluDense.wo`` is a down projection where Meta's
``attention.wo`` is the output projection.
"""

from __future__ import annotations

import re
from typing import Final

ROLES: Final = ("q", "k", "v", "qkv", "o", "up", "gate", "down", "embedding", "head", "other")
FUSED_ROLES: Final = {"qkv": "fused q/k/v projection: one layer (its q, k and v blocks are "
                             "not split)"}

_BLOCK = re.compile(r"(?:^|[./])(?:layers|layer|h|blk|block|blocks)[./](\d+)(?:[./]|$)")
_SUFFIXES = (".weight", ".bias", ".kernel")

# (pattern matched against the end of the name, role). Order matters: first match wins.
_ROLE_TABLE: Final[tuple[tuple[str, str], ...]] = (
    # fused projections
    (r"(?:q_?k_?v_?proj|c_attn|query_key_value|w_pack|attn_qkv|wqkv|in_proj|qkv)", "qkv"),
    # output projections of attention (before the generic 'dense'/'wo'/'c_proj' below)
    (r"(?:attention\.output\.dense|attention\.dense|self_attention\.dense|attn\.c_proj|"
     r"attention\.wo|attn\.out_proj|o_proj|out_proj|attn_output|selfattention\.o|"
     r"encdecattention\.o|attn\.o)", "o"),
    (r"(?:q_proj|query|wq|attn_q|selfattention\.q|encdecattention\.q|attn\.q)", "q"),
    (r"(?:k_proj|key|wk|attn_k|selfattention\.k|encdecattention\.k|attn\.k)", "k"),
    (r"(?:v_proj|value|wv|attn_v|selfattention\.v|encdecattention\.v|attn\.v)", "v"),
    # feed-forward
    (r"(?:gate_proj|feed_forward\.w1|experts\.\d+\.w1|wi_0|ffn_gate(?:_exps)?|w1)", "gate"),
    (r"(?:gate_up_proj|up_proj|feed_forward\.w3|experts\.\d+\.w3|wi_1|wi|c_fc|fc1|"
     r"dense_h_to_4h|ffn_up(?:_exps)?|intermediate\.dense|w3)", "up"),
    (r"(?:down_proj|feed_forward\.w2|experts\.\d+\.w2|densereludense\.wo|mlp\.c_proj|fc2|"
     r"dense_4h_to_h|ffn_down(?:_exps)?|output\.dense|w2)", "down"),
    # embeddings and heads
    (r"(?:embed_tokens|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings|"
     r"embed_in|tok_embeddings|token_embd|embed_positions|^shared|^embeddings?)", "embedding"),
    (r"(?:lm_head|embed_out|^output|predictions\.decoder|^score)", "head"),
)
# Alternatives written ``^name`` match only a whole (top-level) name.
_ROLES = tuple((re.compile(rf"(?:^|\.){pattern}$", re.IGNORECASE), role)
               for pattern, role in _ROLE_TABLE)


def _stem(name: str) -> str:
    """The module path of a tensor name: ``model.layers.0.q_proj.weight`` ->
    ``model.layers.0.q_proj`` (ONNX names with '/' read like dots)."""
    stem = name.replace("/", ".")
    for suffix in _SUFFIXES:
        if stem.lower().endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def block_of(name: str) -> int | None:
    """The transformer block index in ``name`` (``layers.12.``, ``h.3.``, ``blk.0.``), or None."""
    match = _BLOCK.search(name)
    return int(match.group(1)) if match else None


def role_of(name: str) -> str:
    """The role of the tensor or layer ``name``: one of ``ROLES``; ``other`` when no scheme's
    table knows it."""
    stem = _stem(name)
    # Top-level names (``output``, ``shared``) are anchored at the start: strip the usual
    # wrappers first so that ``model.embed_tokens`` and ``transformer.wte`` read the same.
    bare = re.sub(r"^(?:base_model\.model\.|model\.|transformer\.|gpt_neox\.|bert\.|roberta\.)+",
                  "", stem, flags=re.IGNORECASE)
    for pattern, role in _ROLES:
        if pattern.search(bare):
            return role
    return "other"


def fused_note(role: str) -> str:
    """The note a fused projection carries (empty for the others)."""
    return FUSED_ROLES.get(role, "")
