"""Tests of the model zoo: names, parameter counts against the paper, shapes, training."""

import dataclasses
import functools
import hashlib
import json
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import lambda_jax
from lambda_jax.models import (
    ARCHITECTURES,
    AttentionSlot,
    AugmentedConvSlot,
    AxialAttentionSlot,
    Bottleneck,
    ConvSlot,
    LambdaSlot,
    ResNet,
    SAN,
    SANBlock,
    SANSlot,
    registry,
    resnet,
    slot as slot_lib,
)


def _key(seed):
    # RBG keys: compiling threefry random bits takes seconds per shape on a CPU, and the
    # models behave the same with either generator.
    return jax.random.key(seed, impl="rbg")


_ABLATION = "the paper's ablation table over k, h, u, as leaderj1001/LambdaNetworks' README lists it"
# (name, parameters in millions as printed, where they are printed).
PAPER_PARAMETER_COUNTS = [
    ("resnet50", 25.6, "Table 3 'convolution'; placement table C-C-C-C"),
    ("resnet50_se_table3", 28.1, "Table 3 'conv + channel attention'"),
    ("resnet50_lambda_table3", 15.0, "Table 3 'lambda layer'; placement table L-L-L-L"),
    ("resnet50_lambda_u4_table3", 16.0, "Table 3 'lambda layer, u=4'"),
    ("resnet50_local_attention_table3", 18.0, "Table 3 'local relative self-attention'"),
    ("resnet50_augmented_attention_table3", 25.8, "Table 3 'conv + relative self-attention'"),
    ("san19_patchwise", 20.5, "Table 3 'local relative self-attention (Zhao 2020)'"),
    ("resnet50_placement_lccc", 25.5, "placement table L-C-C-C"),
    ("resnet50_placement_llcc", 25.0, "placement table L-L-C-C"),
    ("resnet50_placement_lllc", 21.7, "placement table L-L-L-C"),
    ("resnet50_placement_clll", 15.1, "placement table C-L-L-L"),
    ("resnet50_placement_ccll", 15.4, "placement table C-C-L-L"),
    ("resnet50_placement_cccl", 18.8, "placement table C-C-C-L"),
    ("resnet50_lambda_k8_h2_u1", 14.8, _ABLATION),
    ("resnet50_lambda_k2_h4_u1", 14.7, _ABLATION),
    ("resnet50_lambda_k4_h4_u1", 14.7, _ABLATION),
    ("resnet50_lambda_k8_h4_u1", 14.8, _ABLATION),
    ("resnet50_lambda_k32_h4_u1", 15.4, _ABLATION),
    ("resnet50_lambda_k2_h8_u1", 14.7, _ABLATION),
    ("resnet50_lambda_k4_h8_u1", 14.7, _ABLATION),
    ("resnet50_lambda_k8_h8_u1", 14.7, _ABLATION),
    ("resnet50_lambda_k16_h8_u1", 15.1, _ABLATION),
    ("resnet50_lambda_k32_h8_u1", 15.7, _ABLATION),
    ("resnet50_lambda_k8_h8_u4", 15.3, _ABLATION),
    ("resnet50_lambda_k8_h8_u8", 16.0, _ABLATION),
]

