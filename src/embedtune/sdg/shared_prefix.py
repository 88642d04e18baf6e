"""Attention over a few-shot prefix that every row of a batch shares, without copying it per row.

Every prompt of the local generator starts with the same few-shot prefix (the user's examples, up to
``sdg.local.max_prefix_tokens``). With a plain key/value cache each sampled row holds its own copy of the
prefix's keys and values, and every decode step concatenates and reads them again (issue #30; measured with
a 428-token prefix on an AVX-512/AMX Xeon: peak RSS while generating 3,010 MB copied vs 2,325 MB shared, at
the same speed within noise, ``bench/sdg_throughput.py --examples``).

Here the cache holds only each row's own tokens (passage, then the query being written); the prefix's keys
and values are kept once (batch of one) and passed to every layer as ``shared_prefix``. Each layer scores
its queries against both parts, takes one softmax over the concatenated scores and sums the two weighted
values: exactly the attention over ``[prefix][row]`` (the prefix is fully visible to every row, the row's
own part is causal and padding-masked), with the prefix read once per step as one matrix product per
key/value head (cascade or "shared prefix" attention, as in Hydragen, Juravsky et al. 2024).

The attention is registered with transformers' ``AttentionInterface`` and falls back to SDPA whenever no
``shared_prefix`` is passed, so computing the prefix itself and everything else run unchanged.
"""

from __future__ import annotations

NAME = "embedtune_shared_prefix"


def install(model) -> None:
    """Route ``model``'s attention through the shared-prefix function (SDPA when no prefix is passed)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, _attention(sdpa_attention_forward))
    AttentionMaskInterface.register(NAME, sdpa_mask)  # 2-D masks (the prefix's own pass) become SDPA's masks
    model.config._attn_implementation = NAME


def prefix_states(cache) -> list[tuple[object, object]]:
    """Per layer, the prefix's keys and values (kv heads, tokens, head dim) from a batch-of-one cache."""
    return [(layer.keys[0], layer.values[0]) for layer in cache.layers]


def row_mask(mask, query_length: int, dtype):
    """The additive 4-D mask (rows, 1, queries, keys) of each row's own tokens: ``mask`` (rows, keys) marks
    real tokens, the queries are the last ``query_length`` keys, and a query sees the keys up to itself."""
    import torch

    keys = mask.shape[1]
    query_at = torch.arange(keys - query_length, keys)[:, None]
    visible = (torch.arange(keys)[None, :] <= query_at)[None] & mask[:, None, :].bool()
    return torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, torch.finfo(dtype).min)[:, None]


def _attention(fallback):
    def shared_prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                                shared_prefix=None, **kwargs):
        if shared_prefix is None:
            return fallback(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        return _cascade(query, key, value, attention_mask, *shared_prefix[module.layer_idx],
                        scaling if scaling is not None else query.shape[-1] ** -0.5), None

    return shared_prefix_attention


def _cascade(query, key, value, mask, prefix_keys, prefix_values, scaling: float):
    """softmax([q·Kp, q·Kr + mask]) · [Vp; Vr] for queries (rows, heads, q, d), the rows' own keys and
    values (rows, kv heads, r, d) and the shared prefix's (kv heads, p, d)."""
    import torch

    rows, heads, length, dim = query.shape
    kv_heads, prefix_len = prefix_keys.shape[0], prefix_keys.shape[1]
    group = heads // kv_heads
    grouped_q = query.reshape(rows, kv_heads, group, length, dim)  # queries by the key/value head they read
    # On the prefix: (kv heads, rows * group * q, d) against (kv heads, p, d), one product per head.
    flat = grouped_q.permute(1, 0, 2, 3, 4).reshape(kv_heads, -1, dim)
    on_prefix = torch.bmm(flat, prefix_keys.transpose(1, 2)) * scaling
    on_prefix = on_prefix.reshape(kv_heads, rows, group, length, prefix_len).permute(1, 0, 2, 3, 4)
    # On the rows' own keys: a head group's queries stacked as (group * q) rows against its one key/value head,
    # so the keys and values are read in place. (Expanding them to every query head copied each row's whole
    # cache in every layer at every step: a tenth of the sdg time on an AVX2-only EPYC.)
    own = key.shape[2]
    stacked_q = grouped_q.reshape(rows, kv_heads, group * length, dim)
    on_own = torch.matmul(stacked_q, key.transpose(-1, -2)).reshape(rows, kv_heads, group, length, own)
    on_own = on_own * scaling + mask[:, :, None]
    weights = torch.cat([on_prefix, on_own], dim=-1).softmax(dim=-1, dtype=torch.float32).to(query.dtype)
    w_prefix, w_own = weights.split([prefix_len, own], dim=-1)
    out = torch.bmm(w_prefix.permute(1, 0, 2, 3, 4).reshape(kv_heads, -1, prefix_len), prefix_values)
    out = out.reshape(kv_heads, rows, group, length, dim).permute(1, 0, 2, 3, 4)
    out = out + torch.matmul(w_own.reshape(rows, kv_heads, group * length, own), value).reshape(out.shape)
    return out.reshape(rows, heads, length, dim).transpose(1, 2).contiguous()
