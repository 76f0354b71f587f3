"""Position lambdas: relative embeddings (global context) and the lambda convolution (local context).

Conventions shared by every module of this package (s = number of spatial axes, 1 to 3):

* values: ``[batch, *spatial, v, u]`` with ``n = prod(spatial)`` positions;
* a relative embedding is indexed by the offset of the context position m from the
  query position n, ``m - n``. The global table has shape ``[2*S_1-1, ..., 2*S_s-1, k, u]``
  and holds the offset ``m - n`` at index ``m - n + S - 1``; the local kernel has shape
  ``[r, ..., r, k, u]`` and holds the offset ``m - n`` at index ``m - n + (r - 1) // 2``.
  With ``r = 2*S - 1`` the two are the same array and give the same position lambdas.
* position lambdas: ``[batch, n, k, v]``, accumulated in float32 (or wider).
"""

from lambda_jax.core.numerics import accumulation_dtype
from lambda_jax.core.position.banded import banded_lambda_convolution
from lambda_jax.core.position.conv import lambda_convolution
from lambda_jax.core.position.pallas import pallas_position_output
from lambda_jax.core.position.relative import (
    global_position_lambdas,
    relative_embeddings,
    relative_position_index,
)
from lambda_jax.core.position.output import (
    choose_local_implementation,
    local_position_lambdas,
    local_position_output,
)
from lambda_jax.core.position.resolve import (
    BANDED_MAX_POSITIONS,
    IMAGE_IMPLEMENTATIONS,
    IMPLEMENTATIONS,
    LAMBDA_IMPLEMENTATIONS,
    MEMORY_BOUNDS,
    MODES,
    OUTPUT_IMPLEMENTATIONS,
    SHIFT_MAX_COMPILED_OFFSETS,
    SHIFT_MAX_OFFSETS,
    autotune_candidates,
    resolve_local_implementation,
)
from lambda_jax.core.position.shift import shifted_position_output
from lambda_jax.core.position.tiled import tiled_position_output

__all__ = [
    "BANDED_MAX_POSITIONS",
    "IMAGE_IMPLEMENTATIONS",
    "IMPLEMENTATIONS",
    "LAMBDA_IMPLEMENTATIONS",
    "MEMORY_BOUNDS",
    "MODES",
    "OUTPUT_IMPLEMENTATIONS",
    "SHIFT_MAX_COMPILED_OFFSETS",
    "SHIFT_MAX_OFFSETS",
    "accumulation_dtype",
    "autotune_candidates",
    "banded_lambda_convolution",
    "choose_local_implementation",
    "global_position_lambdas",
    "lambda_convolution",
    "local_position_lambdas",
    "local_position_output",
    "pallas_position_output",
    "relative_embeddings",
    "relative_position_index",
    "resolve_local_implementation",
    "shifted_position_output",
    "tiled_position_output",
]
