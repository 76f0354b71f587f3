"""Causal language models: lambda layers in place of attention in a decoder, and the
same-size attention decoder they are compared with.

Both map tokens ``[batch, length]`` (int) to next-token logits ``[batch, length, vocab]``
(float32). The lambda decoder also decodes one token at a time with a state of constant
size: ``init_decode_state(batch)`` then ``apply(variables, tokens_t, decode_state=state)``
with ``tokens_t`` of shape ``[batch, 1]``.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from lambda_jax.layers.causal import CausalLambdaLayer, DecodeState


class FeedForward(nn.Module):
    """Position-wise MLP. x: ``[batch, length, dim]`` -> ``[batch, length, dim]``."""

    hidden: int
    dtype: Optional[Any] = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.Dense(self.hidden, dtype=self.dtype)(x)
        return nn.Dense(x.shape[-1], dtype=self.dtype)(nn.gelu(y))


class LambdaDecoderBlock(nn.Module):
    """Pre-norm residual block: causal local lambda layer, then an MLP.

    x: ``[batch, length, dim]`` -> ``[batch, length, dim]``.
    """

    dim_k: int = 16
    heads: int = 4
    dim_u: int = 1
    receptive_field: int = 32
    mlp_ratio: int = 4
    dtype: Optional[Any] = None

    def mixer(self, dim: int, **module_kwargs) -> CausalLambdaLayer:
        """The causal local lambda layer of this block, ``dim`` channels in and out."""
        return CausalLambdaLayer(dim_out=dim, dim_k=self.dim_k, heads=self.heads,
                                 dim_u=self.dim_u, position="local",
                                 receptive_field=self.receptive_field, dtype=self.dtype,
                                 **module_kwargs)

    @nn.compact
    def __call__(self, x: jax.Array, decode_state: Optional[DecodeState] = None):
        y = nn.LayerNorm(dtype=self.dtype)(x)
        if decode_state is None:
            y = self.mixer(x.shape[-1], name="lambda")(y)
        else:
            y, decode_state = self.mixer(x.shape[-1], name="lambda")(
                y, decode_state=decode_state)
        x = x + y
        x = x + FeedForward(self.mlp_ratio * x.shape[-1], self.dtype)(nn.LayerNorm(
            dtype=self.dtype)(x))
        return x if decode_state is None else (x, decode_state)


class LambdaLanguageModel(nn.Module):
    """Decoder of causal lambda blocks with local relative positions (no position table).

    Attributes:
      vocab_size: number of tokens.
      dim: model width (divisible by ``heads``).
      depth: number of blocks.
      dim_k, heads, dim_u, receptive_field: the lambda layers' settings.
      mlp_ratio: hidden width of the MLPs over ``dim``.
      dtype: compute dtype.
    """

    vocab_size: int
    dim: int = 128
    depth: int = 4
    dim_k: int = 16
    heads: int = 4
    dim_u: int = 1
    receptive_field: int = 32
    mlp_ratio: int = 4
    dtype: Optional[Any] = None

    def init_decode_state(self, batch_size: int) -> list[DecodeState]:
        """One ``DecodeState`` per block, before the first token."""
        block = LambdaDecoderBlock(self.dim_k, self.heads, self.dim_u, self.receptive_field,
                                   self.mlp_ratio, self.dtype, parent=None)
        mixer = block.mixer(self.dim, parent=None)
        return [mixer.init_decode_state(batch_size) for _ in range(self.depth)]

    def _block(self, index: int) -> LambdaDecoderBlock:
        return LambdaDecoderBlock(self.dim_k, self.heads, self.dim_u, self.receptive_field,
                                  self.mlp_ratio, self.dtype, name=f"block_{index}")

    @nn.compact
    def __call__(self, tokens: jax.Array,
                 decode_state: Optional[Sequence[DecodeState]] = None):
        """tokens: ``[batch, length]`` -> logits ``[batch, length, vocab_size]``.

        With ``decode_state`` (from ``init_decode_state`` or the previous step), tokens is
        ``[batch, 1]`` and the result is ``(logits [batch, 1, vocab_size], next state)``.
        """
        chex.assert_rank(tokens, 2)
        x = nn.Embed(self.vocab_size, self.dim, dtype=self.dtype)(tokens)
        next_state = []
        for index in range(self.depth):
            block = self._block(index)
            if decode_state is None:
                x = block(x)
            else:
                x, block_state = block(x, decode_state[index])
                next_state.append(block_state)
        logits = nn.Dense(self.vocab_size)(nn.LayerNorm(dtype=self.dtype)(x))
        logits = logits.astype(jnp.float32)
        return logits if decode_state is None else (logits, next_state)


class AttentionLanguageModel(nn.Module):
    """The same decoder with causal multi-head self-attention and learned absolute
    positions, for comparison. tokens ``[batch, length]`` -> logits
    ``[batch, length, vocab_size]``; ``length <= max_length``.
    """

    vocab_size: int
    max_length: int
    dim: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: int = 4
    dtype: Optional[Any] = None

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        chex.assert_rank(tokens, 2)
        length = tokens.shape[1]
        if length > self.max_length:
            raise ValueError(
                f"AttentionLanguageModel.max_length is {self.max_length}; got {length} tokens.")
        x = nn.Embed(self.vocab_size, self.dim, dtype=self.dtype)(tokens)
        positions = self.param("positions", nn.initializers.normal(0.02),
                               (self.max_length, self.dim))
        x = x + positions[:length].astype(x.dtype)
        mask = nn.make_causal_mask(tokens)
        for _ in range(self.depth):
            y = nn.LayerNorm(dtype=self.dtype)(x)
            x = x + nn.MultiHeadDotProductAttention(self.heads, dtype=self.dtype)(y, mask=mask)
            x = x + FeedForward(self.mlp_ratio * self.dim, self.dtype)(
                nn.LayerNorm(dtype=self.dtype)(x))
        logits = nn.Dense(self.vocab_size)(nn.LayerNorm(dtype=self.dtype)(x))
        return logits.astype(jnp.float32)
