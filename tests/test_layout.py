"""The package's layers, bottom to top (docs/architecture.md): the pure core imports nothing
above it, imports point down only, no file is over 400 lines, old import paths still
import, and the layer settings are declared once for the linen, causal, NNX and functional
forms."""

import ast
import dataclasses
import importlib
import pathlib

import jax
import jax.numpy as jnp
import pytest

import lambda_jax
from lambda_jax import functional
from lambda_jax.core import settings as core_settings

PACKAGE = pathlib.Path(lambda_jax.__file__).parent
# Each part and the parts of the package it may import; anything else is an arrow upwards.
ALLOWED = {
    "core": {"core"},
    "functional": {"core"},
    "layers": {"core", "layers"},
    "nnx": {"core", "layers", "models", "functional"},
    "models": {"core", "layers", "models"},
    "convert": {"core", "layers", "models", "convert"},
    "data": {"data"},
}


def _part(path: pathlib.Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imported_parts(path: pathlib.Path) -> set[str]:
    """The parts of lambda_jax that the module at ``path`` imports, at any depth of its code."""
    parts = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] if node.module != "lambda_jax" else [
                f"lambda_jax.{alias.name}" for alias in node.names]
        for name in names:
            pieces = name.split(".")
            if pieces[0] == "lambda_jax" and len(pieces) > 1:
                parts.add(pieces[1])
    return parts


def test_imports_point_down_only_and_the_core_imports_nothing_above_it():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        allowed = ALLOWED.get(_part(path))
        if allowed is None:
            continue
        upward = _imported_parts(path) - allowed
        if upward:
            wrong.append(f"{path.relative_to(PACKAGE)} imports {sorted(upward)}")
    assert not wrong, "\n".join(wrong)
    core_files = list((PACKAGE / "core").rglob("*.py"))
    assert len(core_files) >= 10  # the check above did read the core


def test_no_file_of_the_package_is_over_400_lines():
    long = {str(path.relative_to(PACKAGE)): len(path.read_text().splitlines())
            for path in PACKAGE.rglob("*.py")}
    assert {name: n for name, n in long.items() if n > 400} == {}


@pytest.mark.parametrize("module", ["lambda_jax.layers.position", "lambda_jax.layers.pooling",
                                    "lambda_jax.layers.norm", "lambda_jax.weights",
                                    "lambda_jax.functional", "lambda_jax.nnx"])
def test_the_import_paths_users_know_still_import(module):
    assert importlib.import_module(module)


def test_the_old_position_path_is_the_core():
    from lambda_jax.core import position as core_position
    from lambda_jax.layers import position as old_position

    for name in core_position.__all__:
        assert getattr(old_position, name) is getattr(core_position, name)


def _fields(cls) -> dict:
    return {field.name: field.default for field in dataclasses.fields(cls)
            if field.name not in ("parent", "name")}


def test_the_linen_layers_take_their_fields_from_the_settings():
    assert _fields(lambda_jax.LambdaLayer) == {
        **_fields(core_settings.LambdaSettings), "param_dtype": jnp.float32}
    assert _fields(lambda_jax.CausalLambdaLayer) == {
        **_fields(core_settings.CausalSettings), "param_dtype": jnp.float32}
    shared = _fields(core_settings.LambdaFields)
    for cls in (core_settings.LambdaSettings, core_settings.CausalSettings):
        assert set(shared) <= set(_fields(cls))
    # A field added to the shared base would reach both layers: every name is declared once.
    assert set(_fields(core_settings.LambdaSettings)) & set(_fields(core_settings.CausalSettings)) \
        == set(shared) | {"dtype"}


def test_every_setting_reaches_the_nnx_and_functional_layers():
    """Every field of ``LambdaSettings``, set away from its default, is taken by the linen,
    NNX and functional layers alike, and they compute the same."""
    from flax import nnx

    import lambda_jax.nnx

    changed = dict(dim_out=8, dim_k=4, heads=2, dim_u=2, position="local", receptive_field=3,
                   implementation="conv", use_batchnorm=True, position_bias=True, stride=2,
                   stride_pool="2x2", axis_name=None, bn_momentum=0.8, bn_epsilon=1e-3,
                   dtype=jnp.float32)
    assert set(changed) == set(_fields(core_settings.LambdaSettings))
    defaults = _fields(core_settings.LambdaSettings)
    assert all(changed[name] != defaults[name] for name in changed
               if name not in ("dim_out", "use_batchnorm", "axis_name", "dtype"))
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 5))
    linen_layer = lambda_jax.LambdaLayer(**changed)
    variables = linen_layer.init(jax.random.key(1), x)
    expected = linen_layer.apply(variables, x)
    nnx_layer = lambda_jax.nnx.LambdaLayer.from_linen(linen_layer, variables,
                                                      use_running_average=True)
    assert nnx_layer.settings == linen_layer.settings == core_settings.LambdaSettings(**changed)
    native = lambda_jax.nnx.LambdaLayer(5, rngs=nnx.Rngs(0), spatial_dims=2, **changed)
    assert native.settings == linen_layer.settings
    pure = functional.lambda_layer(variables["params"], x,
                                   batch_stats=variables["batch_stats"], **changed)
    assert jnp.allclose(nnx_layer(x), expected, atol=1e-6)
    assert jnp.allclose(pure, expected, atol=1e-6)
    with pytest.raises(TypeError, match="unexpected keyword"):
        functional.lambda_layer(variables["params"], x, batch_stats=variables["batch_stats"],
                                not_a_setting=1, **changed)
