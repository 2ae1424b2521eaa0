"""Attention over time: ``nn.MultiheadAttention`` whose sequence is the time dimension."""

from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .skeleton import Module, dtype_remedy


class MultiheadAttention(Module, nn.MultiheadAttention):
    """``nn.MultiheadAttention`` over time: ``[T, B, ..., C]`` (``[B, T, ..., C]`` with
    ``batch_first``) attends over T separately for every batch element and extra position; the
    extra positions fold into the batch, so ``[T, B, N, C]`` is ``nn.MultiheadAttention`` on
    ``[T, B*N, C]``. A 2-D ``[T, C]`` is one sequence, as in torch.nn.

    forward takes and returns what ``nn.MultiheadAttention.forward`` does, in the input's terms:
    ``key_padding_mask`` ``[B, ..., S]`` or ``[B, S]`` (the same for every extra position);
    ``attn_mask`` ``[T, S]``, ``[B, ..., heads, T, S]`` or torch.nn's own ``[B*N*heads, T, S]``
    over the folded batch; weights ``[B, ..., T, S]`` (``[B, ..., heads, T, S]`` without
    ``average_attn_weights``). The computation is torch's (``F.multi_head_attention_forward``,
    scaled dot-product attention when no weights are asked for) on the folded tensor.

    Time is what the layer is about: it has no single-step mode, and forward raises a
    ``ValueError`` when the layer has been put into one.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: Optional[int] = None,
        vdim: Optional[int] = None,
        batch_first: bool = False,
        device=None,
        dtype=None,
        *,
        multi_time_step: Optional[bool] = None,
    ) -> None:
        name = type(self).__name__
        for argument, value in (("embed_dim", embed_dim), ("num_heads", num_heads), ("kdim", kdim), ("vdim", vdim)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name}: {argument} must be a positive integer, got {value!r}")
        if embed_dim % num_heads != 0:
            raise ValueError(f"{name}: embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout <= 1.0:
            raise ValueError(f"{name}: dropout must be a probability in [0, 1], got {dropout!r}")
        nn.MultiheadAttention.__init__(
            self, embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first, device,
            dtype,
        )
        self._init_step_mode(multi_time_step, batch_first)

    def _describe(self) -> str:
        return f"MultiheadAttention(embed_dim={self.embed_dim}, num_heads={self.num_heads})"

    def _check_input(self, name: str, x: torch.Tensor, features: int, query: torch.Tensor) -> None:
        weight = self.out_proj.weight
        if x.device != weight.device:
            raise ValueError(f"MultiheadAttention: the {name} is on {x.device} but the layer's weight is on "
                             f"{weight.device}; move one of them with .to(device)")
        if x.dtype != weight.dtype and (torch.jit.is_scripting() or not self._autocasting(x)):
            raise TypeError(f"MultiheadAttention: the {name}'s dtype {x.dtype} does not match the layer's weight "
                            f"dtype {weight.dtype}; {dtype_remedy(x.dtype, weight.dtype, name)}")
        if x.dim() < 2 or x.shape[-1] != features:
            steps = "T" if name == "query" else "S"
            order = f"[B, {steps}, ..., " if self.batch_first else f"[{steps}, B, ..., "
            raise ValueError(f"{self._describe()}: expected the {name} {order}{features}] (or [{steps}, {features}]); "
                             f"got {list(x.shape)}")
        if x is query:
            return
        if x.dim() != query.dim():
            raise ValueError(f"{self._describe()}: the {name} {list(x.shape)} must have the query's rank "
                             f"(query {list(query.shape)})")
        if x.dim() > 2:
            time = 1 if self.batch_first else 0
            if x.shape[:time] + x.shape[time + 1:-1] != query.shape[:time] + query.shape[time + 1:-1]:
                raise ValueError(f"{self._describe()}: the {name} {list(x.shape)} must have the query's batch and "
                                 f"extra sizes (query {list(query.shape)}, time at dimension {time})")

    @torch.jit.unused
    def _autocasting(self, x: torch.Tensor) -> bool:
        """Under autocast torch.nn casts the input and the weights itself (not in TorchScript); a
        device type autocast does not know (meta) has none."""
        try:
            return torch.is_autocast_enabled(x.device.type)
        except RuntimeError:
            return False

    def _check_mask(self, name: str, mask: Optional[torch.Tensor], query: torch.Tensor) -> None:
        if mask is not None:
            if mask.dtype != torch.bool and not mask.is_floating_point():
                raise TypeError(f"MultiheadAttention: {name} must be bool or floating point, got {mask.dtype}")
            if mask.device != query.device:
                raise ValueError(f"MultiheadAttention: {name} is on {mask.device} but the query is on {query.device}")

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[torch.Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self.step_mode != "m":
            raise ValueError("MultiheadAttention: attention is over time and needs the whole sequence [T, B, ..., C] "
                             "at once; the layer has no single-step mode (call multi_step_mode_() on it)")
        # a tensor passed twice is checked once (self-attention: the query alone)
        self._check_input("query", query, self.embed_dim, query)
        if key is not query or self.kdim != self.embed_dim:
            self._check_input("key", key, self.kdim, query)
        if (value is not query or self.vdim != self.embed_dim) and (value is not key or self.vdim != self.kdim):
            self._check_input("value", value, self.vdim, query)
        if value is not key and key.shape[:-1] != value.shape[:-1]:
            raise ValueError(f"{self._describe()}: key {list(key.shape)} and value {list(value.shape)} must have the "
                             "same sizes but the last")
        self._check_mask("key_padding_mask", key_padding_mask, query)
        self._check_mask("attn_mask", attn_mask, query)
        if is_causal and attn_mask is None:
            raise ValueError("MultiheadAttention: is_causal says that attn_mask is the causal mask; give attn_mask too "
                             "(as torch.nn requires)")
        unbatched = query.dim() == 2
        time = 1 if self.batch_first and not unbatched else 0
        batch: List[int] = list(query.shape[:-1])  # the sequences: the batch and extra positions
        batch.pop(time)
        sequences = 1
        for size in batch:
            sequences *= size
        target, source = query.shape[time], key.shape[time]
        # folded [T, B*N, C], keeping torch's identities (self-attention: one projection)
        q_folded = self._fold(query, unbatched)
        k_folded = q_folded if key is query else self._fold(key, unbatched)
        if value is key:
            v_folded = k_folded
        elif value is query:
            v_folded = q_folded
        else:
            v_folded = self._fold(value, unbatched)
        padding = None if key_padding_mask is None else self._fold_padding(key_padding_mask, batch, source, unbatched)
        mask = None if attn_mask is None else self._fold_attn_mask(attn_mask, batch, sequences, target, source)
        use_separate = not self._qkv_same_embed_dim
        output, weights = F.multi_head_attention_forward(
            q_folded, k_folded, v_folded, self.embed_dim, self.num_heads, self.in_proj_weight, self.in_proj_bias,
            self.bias_k, self.bias_v, self.add_zero_attn, self.dropout, self.out_proj.weight, self.out_proj.bias,
            training=self.training, key_padding_mask=padding, need_weights=need_weights, attn_mask=mask,
            use_separate_proj_weight=use_separate, q_proj_weight=self.q_proj_weight, k_proj_weight=self.k_proj_weight,
            v_proj_weight=self.v_proj_weight, average_attn_weights=average_attn_weights, is_causal=is_causal,
        )
        if unbatched:
            return output, weights
        if self.batch_first:  # [T, B*N, C] -> [B*N, T, C] -> [B, T, N, C], views
            output = output.transpose(0, 1).unflatten(0, batch)
            output = output.movedim(output.dim() - 2, 1)  # dimensions >= 0: ONNX's Transpose takes no negative perm
        else:
            output = output.unflatten(1, batch)
        if weights is not None:
            weights = weights.unflatten(0, batch)
        return output, weights

    def _fold(self, x: torch.Tensor, unbatched: bool) -> torch.Tensor:
        """``[T, B, ..., C]`` as ``[T, B*N, C]``; batch_first ``[B, T, ..., C]`` copied once to
        ``[B*N, T, C]`` and viewed as ``[T, B*N, C]``, as torch.nn's batch_first input is."""
        if unbatched:
            return x
        if self.batch_first:
            return x.movedim(1, x.dim() - 2).flatten(0, -3).transpose(0, 1)
        return x.flatten(1, -2)

    def _fold_padding(self, mask: torch.Tensor, batch: List[int], source: int, unbatched: bool) -> torch.Tensor:
        """``[B, ..., S]``, or ``[B, S]`` for every extra position, as torch.nn's ``[B*N, S]``."""
        if unbatched:
            if list(mask.shape) != [source]:
                raise ValueError(f"{self._describe()}: expected key_padding_mask [{source}] for a [T, C] query; got "
                                 f"{list(mask.shape)}")
            return mask
        if mask.dim() == 2 and len(batch) > 1 and list(mask.shape) == [batch[0], source]:
            view: List[int] = [batch[0]] + [1] * (len(batch) - 1) + [source]
            return mask.view(view).expand(batch + [source]).flatten(0, -2)
        if list(mask.shape) != batch + [source]:
            raise ValueError(f"{self._describe()}: expected key_padding_mask {batch + [source]} ([B, ..., S]) or "
                             f"{[batch[0], source]} ([B, S]); got {list(mask.shape)}")
        return mask.flatten(0, -2) if len(batch) > 1 else mask

    def _fold_attn_mask(self, mask: torch.Tensor, batch: List[int], sequences: int, target: int,
                        source: int) -> torch.Tensor:
        """``[T, S]`` and torch.nn's ``[B*N*heads, T, S]`` as they are; ``[B, ..., heads, T, S]`` folded."""
        shape = list(mask.shape)
        if shape == [target, source] or shape == [sequences * self.num_heads, target, source]:
            return mask
        if len(batch) > 0 and shape == batch + [self.num_heads, target, source]:
            return mask.flatten(0, -3)
        raise ValueError(f"{self._describe()}: expected attn_mask [{target}, {source}] ([T, S]), "
                         f"{batch + [self.num_heads, target, source]} ([B, ..., heads, T, S]) or "
                         f"[{sequences * self.num_heads}, {target}, {source}] ([B*N*heads, T, S]); got "
                         f"{list(mask.shape)}")


__all__ = ["MultiheadAttention"]
