"""Average pooling for layers and blocks: :mod:`lambda_jax.core.pooling` under the name the
linen modules have imported it by."""

from lambda_jax.core.pooling import POOL_PADDINGS, STRIDE_POOLS, average_pool, stride_pool

__all__ = ["POOL_PADDINGS", "STRIDE_POOLS", "average_pool", "stride_pool"]