# sha256 (first 16 hex digits) of the sorted "path:shape:dtype" lines of every variable,
# and their number, at each model's resolution: the parameter paths checkpoints and the
# converters rely on, recorded before slots built their own layers and names became aliases.
VARIABLE_TREES = {
    "attention_resnet26_cifar": ("f8598ed2981aa490", 163),
    "lambda_resnet101": ("d95841759365e1c0", 735),
    "lambda_resnet152": ("f6dd6ebeac1d15fe", 1091),
    "lambda_resnet200": ("ffeae0498d4a1ac7", 1395),
    "lambda_resnet26_cifar": ("687cffc2d58840d2", 191),
    "lambda_resnet26rpt_256": ("6883180bcda8de9d", 190),
    "lambda_resnet26t": ("7da6204271765dbc", 193),
    "lambda_resnet270": ("f40eb40edb069025", 1862),
    "lambda_resnet350": ("8742eb1bfa4f24a9", 2356),
    "lambda_resnet38_cifar": ("f909af6705dae910", 284),
    "lambda_resnet420": ("f1f1d56634156eff", 2815),
    "lambda_resnet50": ("fbe08211508ae430", 390),
    "lambda_resnet50ts": ("169f6739069202be", 337),
    "lambda_resnet_tiny": ("33d70c0306ca010f", 109),
    "resnet26_cifar": ("2d972aea96a7d183", 147),
    "resnet50": ("ab7514fc75e4c558", 267),
    "resnet50_augmented_attention_table3": ("d418c47496e064ce", 345),
    "resnet50_axial_attention_table4": ("9c889085b3d08660", 379),
    "resnet50_global_attention_table4": ("143f04262b00935a", 331),
    "resnet50_lambda_conv7_table4": ("06c1df1b3b92617a", 443),
    "resnet50_lambda_k16_h8_u1": ("b4518fc5603f2199", 443),
    "resnet50_lambda_k2_h4_u1": ("55a5905c276c1cc1", 443),
    "resnet50_lambda_k2_h8_u1": ("304507822163045a", 443),
    "resnet50_lambda_k32_h4_u1": ("a77eced16f4af653", 443),
    "resnet50_lambda_k32_h8_u1": ("3a1157c6936df649", 443),
    "resnet50_lambda_k4_h4_u1": ("90d22c50d7582530", 443),
    "resnet50_lambda_k4_h8_u1": ("8cf9692c4d4a183a", 443),
    "resnet50_lambda_k8_h16_u1": ("4561efb15ab6ddf9", 443),
    "resnet50_lambda_k8_h2_u1": ("9ebf5851110259f1", 443),
    "resnet50_lambda_k8_h4_u1": ("e85c65811cd126da", 443),
    "resnet50_lambda_k8_h8_u1": ("f7f4a9c418bc50f4", 443),
    "resnet50_lambda_k8_h8_u4": ("37eba3813094aa02", 443),
    "resnet50_lambda_k8_h8_u8": ("14ce3c99b71db74f", 443),
    "resnet50_lambda_shared_embeddings_table4": ("2be5d808fe99eda4", 428),
    "resnet50_lambda_table3": ("a412c248c147956a", 443),
    "resnet50_lambda_u4_table3": ("658d095792842f54", 443),
    "resnet50_local_attention_table3": ("7905473481baa2ab", 331),
    "resnet50_placement_cccl": ("f16dc08cbcb24396", 300),
    "resnet50_placement_ccll": ("628bce1e9b4fd53c", 366),
    "resnet50_placement_clll": ("8c9f12acef13dc22", 410),
    "resnet50_placement_lccc": ("7e55232fe14f0613", 300),
    "resnet50_placement_llcc": ("2c6f9938adc87e86", 344),
    "resnet50_placement_lllc": ("83383d507381df2b", 410),
    "resnet50_san_patchwise": ("a86487d50a3c4f5a", 523),
    "resnet50_se_table3": ("57c9348206091000", 331),
    "resnet_rs101": ("e367f78be03aa702", 669),
    "resnet_rs152": ("d0ad43ded2dadc4f", 992),
    "resnet_rs200": ("91cb0c8fc9f87d6d", 1296),
    "resnet_rs270": ("6b58a03045c81b0b", 1752),
    "resnet_rs350": ("314544ddd687ee60", 2246),
    "resnet_rs420": ("d9108dbbe7195c1b", 2683),
    "resnet_rs50": ("826b5a056b441322", 346),
    "san10_patchwise": ("21527156ac5f3aa3", 302),
    "san15_patchwise": ("37ed893bd57888c3", 437),
    "san19_patchwise": ("498ad2bad401ee0b", 545),
}


def _variable_tree_digest(variables):
    rows = sorted(f"{jax.tree_util.keystr(path, simple=True, separator='/')}:"
                  f"{tuple(leaf.shape)}:{leaf.dtype}"
                  for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0])
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16], len(rows)


@functools.lru_cache(maxsize=None)
def _abstract_model(name: str):
    """Shapes only: (logits, variables) at the model's intended resolution."""
    model = lambda_jax.create_model(name)
    size = ARCHITECTURES[name]["resolution"]
    images = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.init_with_output(_key(0), x, train=False), images)


def _count(name: str) -> int:
    return sum(math.prod(p.shape) for p in jax.tree.leaves(_abstract_model(name)[1]["params"]))


@pytest.mark.parametrize("name,millions,source", PAPER_PARAMETER_COUNTS)
def test_parameter_counts_match_the_paper(name, millions, source):
    count = _count(name)
    assert abs(count / 1e6 - millions) / millions < 0.02, (name, count, source)


def test_ablation_row_k8_h16_has_the_documented_count():
    # The paper prints 15.6M for this row; docs/parameter-counts.md says why 14.90M.
    assert _count("resnet50_lambda_k8_h16_u1") == pytest.approx(14.90e6, rel=0.002)
    assert _count("resnet50_lambda_k8_h16_u1") > _count("resnet50_lambda_k8_h8_u1")


@pytest.mark.parametrize("name,millions", [
    ("san10_patchwise", 11.8),  # SAN's README
    ("san15_patchwise", 16.2),  # SAN's README
    ("resnet50_san_patchwise", 17.15),  # our count: a hybrid, in no paper
])
def test_san_parameter_counts(name, millions):
    count = _count(name)
    assert abs(count / 1e6 - millions) / millions < 0.02, (name, count)


@pytest.mark.parametrize("name", lambda_jax.list_models())
def test_every_model_gives_logits_at_its_resolution(name):
    logits, variables = _abstract_model(name)
    assert logits.shape == (2, 1000)
    assert logits.dtype == jnp.float32
    assert set(variables) == {"params", "batch_stats"}


@pytest.mark.parametrize("name", lambda_jax.list_models())
def test_variable_trees_keep_their_paths(name):
    assert _variable_tree_digest(_abstract_model(name)[1]) == VARIABLE_TREES[name], name


def test_a_model_named_twice_is_one_model_with_aliases():
    aliases = lambda_jax.models.model_aliases()
    assert aliases == {
        "resnet50_placement_cccc": "resnet50",
        "resnet50_placement_llll": "resnet50_lambda_table3",
        "resnet50_lambda_k16_h4_u1": "resnet50_lambda_table3",
        "resnet50_lambda_k16_h4_u4": "resnet50_lambda_u4_table3",
    }
    names = lambda_jax.list_models()
    assert sorted(VARIABLE_TREES) == names and not set(aliases) & set(names)
    assert lambda_jax.list_models(include_aliases=True) == sorted(names + list(aliases))
    for alias, name in aliases.items():
        assert lambda_jax.create_model(alias) == lambda_jax.create_model(name)
        assert alias in ARCHITECTURES[name]["description"]
    # No two names left give the same model.
    models = [lambda_jax.create_model(name) for name in names]
    assert len(set(models)) == len(models)
    with pytest.raises(ValueError, match="already registered"):
        registry.register_alias("resnet50_placement_cccc", "resnet50")
    with pytest.raises(ValueError, match="no model is registered as 'resnet51'"):
        registry.register_alias("resnet51_alias", "resnet51")


