"""Attention for packed sequences, one row at a time.

transformers' sdpa path keeps the rows of a packed sequence apart with a dense block-diagonal mask:
it computes every (query, key) pair of the whole sequence and throws most of them away (with
~200-token rows in 2048-token sequences, ~90% of it), and the mask turns off sdpa's causal fast
path. With packing and `attn_implementation: sdpa`, dpkit registers `dpkit_rows` through
transformers' AttentionInterface instead:

- on CUDA (bf16/fp16, torch >= 2.10): torch's flash-attention varlen kernel
  (`torch.nn.attention.varlen.varlen_attn`) over the flattened batch, rows delimited by
  `cu_seq_lens` — the same kernel flash_attention_2 runs, without the flash-attn package;
- elsewhere (CPU, fp32): causal sdpa on each row in a loop.

Row boundaries are computed on the CPU by `row_boundaries` when the batch is collated and reach
every layer as the forward's `cu_seq_lens_q/k` and `max_length_q/k` keywords (transformers'
FlashAttentionKwargs, also understood by flash_attention_2), so no layer reads anything back from
the GPU. A batch without them (eval, unpacked right-padded rows) is one causal segment per row:
right padding never precedes a real token, so causal attention alone keeps real tokens exact.

Not used where rows would need more than causality: a sliding window shorter than the sequence,
attention soft-capping (Gemma-2) — those models keep transformers' masked sdpa.
"""

from __future__ import annotations

import inspect
import weakref

import torch
import torch.nn.functional as F

from dpkit.data.packing import row_boundaries  # noqa: F401 (the batch boundaries it reads)

NAME = "dpkit_rows"

try:  # torch >= 2.10
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn

    _VARLEN_PARAMETERS = frozenset(inspect.signature(_varlen_attn).parameters)
except ImportError:
    _varlen_attn, _VARLEN_PARAMETERS = None, frozenset()
_FLASH_GPU = [False]  # set by register(): a CUDA GPU of compute capability 8.0 or newer


def why_not_rows(config, max_seq_len: int) -> str | None:
    """Why per-row attention would compute something else for this model, or None."""
    if getattr(config, "attn_logit_softcapping", None):
        return "attention soft-capping"
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and window < max_seq_len:
        return f"a sliding window of {window} < max_seq_len {max_seq_len}"
    return None


def implementation_for(requested: str, packing: bool, config, max_seq_len: int) -> str:
    """The attn_implementation to build the model with: per-row attention where packing would
    otherwise run sdpa under a dense mask and the rows need nothing but causality."""
    if packing and requested == "sdpa" and why_not_rows(config, max_seq_len) is None:
        register()
        return NAME
    return requested


def describe_packed(chosen: str, requested: str, config, max_seq_len: int) -> str:
    """How rows of packed sequences are kept apart, for the run's log."""
    if chosen == NAME:
        return ("per row: flash varlen on CUDA, causal sdpa per row elsewhere; each "
                "micro-batch's sequences laid end to end, no padding")
    why = why_not_rows(config, max_seq_len) if requested == "sdpa" else None
    return ("rows kept apart by transformers from the restarting position ids"
            + (f"; not per row: {why}" if why else ""))


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    _FLASH_GPU[0] = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8
    AttentionInterface.register(NAME, rows_attention)
    # No mask is built: rows come from cu_seq_lens, causality from the kernel.
    AttentionMaskInterface.register(NAME, lambda *args, **kwargs: None)


