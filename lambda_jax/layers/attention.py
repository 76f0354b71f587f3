"""The self-attention baselines of the LambdaNetworks paper, in one namespace.

* :class:`RelativeSelfAttention` (:mod:`lambda_jax.layers.relative_attention`): local or
  global relative multi-head self-attention (Ramachandran et al. 2019; Bello et al. 2019);
* :class:`AxialSelfAttention` (:mod:`lambda_jax.layers.axial_attention`): a height pass then a
  width pass of global attention (Ho et al. 2019; Wang et al. 2020);
* :class:`AttentionAugmentedConv` (:mod:`lambda_jax.layers.augmented_conv`): a convolution
  concatenated with global relative self-attention (Bello et al. 2019);
* :func:`windows` (:mod:`lambda_jax.layers.windows`): the r x r neighbourhoods of local
  attention.

What the layers share (head projections, offset tables and logits, global and windowed
attention) is in :mod:`lambda_jax.layers.attention_ops`.
"""

from lambda_jax.layers.augmented_conv import AttentionAugmentedConv
from lambda_jax.layers.axial_attention import AxialSelfAttention
from lambda_jax.layers.relative_attention import POSITION_LOGITS, RelativeSelfAttention
from lambda_jax.layers.windows import windows

__all__ = [
    "POSITION_LOGITS",
    "AttentionAugmentedConv",
    "AxialSelfAttention",
    "RelativeSelfAttention",
    "windows",
]
