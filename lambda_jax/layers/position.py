"""Position lambdas: :mod:`lambda_jax.core.position` under the name the linen modules have
imported it by."""

from lambda_jax.core.position import *  # noqa: F401,F403
from lambda_jax.core.position import __all__  # noqa: F401
