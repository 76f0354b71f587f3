"""The lambda layer as pure functions of arrays (the paper's Figure 3): the public face of
:mod:`lambda_jax.core`.

The modules (:class:`lambda_jax.LambdaLayer` in linen, :class:`lambda_jax.nnx.LambdaLayer`
in NNX) own the parameters and call :func:`lambda_layer`; the formulations of the position
lambdas live in :mod:`lambda_jax.core.position`. Shapes: b batch, n query positions
(``n = prod(S)`` for spatial sizes ``S``), m context positions, h heads, k key depth,
u intra-depth, v value depth.

Relative offsets ``o = m - n`` (context position minus query position): the local kernel
``[r, ..., r, k, u]`` holds offset o at index ``o + (r - 1) // 2``, the global table
``[2*S_1-1, ..., k, u]`` at index ``o + S - 1``.

Sums over positions accumulate in float32 (or wider) whatever the inputs' dtype.
"""

from lambda_jax.core.content import apply_lambdas, content_lambda
from lambda_jax.core.layer import lambda_layer
from lambda_jax.core.position import (
    global_position_lambdas,
    local_position_lambdas,
    local_position_output,
)
from lambda_jax.core.settings import LambdaSettings, position_embedding_shape

__all__ = [
    "LambdaSettings",
    "apply_lambdas",
    "content_lambda",
    "global_position_lambdas",
    "lambda_layer",
    "local_position_lambdas",
    "local_position_output",
    "position_embedding_shape",
]