def _lambda_layer_settings(model, images, method="init"):
    """``{layer path: (implementation, stride_pool)}`` of every LambdaLayer the model calls,
    read from the bound layers while tracing ``model.init`` (nothing runs)."""
    seen = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, lambda_jax.LambdaLayer) and context.method_name == "__call__":
            layer = context.module
            seen["/".join(layer.path)] = (layer.implementation, layer.stride_pool)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda: model.init(_key(0), images, train=False))
    return seen


def test_lambda_implementation_reaches_every_lambda_layer():
    images = jnp.zeros((2, 16, 16, 3))
    default = _lambda_layer_settings(lambda_jax.create_model("lambda_resnet_tiny"), images)
    assert sorted(default) == ["stage3_block1/lambda2", "stage4_block1/lambda2"]
    assert set(default.values()) == {("auto", "3x3")}
    # As train.py passes --config.model_overrides.lambda_implementation=conv.
    config = ml_collections.ConfigDict({"model_overrides": {"lambda_implementation": "conv"}})
    model = lambda_jax.create_model("lambda_resnet_tiny", num_classes=10,
                                    **config.model_overrides)
    assert model.lambda_implementation == "conv"
    assert set(_lambda_layer_settings(model, images).values()) == {("conv", "3x3")}
    # A slot's own setting wins over the model's.
    mixed = model.clone(stage_slots=("conv", "conv", LambdaSlot(receptive_field=5),
                                     {"kind": "lambda", "receptive_field": 5,
                                      "implementation": "shift"}))
    assert _lambda_layer_settings(mixed, images) == {
        "stage3_block1/lambda2": ("conv", "3x3"), "stage4_block1/lambda2": ("shift", "3x3")}
    timm = lambda_jax.create_model("lambda_resnet26t", lambda_implementation="banded")
    assert set(_lambda_layer_settings(timm, jnp.zeros((1, 64, 64, 3))).values()) == {
        ("banded", "2x2")}


def test_lambda_implementation_changes_the_program():
    # "conv" is one convolution per lambda layer more than "shift", which has none.
    images = jnp.zeros((2, 16, 16, 3))

    def convolutions(implementation):
        model = lambda_jax.create_model("lambda_resnet_tiny", lambda_implementation=implementation)
        variables = jax.eval_shape(lambda: model.init(_key(0), images, train=False))
        jaxpr = jax.make_jaxpr(model.apply)(variables, images)
        return str(jaxpr).count("conv_general_dilated")

    assert convolutions("conv") == convolutions("shift") + 2


def test_bad_lambda_implementation_or_stride_pool_fails_at_create_model():
    with pytest.raises(ValueError, match="ResNet.lambda_implementation must be None .* or one "
                                         "of \\('auto', "):
        lambda_jax.create_model("lambda_resnet50", lambda_implementation="fast")
    with pytest.raises(ValueError, match="LambdaSlot.implementation must be None"):
        lambda_jax.create_model("resnet50", stage_slots=[{"kind": "lambda",
                                                          "implementation": "Conv"}] * 4)
    with pytest.raises(ValueError, match="TimmLambdaResNet.lambda_implementation must be None"):
        lambda_jax.create_model("lambda_resnet26t", lambda_implementation="fast")
    with pytest.raises(ValueError, match="ResNet.stride_pool must be one of \\('3x3', "
                                         "'3x3_symmetric', '2x2'\\)"):
        lambda_jax.create_model("lambda_resnet50", stride_pool="3x3_same")
    with pytest.raises(ValueError, match="Unknown settings \\['lambda_implementation'\\]"):
        lambda_jax.create_model("san10_patchwise", lambda_implementation="conv")


def test_every_resnet_records_its_stride_pool():
    resnets = [name for name in lambda_jax.list_models()
               if isinstance(lambda_jax.create_model(name), ResNet)]
    assert {"resnet50", "lambda_resnet50", "lambda_resnet_tiny"} <= set(resnets)
    assert not {"san19_patchwise", "lambda_resnet26t"} & set(resnets)
    for name in resnets:
        assert ARCHITECTURES[name]["stride_pool"] == "3x3", name
        assert lambda_jax.create_model(name).stride_pool == "3x3", name
    old = lambda_jax.create_model("lambda_resnet_tiny", stride_pool="3x3_symmetric")
    assert set(_lambda_layer_settings(old, jnp.zeros((1, 16, 16, 3))).values()) == {
        ("auto", "3x3")}  # the layers do not stride: the blocks pool (tests/test_pooling.py)
    assert old.stride_pool == "3x3_symmetric"