def rows_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                   scaling: float | None = None, cu_seq_lens_q=None, max_length_q=None,
                   position_ids=None, **kwargs):
    """transformers attention function: query (B, H, S, D), key/value (B, Hkv, S, D); returns
    (B, S, H, D) like sdpa_attention_forward."""
    batch, heads, length, dim = query.shape
    if cu_seq_lens_q is None and position_ids is not None and batch * length > 0 \
            and position_ids.shape[-1] == length:
        cu_seq_lens_q, max_length_q = _boundaries_once(position_ids, batch)
    if cu_seq_lens_q is None:  # unpacked rows: each row is one causal segment
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, is_causal=True,
                                             scale=scaling, enable_gqa=heads != key.shape[1])
        return out.transpose(1, 2).contiguous(), None
    if dropout == 0.0 and _varlen_supported(query):
        return _varlen(query, key, value, cu_seq_lens_q, max_length_q, scaling), None
    return _row_by_row(query, key, value, cu_seq_lens_q, dropout, scaling), None


def _row_by_row(query, key, value, cu_seq_lens, dropout, scaling):
    batch, heads, length, _ = query.shape
    gqa = heads != key.shape[1]
    cu = _host_list(cu_seq_lens)
    parts = []
    for start, end in zip(cu[:-1], cu[1:]):
        b, s = divmod(start, length)
        e = s + end - start
        parts.append(F.scaled_dot_product_attention(
            query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e],
            dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa))
    # segments come in flattened order and never cross a row: (1, H, B*S, D) -> (B, S, H, D)
    out = torch.cat(parts, dim=2)[0].transpose(0, 1)
    return out.reshape(batch, length, heads, -1)


def _varlen(query, key, value, cu_seq_lens, max_length, scaling):
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    q = query.transpose(1, 2).reshape(batch * length, heads, dim)
    k = key.transpose(1, 2).reshape(batch * length, kv_heads, dim)
    v = value.transpose(1, 2).reshape(batch * length, kv_heads, dim)
    extra = {}
    if kv_heads != heads:
        if "enable_gqa" in _VARLEN_PARAMETERS:
            extra["enable_gqa"] = True
        else:  # older torch: repeat the shared key/value heads
            k = k.repeat_interleave(heads // kv_heads, dim=1)
            v = v.repeat_interleave(heads // kv_heads, dim=1)
    # torch 2.10 spells causality is_causal=True; later versions window_size=(-1, 0)
    extra.update({"window_size": (-1, 0)} if "window_size" in _VARLEN_PARAMETERS
                 else {"is_causal": True})
    cu = cu_seq_lens.to(query.device, non_blocking=True)
    max_length = int(max_length) if max_length is not None else length
    out = _varlen_attn(q, k, v, cu, cu, max_length, max_length, scale=scaling, **extra)
    return out.reshape(batch, length, heads, dim)


def _varlen_supported(query) -> bool:
    """Flash-attention's conditions: CUDA (Ampere or newer), half precision, head dim <= 256.
    Only plain attribute reads here: this runs inside torch.compile'd layers."""
    return (_varlen_attn is not None and query.is_cuda and _FLASH_GPU[0]
            and query.dtype in (torch.bfloat16, torch.float16)
            and query.shape[-1] <= 256 and query.shape[-1] % 8 == 0)


# (weak reference to the tensor every layer of one forward receives, what was read from it)
_OFFSETS: list = [None, None]
_BOUNDARIES: list = [None, None]


def _host_list(cu_seq_lens: torch.Tensor) -> list[int]:
    """The offsets as Python ints, read once per forward (every layer gets the same tensor)."""
    if _OFFSETS[0] is not None and _OFFSETS[0]() is cu_seq_lens:
        return _OFFSETS[1]
    values = cu_seq_lens.tolist()
    _OFFSETS[:] = [weakref.ref(cu_seq_lens), values]
    return values


def _boundaries_once(position_ids: torch.Tensor, batch: int):
    """For a model that does not pass the forward's keywords to its attention: the boundaries
    from the position ids, one device->host copy per forward rather than per layer."""
    if _BOUNDARIES[0] is not None and _BOUNDARIES[0]() is position_ids:
        return _BOUNDARIES[1]
    cu, longest = row_boundaries(position_ids.expand(batch, -1).cpu())
    _BOUNDARIES[:] = [weakref.ref(position_ids), (cu, longest)]
    return cu, longest
