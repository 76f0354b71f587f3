"""Flax NNX modules: the lambda layer on the functional core, and the registered models.

:class:`LambdaLayer` is a native ``nnx.Module`` that owns its variables and computes with
:func:`lambda_jax.functional.lambda_layer`, so it equals the linen
:class:`lambda_jax.LambdaLayer` with the same variables. Its variables sit at the linen
layer's paths (``query.kernel``, ``query_norm.scale``, ``query_norm.mean``,
``local_embeddings``, ...). :func:`create_model` wraps any model of
:func:`lambda_jax.create_model` with ``flax.nnx.bridge.ToNNX``.

Like NNX's own ``BatchNorm``, the modules start in training mode; ``.eval()`` switches batch
norm to the running averages and ``.train()`` back.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lambda_jax import models as linen_models
from lambda_jax.core import layer as core_layer
from lambda_jax.core.settings import EMBEDDING_NAMES, LambdaSettings, check_tree
from lambda_jax.layers import lambda_layer as linen_lambda_layer

__all__ = ["BridgedModel", "LambdaLayer", "create_model"]

_NORMS = ("query_norm", "value_norm")


class LambdaLayer(nnx.Module):
    """Multi-query lambda layer for sequences, images and volumes, as an NNX module.

    ``layer(x)`` maps ``[batch, *spatial, in_features]`` (1 to 3 spatial axes) to
    ``[batch, *spatial, dim_out]`` (each spatial size halved when ``stride=2``), as
    :class:`lambda_jax.LambdaLayer` does; see it for the maths and every setting.

    Args:
      in_features: channels of the input.
      dim_out: output channels; divisible by ``heads``.
      spatial_size: ``(S_1, ..., S_s)``, the input size that a ``position="global"`` layer's
        relative table ``[2*S_1-1, ..., k, u]`` is built for (required then).
      spatial_dims: number of spatial axes (1 sequences, 2 images, 3 volumes) of a
        ``position="local"`` layer's kernel ``[r, ..., r, k, u]``; default
        ``len(spatial_size)`` or 2.
      context_features: channels of the context (keys and values); default ``in_features``.
      own_embeddings: False for a layer without position embeddings of its own, called with
        ``embeddings=`` (shared embeddings).
      use_running_average: start in evaluation mode (True) rather than training mode.
      param_dtype: parameter dtype.
      rngs: the random streams of the initialisation (``params``).
      **settings: the other fields of :class:`lambda_jax.LambdaLayer` (``dim_k``, ``heads``,
        ``dim_u``, ``position``, ``receptive_field``, ``implementation``,
        ``use_batchnorm``, ``position_bias``, ``stride``, ``stride_pool``, ``axis_name``,
        ``bn_momentum``, ``bn_epsilon``, ``dtype``).

    Raises:
      ValueError: for an impossible setting, naming it.
    """

    def __init__(
        self,
        in_features: int,
        dim_out: int,
        *,
        spatial_size: Optional[Sequence[int]] = None,
        spatial_dims: Optional[int] = None,
        context_features: Optional[int] = None,
        own_embeddings: bool = True,
        use_running_average: bool = False,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
        **settings: Any,
    ):
        self.settings = LambdaSettings(dim_out=dim_out, **settings)
        self.settings.check()
        position = self.settings.position
        if spatial_size is not None:
            spatial_size = tuple(int(size) for size in spatial_size)
            if not 1 <= len(spatial_size) <= 3 or min(spatial_size) < 1:
                raise ValueError("LambdaLayer spatial_size must be 1 to 3 positive sizes, got "
                                 f"{spatial_size}.")
        if position == "global" and own_embeddings and spatial_size is None:
            raise ValueError(
                "LambdaLayer with position='global' needs spatial_size=(S_1, ..., S_s), the "
                "input size its relative table is built for.")
        spatial_dims = spatial_dims or (len(spatial_size) if spatial_size else 2)
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"LambdaLayer spatial_dims must be 1, 2 or 3, got {spatial_dims}.")
        context_features = context_features or in_features
        for name, features in (("in_features", in_features),
                               ("context_features", context_features)):
            if features < 1:
                raise ValueError(f"LambdaLayer {name} must be positive, got {features}.")
        self.own_embeddings = own_embeddings
        self.use_running_average = use_running_average
        shapes = self.settings.param_shapes(in_features, context_features,
                                            spatial_size or (1,) * spatial_dims)
        stddevs = {"query": (self.settings.dim_k * in_features) ** -0.5,
                   "key": context_features**-0.5, "value": context_features**-0.5}
        for name, stddev in stddevs.items():
            fan_in, features = shapes[name]["kernel"]
            setattr(self, name, nnx.Linear(
                fan_in, features, use_bias=False, param_dtype=param_dtype, rngs=rngs,
                kernel_init=jax.nn.initializers.normal(stddev)))
        for name in _NORMS:
            if name in shapes:
                setattr(self, name, nnx.BatchNorm(
                    shapes[name]["scale"][0], momentum=self.settings.bn_momentum,
                    epsilon=self.settings.bn_epsilon, use_running_average=use_running_average,
                    param_dtype=param_dtype, rngs=rngs))
        if position != "none" and own_embeddings:
            shape = shapes[EMBEDDING_NAMES[position]]
            setattr(self, EMBEDDING_NAMES[position], nnx.Param(
                jax.random.normal(rngs.params(), shape, param_dtype)))
        if self.settings.position_bias:
            self.position_bias = nnx.Param(jnp.zeros(shapes["position_bias"], param_dtype))

    def _variable_names(self) -> list[str]:
        names = ["query", "key", "value"]
        if self.settings.use_batchnorm:
            names += list(_NORMS)
        if self.settings.position != "none" and self.own_embeddings:
            names.append(EMBEDDING_NAMES[self.settings.position])
        if self.settings.position_bias:
            names.append("position_bias")
        return names

    def linen_variables(self) -> dict[str, Any]:
        """The variables as :class:`lambda_jax.LambdaLayer` (linen) holds them:
        ``{"params": ..., "batch_stats": ...}`` (``batch_stats`` with batch norm only)."""
        params: dict[str, Any] = {}
        stats: dict[str, Any] = {}
        for name in self._variable_names():
            holder = getattr(self, name)
            if name in ("query", "key", "value"):
                params[name] = {"kernel": holder.kernel.get_value()}
            elif name in _NORMS:
                params[name] = {"scale": holder.scale.get_value(),
                                "bias": holder.bias.get_value()}
                stats[name] = {"mean": holder.mean.get_value(), "var": holder.var.get_value()}
            else:
                params[name] = holder.get_value()
        return {"params": params, "batch_stats": stats} if stats else {"params": params}

    def _load(self, variables: Mapping[str, Any]) -> None:
        """Sets every variable from linen ``variables`` of the same names and shapes."""
        targets = self.linen_variables()
        for collection, tree in targets.items():
            given = variables.get(collection)
            if given is None:
                raise ValueError(f"The linen variables have no {collection!r}; this layer "
                                 f"needs {sorted(tree)}.")
            shapes = jax.tree.map(lambda leaf: tuple(leaf.shape), tree)
            check_tree(collection, given, shapes)
        for name in self._variable_names():
            holder = getattr(self, name)
            if name in ("query", "key", "value"):
                holder.kernel.set_value(jnp.asarray(variables["params"][name]["kernel"]))
            elif name in _NORMS:
                for leaf in ("scale", "bias"):
                    getattr(holder, leaf).set_value(jnp.asarray(variables["params"][name][leaf]))
                for leaf in ("mean", "var"):
                    getattr(holder, leaf).set_value(
                        jnp.asarray(variables["batch_stats"][name][leaf]))
            else:
                holder.set_value(jnp.asarray(variables["params"][name]))

    @classmethod
    def from_linen(
        cls,
        layer: linen_lambda_layer.LambdaLayer,
        variables: Mapping[str, Any],
        *,
        use_running_average: bool = False,
    ) -> "LambdaLayer":
        """The NNX layer that computes what the linen ``layer`` computes with ``variables``.

        Args:
          layer: a :class:`lambda_jax.LambdaLayer` (linen).
          variables: its ``{"params": ..., "batch_stats": ...}`` (``layer.init`` or a
            checkpoint; copied, not aliased).
          use_running_average: start in evaluation mode.

        Raises:
          ValueError: if a variable is missing or its shape does not fit ``layer``.
        """
        if not isinstance(layer, linen_lambda_layer.LambdaLayer):
            raise TypeError(f"LambdaLayer.from_linen takes a lambda_jax.LambdaLayer (linen), "
                            f"got {type(layer).__name__}.")
        params = variables.get("params", {})
        if "query" not in params or "key" not in params:
            raise ValueError("The linen variables have no params['query'] or params['key']; "
                             "pass the layer's {'params': ..., 'batch_stats': ...}.")
        settings = layer.settings
        table = params.get(EMBEDDING_NAMES["global"])
        kernel = params.get(EMBEDDING_NAMES["local"])
        own = settings.position == "none" or EMBEDDING_NAMES[settings.position] in params
        spatial_size = None
        spatial_dims = None
        if settings.position == "global" and table is not None:
            spatial_size = tuple((size + 1) // 2 for size in table.shape[:-2])
        if settings.position == "local" and kernel is not None:
            spatial_dims = kernel.ndim - 2
        fields = {field.name: getattr(settings, field.name)
                  for field in dataclasses.fields(settings) if field.name != "dim_out"}
        module = nnx.eval_shape(lambda: cls(
            params["query"]["kernel"].shape[0], settings.dim_out, spatial_size=spatial_size,
            spatial_dims=spatial_dims, context_features=params["key"]["kernel"].shape[0],
            own_embeddings=own, use_running_average=use_running_average,
            param_dtype=layer.param_dtype, rngs=nnx.Rngs(0), **fields))
        module._load(variables)
        return module

    def __call__(
        self,
        x: jax.Array,
        context: Optional[jax.Array] = None,
        embeddings: Optional[jax.Array] = None,
    ) -> jax.Array:
        """Applies the layer; in training mode it updates the batch-norm running averages.

        Args:
          x: ``[batch, *spatial, in_features]``.
          context: ``[batch, *context_spatial, context_features]`` for the keys and values
            (default ``x``); with position lambdas it must have the positions of ``x``.
          embeddings: position embeddings ``[2*S_1-1, ..., k, u]`` (global) or
            ``[r, ..., r, k, u]`` (local) used instead of the layer's own.

        Returns:
          ``[batch, *spatial, dim_out]`` (each spatial size halved when ``stride=2``).
        """
        settings = self.settings
        if (embeddings is None and not self.own_embeddings and settings.position != "none"):
            raise ValueError("This LambdaLayer holds no position embeddings "
                             "(own_embeddings=False): pass embeddings=.")
        variables = self.linen_variables()
        params, stats = variables["params"], variables.get("batch_stats")
        core_layer.check_call(settings, x, context, embeddings)
        core_layer.check_variables(settings, params, stats, x, context, embeddings)
        train = not self.use_running_average
        out, new_stats = core_layer.apply_lambda_layer(settings, params, x, context,
                                                       embeddings, stats, train)
        if train:
            for name, norm_stats in new_stats.items():
                getattr(self, name).mean.set_value(norm_stats["mean"])
                getattr(self, name).var.set_value(norm_stats["var"])
        if settings.stride == 2:
            out = core_layer.pool_output(settings, out)
        return out


class BridgedModel(nnx.Module):
    """A linen model of :func:`lambda_jax.create_model` as an NNX module
    (``flax.nnx.bridge.ToNNX``), with ``.train()`` / ``.eval()`` for its batch norms.

    ``model(images)`` maps ``[batch, height, width, 3]`` to logits ``[batch, num_classes]``;
    in training mode it updates the running averages.

    Args:
      module: the unbound linen model.
      image_size: the images' height and width used to create the variables.
      use_running_average: start in evaluation mode.
      rngs: the random streams of the initialisation.
    """

    def __init__(self, module: Any, *, image_size: int, use_running_average: bool = False,
                 rngs: nnx.Rngs):
        self.model = nnx.bridge.ToNNX(module, rngs=rngs)
        nnx.bridge.lazy_init(self.model, jnp.zeros((1, image_size, image_size, 3)),
                             train=False)
        self.use_running_average = use_running_average

    def linen_variables(self) -> dict[str, Any]:
        """The variables as the linen model holds them: ``{"params": ..., "batch_stats": ...}``
        (for ``module.apply`` or a linen checkpoint)."""
        variables = {"params": nnx.to_pure_dict(nnx.state(self.model, nnx.Param))}
        stats = nnx.to_pure_dict(nnx.state(self.model, nnx.BatchStat))
        return {**variables, "batch_stats": stats} if stats else variables

    def __call__(self, images: jax.Array) -> jax.Array:
        """Logits ``[batch, num_classes]`` of ``images: [batch, height, width, 3]``."""
        if self.use_running_average:
            return self.model(images, train=False)
        return self.model(images, train=True, mutable=["batch_stats"])


def create_model(name: str, *, image_size: int, rngs: nnx.Rngs,
                 use_running_average: bool = False, **kwargs: Any) -> BridgedModel:
    """The model registered as ``name`` (see :func:`lambda_jax.list_models`) in NNX.

    Args:
      name: a name of :func:`lambda_jax.list_models`.
      image_size: the images' height and width (global-position models need theirs).
      rngs: the random streams of the initialisation.
      use_running_average: start in evaluation mode.
      **kwargs: ``num_classes``, ``dtype`` and overrides, as for
        :func:`lambda_jax.create_model`.

    Returns:
      A :class:`BridgedModel` whose ``nnx.state`` holds the linen model's variables under
      their linen paths.
    """
    return BridgedModel(linen_models.create_model(name, **kwargs), image_size=image_size,
                        use_running_average=use_running_average, rngs=rngs)