def test_model_settings_record_what_the_model_computes():
    settings = lambda_jax.models.model_settings(
        lambda_jax.create_model("lambda_resnet_tiny", dtype=jnp.bfloat16))
    assert json.loads(json.dumps(settings)) == settings
    assert settings["stride_pool"] == "3x3" and settings["dtype"] == "bfloat16"
    assert settings["stage_slots"][3][0] == {
        "kind": "lambda", "dim_k": 16, "heads": 4, "dim_u": 1, "position": "local",
        "receptive_field": 5, "shared_embeddings": False, "implementation": None}
    old = lambda_jax.create_model("lambda_resnet_tiny", dtype=jnp.bfloat16,
                                  stride_pool="3x3_symmetric")
    assert lambda_jax.models.model_settings(old) == {**settings, "stride_pool": "3x3_symmetric"}
    assert lambda_jax.models.model_settings(
        lambda_jax.create_model("resnet50_placement_llll")) == lambda_jax.models.model_settings(
        lambda_jax.create_model("resnet50_lambda_table3"))
    timm = lambda_jax.models.model_settings(lambda_jax.create_model("lambda_resnet26t"))
    assert timm["stage_blocks"][2] == ["bottle", "self_attn"] and timm["dtype"] == "float32"


def test_a_new_slot_kind_is_one_class(monkeypatch):
    monkeypatch.setattr(slot_lib, "_SLOT_CLASSES", dict(slot_lib._SLOT_CLASSES))

    @dataclasses.dataclass(frozen=True)
    class DenseSlot(resnet.Slot, kind="dense"):
        scale: float = 1.0

        def build(self, block):
            dense = nn.Dense(block.width, name="dense2")
            return lambda y, train, embeddings: self.scale * dense(y)

    model = ResNet(num_classes=3, stage_depths=(1, 1), stage_widths=(4, 8),
                   stage_strides=(1, 2), stage_slots=("dense", {"kind": "dense", "scale": 2.0}),
                   stem="cifar", stem_width=4)
    assert model.resolved_slots() == ((DenseSlot(),), (DenseSlot(scale=2.0),))
    logits, variables = jax.eval_shape(
        lambda: model.init_with_output(_key(0), jnp.zeros((1, 6, 6, 3))))
    assert logits.shape == (1, 3)
    assert variables["params"]["stage1_block1"]["dense2"]["kernel"].shape == (4, 4)
    assert variables["params"]["stage2_block1"]["dense2"]["kernel"].shape == (8, 8)
    with pytest.raises(ValueError, match="A slot kind named 'dense' already exists"):
        class AnotherDenseSlot(resnet.Slot, kind="dense"):
            pass


def test_lambda_resnets_are_resnet_rs_bodies():
    params = _abstract_model("lambda_resnet50")[1]["params"]
    # ResNet-D stem with the max pool replaced by a strided convolution.
    assert [params[f"stem_conv{i}"]["kernel"].shape for i in range(1, 5)] == [
        (3, 3, 3, 32), (3, 3, 32, 32), (3, 3, 32, 64), (3, 3, 64, 64)]
    first_c5 = params["stage4_block1"]
    assert first_c5["se"]["reduce"]["kernel"].shape == (2048, 512)
    assert first_c5["shortcut_conv"]["kernel"].shape == (1, 1, 1024, 2048)
    assert "lambda2" in first_c5 and "conv2" in params["stage3_block1"]
    # The convolution counterpart differs only in the slots.
    assert _count("resnet_rs50") > _count("lambda_resnet50")
    assert _count("resnet_rs50") == pytest.approx(35.7e6, rel=0.01)  # ResNet-RS-50 in the ResNet-RS paper


def test_list_models_is_sorted_and_holds_the_families():
    names = lambda_jax.list_models()
    assert names == sorted(names)
    for depth in (50, 101, 152, 200, 270, 350, 420):
        assert f"lambda_resnet{depth}" in names
    for name in ("lambda_resnet26_cifar", "lambda_resnet38_cifar", "resnet26_cifar"):
        assert name in names


def test_unknown_name_lists_the_known_names():
    with pytest.raises(ValueError, match="Unknown model 'lambda_resnet51'.*lambda_resnet50"):
        lambda_jax.create_model("lambda_resnet51")


def test_unknown_override_is_rejected():
    with pytest.raises(ValueError, match="Unknown settings \\['drop_rate'\\].*drop_path_rate"):
        lambda_jax.create_model("resnet50", drop_rate=0.1)


def test_overrides_from_configs_give_a_hashable_model():
    model = lambda_jax.create_model(
        "resnet50", stage_depths=[1, 2], stage_widths=[8, 16], stage_strides=[1, 2],
        stage_slots=["conv", [{"kind": "lambda", "receptive_field": 7, "dim_u": 2}, "attention"]],
    )
    assert model.stage_slots == ((ConvSlot(),), (LambdaSlot(receptive_field=7, dim_u=2),
                                                 AttentionSlot()))
    model = lambda_jax.create_model(
        "resnet50", stage_depths=[1, 1], stage_widths=[8, 16], stage_strides=[1, 2],
        stage_slots=[{"kind": "san", "share_planes": 4}, "augmented_conv"],
    )
    assert model.stage_slots == ((SANSlot(share_planes=4),), (AugmentedConvSlot(),))
    assert hash(model) == hash(model.clone())
    with pytest.raises(ValueError, match="Unknown settings \\['r'\\] for a 'lambda' slot"):
        lambda_jax.create_model("resnet50", stage_slots=[{"kind": "lambda", "r": 7}] * 4)
    with pytest.raises(ValueError, match="stage_slots has 3 entries but there are 4 stages"):
        lambda_jax.create_model("resnet50", stage_slots=["conv"] * 3)


def test_register_model_adds_a_factory(monkeypatch):
    monkeypatch.setattr(registry, "_FACTORIES", dict(registry._FACTORIES))

    @registry.register_model("my_resnet")
    def my_resnet(*, num_classes, dtype, **overrides):
        return ResNet(num_classes=num_classes, dtype=dtype, stage_depths=(1, 1), **overrides)

    assert "my_resnet" in lambda_jax.list_models()
    model = lambda_jax.create_model("my_resnet", num_classes=7, stage_widths=(8, 16),
                                    stage_strides=(1, 2), stage_slots=("conv", "conv"))
    assert model.num_classes == 7 and model.stage_widths == (8, 16)
    with pytest.raises(ValueError, match="already registered"):
        registry.register_model("my_resnet")(my_resnet)


def test_lambda_resnet_places_lambda_layers_in_c4_and_c5():
    slots = ARCHITECTURES["lambda_resnet50"]["stage_slots"]
    c4, c5 = slots[2], slots[3]
    assert [isinstance(s, LambdaSlot) for s in c4] == [False] * 5 + [True]
    assert c5 == LambdaSlot()
    c4_420 = ARCHITECTURES["lambda_resnet420"]["stage_slots"][2]
    assert sum(isinstance(s, LambdaSlot) for s in c4_420) == 8 and len(c4_420) == 87


def _tiny(**overrides):
    return lambda_jax.create_model("lambda_resnet_tiny", num_classes=10, **overrides)


def _images(batch=8, size=16, seed=0):
    return jnp.asarray(np.random.RandomState(seed).normal(size=(batch, size, size, 3)), jnp.float32)


@pytest.fixture(scope="module")
def tiny_variables():
    """Variables of lambda_resnet_tiny for 10 classes (initialised once: compiling is slow)."""
    model = _tiny()
    return jax.jit(lambda x: model.init(_key(0), x, train=False))(_images())


def _micro(**overrides):
    """A one-block ResNet with a lambda slot: cheap to compile, exercises every code path."""
    return ResNet(num_classes=3, stage_depths=(1,), stage_widths=(8,), stage_strides=(1,),
                  stage_slots=(LambdaSlot(dim_k=4, heads=2, receptive_field=3),), stem="cifar",
                  stem_width=8, **overrides)


@pytest.fixture(scope="module")
def micro_variables():
    return jax.jit(lambda x: _micro().init(_key(0), x, train=False))(_images(8, 6))


def _unit_last_scales(variables):
    """The same variables with every block's last batch-norm scale set to one."""
    params = {
        name: ({**block, "bn3": {**block["bn3"], "scale": jnp.ones_like(block["bn3"]["scale"])}}
               if "bn3" in block else block)
        for name, block in variables["params"].items()
    }
    return {"params": params, "batch_stats": variables["batch_stats"]}


def test_last_batch_norm_scale_of_every_block_starts_at_zero(tiny_variables):
    blocks = [k for k in tiny_variables["params"] if "_block" in k]
    assert len(blocks) == 4
    for block in blocks:
        params = tiny_variables["params"][block]
        np.testing.assert_array_equal(params["bn3"]["scale"], 0.0)
        np.testing.assert_array_equal(params["bn1"]["scale"], 1.0)
    off = jax.eval_shape(
        lambda: _tiny(zero_init_last_bn=False).init(_key(0), _images(), train=False)
    )
    assert off["params"]["stage1_block1"]["bn3"]["scale"].shape == (64,)
    block = Bottleneck(width=4, zero_init_last_bn=False)
    x = jnp.ones((1, 2, 2, 16))
    scale = jax.jit(block.init)(_key(0), x)["params"]["bn3"]["scale"]
    np.testing.assert_array_equal(scale, 1.0)


def test_dropout_and_stochastic_depth_are_identity_in_eval(tiny_variables, micro_variables):
    variables = _unit_last_scales(tiny_variables)
    regularised = _tiny(drop_path_rate=0.5, dropout_rate=0.5)
    eval_outputs = jax.jit(lambda v, x: (regularised.apply(v, x, train=False),
                                         _tiny().apply(v, x, train=False)))
    np.testing.assert_allclose(*eval_outputs(variables, _images()), rtol=1e-6, atol=1e-6)

    variables = _unit_last_scales(micro_variables)
    train = jax.jit(lambda key: _micro(drop_path_rate=0.5, dropout_rate=0.5).apply(
        variables, _images(8, 6), train=True, mutable=["batch_stats"], rngs={"dropout": key})[0])
    first, second = train(_key(1)), train(_key(2))
    assert not np.allclose(first, second)
    np.testing.assert_array_equal(first, train(_key(1)))
    with pytest.raises(Exception, match="dropout"):
        _micro(dropout_rate=0.5).apply(variables, _images(8, 6), train=True,
                                       mutable=["batch_stats"])


def test_stochastic_depth_drops_whole_residual_branches():
    block = Bottleneck(width=16, drop_path_rate=0.5, zero_init_last_bn=False)
    x = jnp.asarray(np.abs(np.random.RandomState(0).normal(size=(64, 4, 4, 64))), jnp.float32)
    variables = jax.jit(block.init)(_key(1), x)
    out, _ = block.apply(variables, x, train=True, mutable=["batch_stats"],
                         rngs={"dropout": _key(2)})
    # Identity shortcut: a dropped branch leaves relu(x) = x for the whole example.
    dropped = np.all(np.asarray(out) == np.asarray(x), axis=(1, 2, 3))
    assert 10 < dropped.sum() < 54


def test_strided_lambda_block_pools_after_the_layer():
    x = jnp.zeros((2, 8, 6, 32))

    def shapes(stride):
        block = Bottleneck(width=16, slot=LambdaSlot(receptive_field=5), stride=stride)
        return jax.eval_shape(lambda: block.init_with_output(_key(1), x))

    strided_out, strided = shapes(2)
    unstrided_out, unstrided = shapes(1)
    assert "lambda2" in strided["params"] and "conv2" not in strided["params"]
    assert strided_out.shape == (2, 4, 3, 64) and unstrided_out.shape == (2, 8, 6, 64)
    assert jax.tree.map(jnp.shape, strided) == jax.tree.map(jnp.shape, unstrided)


@pytest.mark.parametrize("slot,layer", [
    (AugmentedConvSlot(heads=2, min_key_depth_per_head=2), "augmented_conv2"),
    (SANSlot(kernel_size=3), "san2"),
    (AxialAttentionSlot(heads=2), "axial_attention2"),
])
def test_strided_attention_blocks_halve_the_resolution(slot, layer):
    block = Bottleneck(width=16, slot=slot, stride=2, zero_init_last_bn=False)
    x = jnp.asarray(np.random.RandomState(0).normal(size=(2, 7, 6, 32)), jnp.float32)
    variables = jax.jit(lambda x: block.init(_key(1), x))(x)
    out, _ = jax.jit(lambda v, x: block.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, x)
    assert layer in variables["params"] and "conv2" not in variables["params"]
    assert out.shape == (2, 4, 3, 64) and bool(jnp.all(jnp.isfinite(out)))


def test_table3_attention_rows_place_their_layers():
    augmented = _abstract_model("resnet50_augmented_attention_table3")[1]["params"]
    assert "conv2" in augmented["stage1_block3"]
    # kappa = 2 upsilon = 0.2 with 8 heads: d_v = 0.1 * 128 rounded to 16; d_k = 8 * 20.
    c3 = augmented["stage2_block1"]["augmented_conv2"]
    assert c3["conv"]["kernel"].shape == (3, 3, 128, 112)
    assert c3["attention"]["query"]["kernel"].shape == (128, 160)
    assert c3["attention"]["row_embeddings"].shape == (55, 20)  # 28x28 after the stride
    assert c3["attention_output"]["kernel"].shape == (16, 16)
    san = _abstract_model("resnet50_san_patchwise")[1]["params"]
    c2, c5 = san["stage1_block1"]["san2"], san["stage4_block3"]["san2"]
    assert c2["relation_weights"]["kernel"].shape == (8, 9 * 8)  # 3x3, 64 / 8 channels
    assert c5["relation_reduce"]["kernel"].shape == (32 * 50, 64)  # 512 / 16, 7x7 + 1


def test_table4_rows_place_their_layers():
    axial = _abstract_model("resnet50_axial_attention_table4")[1]["params"]
    c2 = axial["stage1_block1"]["axial_attention2"]  # 56x56, 8 heads of depth 64 / 8
    assert c2["height_embeddings"].shape == (111, 8) and c2["width_embeddings"].shape == (111, 8)
    assert c2["width_query"]["kernel"].shape == (64, 64)
    assert axial["stage4_block1"]["axial_attention2"]["height_embeddings"].shape == (27, 64)
    global_attention = _abstract_model("resnet50_global_attention_table4")[1]["params"]
    assert global_attention["stage1_block1"]["attention2"]["row_embeddings"].shape == (111, 4)
    conv7 = _abstract_model("resnet50_lambda_conv7_table4")[1]["params"]
    assert conv7["stage3_block2"]["lambda2"]["local_embeddings"].shape == (7, 7, 16, 1)
    shared = _abstract_model("resnet50_lambda_shared_embeddings_table4")[1]["params"]
    assert shared["shared_embeddings1"]["local_embeddings"].shape == (23, 23, 16, 1)
    assert "local_embeddings" not in shared["stage4_block3"]["lambda2"]
    # One kernel for the 16 layers of Table 3's model.
    assert _count("resnet50_lambda_shared_embeddings_table4") == (
        _count("resnet50_lambda_table3") - 15 * 23 * 23 * 16)
    assert ARCHITECTURES["resnet50_lambda_k8_h4_u1"]["stage_slots"] == (
        LambdaSlot(dim_k=8, heads=4, dim_u=1, position="local", receptive_field=23),) * 4


@pytest.mark.parametrize("position,tables", [("local", 1), ("global", 2)])
def test_shared_embeddings_act_as_one_table_used_by_every_layer(position, tables):
    def model(shared):
        slot = LambdaSlot(dim_k=4, heads=2, position=position, receptive_field=3,
                          shared_embeddings=shared)
        return ResNet(num_classes=3, stage_depths=(2, 2), stage_widths=(8, 16),
                      stage_strides=(1, 2), stage_slots=(slot, slot), stem="cifar",
                      stem_width=8, zero_init_last_bn=False)

    images = _images(4, 6)
    shared = jax.jit(lambda x: model(True).init(_key(0), x))(images)
    # Global tables are shared by the layers of one input size: 6x6 (the strided block's
    # layer runs before its pool) and 3x3.
    names = sorted(name for name in shared["params"] if name.startswith("shared_embeddings"))
    assert len(names) == tables
    table_name = "relative_embeddings" if position == "global" else "local_embeddings"
    separate = jax.jit(lambda x: model(False).init(_key(0), x))(images)
    # The separate model with every layer's table set to the shared one it corresponds to.
    params = dict(shared["params"])
    by_shape = {params.pop(name)[table_name].shape: name for name in names}
    for block, layer in separate["params"].items():
        if "lambda2" in layer:
            table = shared["params"][by_shape[layer["lambda2"][table_name].shape]][table_name]
            params[block] = {**params[block], "lambda2": {**params[block]["lambda2"],
                                                          table_name: table}}

    def loss(model, params, variables):
        logits = model.apply({**variables, "params": params}, images)
        return jnp.sum(jnp.sin(logits))

    # Jitted: op by op, the tiled formulation's scan dispatches every tile on its own.
    shared_value, shared_grads = jax.jit(jax.value_and_grad(
        functools.partial(loss, model(True))))(shared["params"], shared)
    separate_value, separate_grads = jax.jit(jax.value_and_grad(
        functools.partial(loss, model(False))))(params, separate)
    np.testing.assert_allclose(shared_value, separate_value, rtol=1e-5)
    for name in names:
        shape = shared["params"][name][table_name].shape
        summed = sum(layer["lambda2"][table_name] for layer in separate_grads.values()
                     if "lambda2" in layer and layer["lambda2"][table_name].shape == shape)
        np.testing.assert_allclose(shared_grads[name][table_name], summed, rtol=1e-4, atol=1e-6)
    if position == "global":
        resized = lambda_jax.resize_relative_embeddings(shared, from_size=6, to_size=12)
        assert resized["params"][names[0]][table_name].shape[:2] == (23, 23)
        assert model(True).apply(resized, _images(2, 12)).shape == (2, 3)


def test_augmented_conv_slot_depths():
    assert AugmentedConvSlot().depths(512) == (160, 48)
    assert AugmentedConvSlot(min_key_depth_per_head=1).depths(512) == (104, 48)
    assert AugmentedConvSlot(value_ratio=1.0, heads=4).depths(16) == (80, 16)
    with pytest.raises(ValueError, match="AugmentedConvSlot.value_ratio must be in \\(0, 1\\]"):
        AugmentedConvSlot(value_ratio=0.0).depths(64)
    with pytest.raises(ValueError, match="SANSlot.relation_reduction must be positive"):
        SANSlot(relation_reduction=0).relation_depth(64)


def test_per_block_slots_and_bad_slots():
    model = ResNet(num_classes=3, stage_depths=(2,), stage_widths=(8,), stage_strides=(1,),
                   stage_slots=(("conv", LambdaSlot(heads=2, receptive_field=3)),), stem="cifar",
                   stem_width=8)
    images = _images(2, 8)
    params = jax.eval_shape(lambda: model.init(_key(0), images))["params"]
    assert "conv2" in params["stage1_block1"] and "lambda2" in params["stage1_block2"]
    with pytest.raises(ValueError, match="lists 1 slots for a stage of 2 blocks"):
        model.clone(stage_slots=(("conv",),)).init(_key(0), images)
    with pytest.raises(ValueError, match="A slot must be one of"):
        model.clone(stage_slots=("lamda",)).init(_key(0), images)
    with pytest.raises(ValueError, match="ResNet.stem must be one of"):
        model.clone(stem="vit").init(_key(0), images)
    with pytest.raises(ValueError, match="one entry per stage"):
        model.clone(stage_widths=(8, 16)).init(_key(0), images)


def test_bfloat16_compute_keeps_float32_params_and_logits(micro_variables):
    abstract = jax.eval_shape(
        lambda: _tiny(dtype=jnp.bfloat16).init(_key(0), _images(), train=False)
    )
    assert {p.dtype for p in jax.tree.leaves(abstract["params"])} == {jnp.dtype(jnp.float32)}
    logits, _ = jax.jit(lambda v, x: _micro(dtype=jnp.bfloat16).apply(
        v, x, train=True, mutable=["batch_stats"]))(_unit_last_scales(micro_variables),
                                                    _images(8, 6))
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))


def test_axis_name_gives_cross_device_batch_norm(micro_variables):
    images = _images(8, 6)

    @jax.jit
    def statistics(images):
        _, whole = _micro().apply(micro_variables, images, train=True, mutable=["batch_stats"])
        _, per_shard = jax.vmap(
            lambda x: _micro(axis_name="batch").apply(
                micro_variables, x, train=True, mutable=["batch_stats"]),
            axis_name="batch",
        )(images.reshape(2, 4, 6, 6, 3))
        return whole, per_shard

    whole, per_shard = statistics(images)
    # Statistics averaged over the axis (stem, blocks and the lambda layer's query and value
    # norms) equal those of the whole batch on every shard.
    assert "query_norm" in per_shard["batch_stats"]["stage1_block1"]["lambda2"]
    jax.tree.map(lambda w, s: np.testing.assert_allclose(s[0], w, rtol=1e-4, atol=1e-5),
                 whole, per_shard)
    jax.tree.map(lambda s: np.testing.assert_allclose(s[0], s[1], rtol=1e-5, atol=1e-6),
                 per_shard)


def _train_on_a_fixed_batch(model, variables, images, labels, optimizer, steps):
    """Losses of ``steps`` training steps on one batch, and the last batch statistics."""
    params, batch_stats = variables["params"], variables["batch_stats"]
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, batch_stats, opt_state):
        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": batch_stats}, images, train=True,
                mutable=["batch_stats"],
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    losses = []
    for _ in range(steps):
        params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state)
        losses.append(float(loss))
    return losses, batch_stats


def test_small_model_loss_falls_on_a_fixed_batch(tiny_variables):
    losses, batch_stats = _train_on_a_fixed_batch(
        _tiny(), tiny_variables, _images(8), jnp.arange(8) % 10, optax.adam(3e-3), 25)
    assert losses[-1] < 0.5 * losses[0], losses
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), batch_stats,
                         tiny_variables["batch_stats"])
    assert min(jax.tree.leaves(moved)) > 0


def test_san19_is_sans_own_network():
    params = _abstract_model("san19_patchwise")[1]["params"]
    blocks = {stage: sum(k.startswith(f"stage{stage}_block") for k in params)
              for stage in range(1, 6)}
    assert blocks == {1: 3, 2: 3, 3: 4, 4: 6, 5: 3}
    assert params["stem_conv"]["kernel"].shape == (3, 64)
    assert params["stage2_transition"]["kernel"].shape == (64, 256)
    # First stage: c = 64, layer outputs 16, relation depth 4, 3x3 footprint, 16 / 8 weights.
    first = params["stage1_block1"]["attention"]
    assert first["relation_reduce"]["kernel"].shape == (4 * 10, 2)
    assert first["relation_weights"]["kernel"].shape == (2, 9 * 2)
    # Last stage: c = 2048, layer outputs 512, relation depth 128, 7x7 footprint.
    last = params["stage5_block3"]
    assert last["attention"]["relation_reduce"]["kernel"].shape == (128 * 50, 64)
    assert last["attention"]["value"]["kernel"].shape == (2048, 512)
    assert last["conv"]["kernel"].shape == (512, 2048) and "bias" in last["conv"]
    assert params["head"]["kernel"].shape == (2048, 1000)


def _tiny_san(**overrides):
    """Two one-block stages of widths 16 and 32 with 3x3 footprints, for 16x16 images."""
    settings = dict(num_classes=10, stage_depths=(1, 1), stage_widths=(16, 32),
                    kernel_sizes=(3, 3), share_planes=2)
    return lambda_jax.create_model("san19_patchwise", **{**settings, **overrides})


def test_tiny_san_runs_and_its_loss_falls_on_a_fixed_batch():
    model = _tiny_san()
    assert isinstance(model, SAN) and model.stage_widths == (16, 32)
    images, labels = _images(8, 16), jnp.arange(8) % 10
    # Unoptimised: initialisation runs once, and XLA's optimising passes would take longer.
    variables = jax.jit(lambda x: model.init(_key(0), x, train=False),
                        compiler_options={"xla_backend_optimization_level": 0})(images)
    eval_logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
    chex.assert_shape(eval_logits, (8, 10))
    assert eval_logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(eval_logits)))

    losses, batch_stats = _train_on_a_fixed_batch(
        model, variables, images, labels, optax.sgd(0.3, momentum=0.9), 15)
    # The first step's forward pass runs in train mode (batch statistics), unlike eval's.
    eval_loss = optax.softmax_cross_entropy_with_integer_labels(eval_logits, labels).mean()
    assert np.isfinite(losses[0]) and abs(losses[0] - float(eval_loss)) > 1e-4
    assert losses[-1] < 0.5 * losses[0], losses
    assert "relation_norm1" in batch_stats["stage2_block1"]["attention"]
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), batch_stats,
                         variables["batch_stats"])
    assert min(jax.tree.leaves(moved)) > 0


def test_san_block_adds_its_branch_to_an_identity_shortcut():
    block = SANBlock(width=16, kernel_size=3, share_planes=2)
    x = jnp.asarray(np.random.RandomState(0).normal(size=(2, 5, 5, 16)), jnp.float32)
    variables = jax.jit(block.init)(_key(0), x)
    # With the last 1x1 convolution zeroed the block is the identity (no activation after it).
    zeroed = {**variables, "params": {
        **variables["params"], "conv": jax.tree.map(jnp.zeros_like, variables["params"]["conv"])}}
    out, identity = jax.jit(lambda x: (block.apply(variables, x), block.apply(zeroed, x)))(x)
    assert out.shape == x.shape and not np.allclose(out, x)
    np.testing.assert_array_equal(identity, x)


@pytest.mark.parametrize("model,size,message", [
    (lambda: lambda_jax.create_model("san19_patchwise"), 96,
     "needs images of at least 128x128 .* got 96x96"),
    (lambda: _tiny_san(kernel_sizes=(3,)), 16, "must have one entry per stage"),
    (lambda: _tiny_san(stage_widths=(8, 32)), 16,
     "SAN.relation_reduction \\(16\\) leaves no channels of a stage of width 8"),
])
def test_san_rejects_bad_settings(model, size, message):
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(lambda: model().init(_key(0), jnp.zeros((1, size, size, 3))))


def test_san_rejects_unknown_overrides():
    with pytest.raises(ValueError, match="Unknown settings \\['stage_slots'\\].*kernel_sizes"):
        lambda_jax.create_model("san10_patchwise", stage_slots=("san",) * 5)
