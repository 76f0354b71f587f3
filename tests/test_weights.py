"""load_model, save_model and load_layer: timm files without torch, the Hugging Face cache,
lambda_jax's own exports, and what each does with bad input.

The timm cases make their file from a randomly initialised timm model and need the parity
extra (torch, timm); they skip without it. Everything else needs neither.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from safetensors import safe_open

import lambda_jax
from lambda_jax import LambdaLayer
from lambda_jax.convert import StateDictMismatchError
from lambda_jax.models import LambdaSlot

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = "lambda_resnet_tiny"
TIMM_NAME = "lambda_resnet26t"
TIMM_REPO = "timm/lambda_resnet26t.c1_in1k"
# test_parity_timm's size for lambda_resnet26t: no ReLU pre-activation lies near its kink.
TIMM_SIDE = 64
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _random_variables(model, side, seed=0):
    """Random variables of ``model`` for ``[1, side, side, 3]`` images, without compiling."""
    shapes = jax.eval_shape(model.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32))
    rng = np.random.default_rng(seed)

    def draw(path, struct):
        if path[-1].key == "var":
            return jnp.asarray(rng.uniform(0.5, 1.5, struct.shape), struct.dtype)
        return jnp.asarray(rng.normal(0.0, 0.2, struct.shape), struct.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _assert_same(actual, expected):
    """Equal trees: the same keys, dtypes and values."""
    actual, expected = flax.traverse_util.flatten_dict(actual), flax.traverse_util.flatten_dict(
        expected)
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype, key
        np.testing.assert_array_equal(np.asarray(actual[key]), np.asarray(value), err_msg=key)


def _images(side, seed=0):
    return np.random.default_rng(seed).normal(size=(2, side, side, 3)).astype(np.float32)


def _hub_cache(cache, repo_id, files, commit=COMMIT):
    """The Hugging Face cache layout for ``repo_id`` at ``commit`` holding ``files``.

    ``files`` maps a file name to its bytes or to a file to copy. As in a real cache, the
    snapshot holds links to content-addressed blobs and refs/main names the commit.
    """
    repo = pathlib.Path(cache) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for folder in (repo / "refs", repo / "blobs", snapshot):
        folder.mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for index, (name, content) in enumerate(files.items()):
        blob = repo / "blobs" / f"{commit[:8]}{index:04d}"
        if isinstance(content, bytes):
            blob.write_bytes(content)
        else:
            shutil.copyfile(content, blob)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache that huggingface_hub looks in."""
    constants = pytest.importorskip("huggingface_hub.constants",
                                    reason="the hub lookup needs huggingface_hub")
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 10-class lambda_resnet_tiny, random variables, and their export."""
    model = lambda_jax.create_model(TINY, num_classes=10)
    variables = _random_variables(model, 16)
    path = lambda_jax.save_model(tmp_path_factory.mktemp("tiny") / "tiny.safetensors", TINY,
                                 variables, num_classes=10)
    return model, variables, path


def test_export_round_trip_is_exact_and_readable_by_any_safetensors_reader(tiny):
    model, variables, path = tiny
    loaded_model, loaded = lambda_jax.load_model(TINY, path)
    assert loaded_model == model and loaded_model.num_classes == 10
    _assert_same(loaded, variables)
    apply = jax.jit(loaded_model.apply)
    images = jnp.asarray(_images(16))
    outputs = apply(loaded, images)
    assert outputs.shape == (2, 10) and np.isfinite(outputs).all()
    np.testing.assert_array_equal(outputs, apply(variables, images))

    with safe_open(str(path), framework="np") as f:
        keys, metadata = set(f.keys()), f.metadata()
    assert keys == {"/".join(key) for key in flax.traverse_util.flatten_dict(variables)}
    assert {"params/head/kernel", "batch_stats/stage1_block1/bn1/mean"} <= keys
    record = json.loads(metadata["lambda_jax"])
    assert record["model"] == TINY and record["settings"] == {"num_classes": 10}
    assert record["image_size"] == [32, 32] and record["channels"] == 3
    assert record["format_version"] == 1


def test_global_model_round_trip_records_its_slots_and_image_size(tmp_path):
    # Global tables fix the input size: built at 16x16, not the model's usual 32x32.
    slot = LambdaSlot(dim_k=16, heads=4, dim_u=1, position="global")
    settings = dict(num_classes=3, stage_slots=("conv", "conv", slot, slot))
    model = lambda_jax.create_model(TINY, **settings)
    variables = _random_variables(model, 16)
    path = lambda_jax.save_model(tmp_path / "global.safetensors", TINY, variables, **settings)
    with safe_open(str(path), framework="np") as f:
        assert json.loads(f.metadata()["lambda_jax"])["image_size"] == [16, 16]
    loaded_model, loaded = lambda_jax.load_model(TINY, path)
    assert loaded_model == model
    _assert_same(loaded, variables)


def test_runtime_settings_may_change_at_load_time(tiny):
    _, variables, path = tiny
    model, loaded = lambda_jax.load_model(TINY, path, dtype=jnp.bfloat16, num_classes=10,
                                          drop_path_rate=0.1)
    assert model.dtype == jnp.bfloat16 and model.drop_path_rate == 0.1
    _assert_same(loaded, variables)


def test_export_errors_say_what_to_do(tiny, tmp_path):
    _, variables, path = tiny
    with pytest.raises(ValueError, match="holds weights of 'lambda_resnet_tiny', not "
                                         "'lambda_resnet26_cifar'.*load_model\\('lambda_resnet"):
        lambda_jax.load_model("lambda_resnet26_cifar", path)
    with pytest.raises(ValueError, match=r"num_classes=5 \(the export has 10\).*drop these"):
        lambda_jax.load_model(TINY, path, num_classes=5)
    with pytest.raises(ValueError, match=r"stage_widths=\(8, 16, 32, 64\) \(the export has "):
        lambda_jax.load_model(TINY, path, stage_widths=(8, 16, 32, 64))
    with pytest.raises(FileNotFoundError, match="No weights file or workdir at .*nothing.safetensors"):
        lambda_jax.load_model(TINY, tmp_path / "nothing.safetensors")
    with pytest.raises(IsADirectoryError, match="is a directory"):
        lambda_jax.load_model(TINY, tmp_path)
    with pytest.raises(TypeError, match="weights is the path of a timm .safetensors file"):
        lambda_jax.load_model(TINY, variables)

    text = tmp_path / "notes.txt"
    text.write_text("not weights at all")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        lambda_jax.load_model(TINY, text)
    pickle = tmp_path / "pytorch_model.bin"
    pickle.write_bytes(b"PK\x03\x04" + bytes(200))
    with pytest.raises(ValueError, match="PyTorch pickle.*needs torch.*safetensors.torch"):
        lambda_jax.load_model(TINY, pickle)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(ValueError, match="not a readable safetensors file.*cut short"):
        lambda_jax.load_model(TINY, cut)

    with safe_open(str(path), framework="np") as f:
        metadata = f.metadata()
        arrays = {key: f.get_tensor(key) for key in f.keys()}
    edited = dict(arrays, **{"params/head/bias": np.zeros(7, np.float32)})
    del edited["batch_stats/stage1_block1/bn1/var"]
    safetensors.numpy.save_file(edited, tmp_path / "edited.safetensors", metadata=metadata)
    with pytest.raises(StateDictMismatchError) as error:
        lambda_jax.load_model(TINY, tmp_path / "edited.safetensors")
    message = str(error.value)
    assert "edited.safetensors (an export of 'lambda_resnet_tiny'" in message
    assert "key 'params/head/bias' has shape (7,)" in message and "expects (10,)" in message
    assert "missing key 'batch_stats/stage1_block1/bn1/var'" in message

    safetensors.numpy.save_file(arrays, tmp_path / "bare.safetensors")
    with pytest.raises(ValueError, match="lambda_jax variables but no 'lambda_jax' metadata"):
        lambda_jax.load_model(TINY, tmp_path / "bare.safetensors")
    record = json.loads(metadata["lambda_jax"])
    newer = dict(metadata, lambda_jax=json.dumps(dict(record, format_version=2)))
    safetensors.numpy.save_file(arrays, tmp_path / "newer.safetensors", metadata=newer)
    with pytest.raises(ValueError, match="format 2.*upgrade lambda_jax"):
        lambda_jax.load_model(TINY, tmp_path / "newer.safetensors")
    damaged = dict(metadata, lambda_jax="{not json")
    safetensors.numpy.save_file(arrays, tmp_path / "damaged.safetensors", metadata=damaged)
    with pytest.raises(ValueError, match="metadata is damaged"):
        lambda_jax.load_model(TINY, tmp_path / "damaged.safetensors")


def test_a_timm_state_dict_that_does_not_fit_names_each_key(tmp_path):
    path = tmp_path / "model.safetensors"
    safetensors.numpy.save_file({"stem.conv1.conv.weight": np.zeros((5, 3, 3, 3), np.float32),
                                 "bogus": np.zeros(2, np.float32)}, path)
    with pytest.raises(StateDictMismatchError) as error:
        lambda_jax.load_model(TIMM_NAME, path)
    message = str(error.value)
    assert "model.safetensors (read as a timm state_dict)" in message
    assert ("key 'stem.conv1.conv.weight' has shape (5, 3, 3, 3)" in message
            and "expects (24, 3, 3, 3)" in message)
    assert "missing key 'head.fc.weight'" in message and "unexpected key 'bogus'" in message
    with pytest.raises(ValueError, match="read as a timm state_dict, which loads into timm's "
                                         "models only: lambda_resnet26rpt_256, "):
        lambda_jax.load_model(TINY, path)


def test_save_model_checks_first_and_never_leaves_a_half_written_file(tiny, tmp_path,
                                                                      monkeypatch):
    _, variables, _ = tiny
    path = tmp_path / "model.safetensors"
    lambda_jax.save_model(path, TINY, variables, num_classes=10)
    good = path.read_bytes()

    with pytest.raises(StateDictMismatchError, match="key 'params/head/kernel' has shape "
                                                     r"\(512, 10\).*expects \(512, 1000\)"):
        lambda_jax.save_model(path, TINY, variables)  # created with num_classes=10
    with pytest.raises(TypeError, match="stage_slots=.*cannot be recorded in an export"):
        lambda_jax.save_model(path, TINY, variables, stage_slots=("conv", object(), "conv", "c"))
    with pytest.raises(ValueError, match="Unknown model 'lambda_resnet_huge'"):
        lambda_jax.save_model(path, "lambda_resnet_huge", variables)
    with pytest.raises(IsADirectoryError, match="save_model writes one file"):
        lambda_jax.save_model(tmp_path, TINY, variables, num_classes=10)

    def crash(arrays, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(good[: len(good) // 2])
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.numpy, "save_file", crash)
    with pytest.raises(OSError, match="No space left"):
        lambda_jax.save_model(path, TINY, variables, num_classes=10)
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]

    changed = jax.tree.map(lambda x: x + 1, variables)
    lambda_jax.save_model(path, TINY, changed, num_classes=10)
    _assert_same(lambda_jax.load_model(TINY, path)[1], changed)
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]


def test_hub_lookup_reads_the_local_cache(tiny, hub_cache):
    _, variables, path = tiny
    _hub_cache(hub_cache, "someone/tiny", {"model.safetensors": path})
    _assert_same(lambda_jax.load_model(TINY, "hf-hub:someone/tiny")[1], variables)
    _assert_same(lambda_jax.load_model(TINY, f"hf-hub:someone/tiny@{COMMIT}")[1], variables)
    _assert_same(lambda_jax.load_model(TINY, "hf-hub:someone/tiny@main")[1], variables)

    # timm's repositories name their model in config.json.
    _hub_cache(hub_cache, TIMM_REPO, {"model.safetensors": path,
                                      "config.json": b'{"architecture": "lambda_resnet26t"}'})
    with pytest.raises(ValueError, match="holds timm's 'lambda_resnet26t' \\(its config.json\\)"):
        lambda_jax.load_model(TINY, f"hf-hub:{TIMM_REPO}")


def test_hub_errors_say_where_they_looked(hub_cache, monkeypatch):
    with pytest.raises(FileNotFoundError) as error:
        lambda_jax.load_model(TIMM_NAME, f"hf-hub:{TIMM_REPO}")
    message = str(error.value)
    assert str(hub_cache / "models--timm--lambda_resnet26t.c1_in1k") in message
    assert "model.safetensors and pytorch_model.bin" in message
    assert "HF_HUB_CACHE" in message and f"hf_hub_download('{TIMM_REPO}'" in message

    _hub_cache(hub_cache, "timm/old", {"pytorch_model.bin": b"PK\x03\x04" + bytes(100)})
    with pytest.raises(ValueError, match="holds timm/old's pytorch_model.bin only.*needs torch"):
        lambda_jax.load_model(TIMM_NAME, "hf-hub:timm/old")
    with pytest.raises(FileNotFoundError, match="timm/old at revision 'v2' is not in the"):
        lambda_jax.load_model(TIMM_NAME, "hf-hub:timm/old@v2")
    with pytest.raises(ValueError, match="needs a repository id"):
        lambda_jax.load_model(TIMM_NAME, "hf-hub:")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ImportError, match="pip install huggingface_hub"):
        lambda_jax.load_model(TIMM_NAME, f"hf-hub:{TIMM_REPO}")


def test_load_layer_errors(tiny, tmp_path):
    layer = LambdaLayer(dim_out=16, dim_k=8, heads=4, position="local", receptive_field=3,
                        position_bias=True)
    with pytest.raises(ValueError, match="an export of the model 'lambda_resnet_tiny'.*load_model"):
        lambda_jax.load_layer(layer, tiny[2])
    path = tmp_path / "layer.safetensors"
    safetensors.numpy.save_file({"block.qkv.weight": np.zeros((48, 16, 1, 1), np.float32)}, path)
    with pytest.raises(StateDictMismatchError, match="no lambda layer under the prefix 'blo.'"):
        lambda_jax.load_layer(layer, path, prefix="blo")


_NO_TORCH = r"""
import importlib.abc
import sys


class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
        return None


sys.meta_path.insert(0, NoTorch())

import jax
import numpy as np

import lambda_jax

folder = sys.argv[1]
model, variables = lambda_jax.load_model("lambda_resnet26t", f"{folder}/model.safetensors")
_, cached = lambda_jax.load_model("lambda_resnet26t", "hf-hub:timm/lambda_resnet26t.c1_in1k")
assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), variables, cached))
np.save(f"{folder}/lambda_jax_logits.npy", jax.jit(model.apply)(variables, np.load(
    f"{folder}/images.npy")))
assert not [name for name in sys.modules if name.split(".")[0] == "torch"]
"""


@pytest.fixture(scope="module")
def timm_file(tmp_path_factory):
    """A folder with a random lambda_resnet26t's model.safetensors, images and timm's logits."""
    torch = pytest.importorskip("torch", reason="the timm file is made with torch (parity extra)")
    timm = pytest.importorskip("timm", reason="the timm file is made with timm (parity extra)")
    import safetensors.torch
    from torch_reference import calibrate_, randomise_, to_nchw

    torch.manual_seed(0)
    reference = randomise_(timm.create_model(TIMM_NAME, pretrained=False), 0)
    calibrate_(reference, TIMM_SIDE, seed=1)
    reference.eval()
    images = _images(TIMM_SIDE)
    with torch.no_grad():
        logits = reference(torch.tensor(to_nchw(images))).numpy()
    folder = tmp_path_factory.mktemp("timm")
    safetensors.torch.save_file(
        {key: value.contiguous() for key, value in reference.state_dict().items()},
        folder / "model.safetensors")
    np.save(folder / "images.npy", images)
    np.save(folder / "timm_logits.npy", logits)
    return folder


def test_timm_file_loads_without_torch_and_reproduces_timm(timm_file, tmp_path):
    pytest.importorskip("huggingface_hub", reason="the hub lookup needs huggingface_hub")
    cache = tmp_path / "hub"
    _hub_cache(cache, TIMM_REPO, {"model.safetensors": timm_file / "model.safetensors",
                                  "config.json": b'{"architecture": "lambda_resnet26t"}'})
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    env.pop("HF_HOME", None)
    result = subprocess.run([sys.executable, "-c", _NO_TORCH, str(timm_file)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    logits = np.load(timm_file / "lambda_jax_logits.npy")
    expected = np.load(timm_file / "timm_logits.npy")
    assert logits.shape == expected.shape == (2, 1000)
    assert np.abs(logits - expected).max() <= 1e-4
    assert np.abs(expected).max() > 0.1


def test_load_layer_takes_a_timm_layer_out_of_a_model_file(timm_file):
    path = timm_file / "model.safetensors"
    _, variables = lambda_jax.load_model(TIMM_NAME, path)
    # Stage 3's first block: 512 channels, stride 2, timm's 9x9 lambda convolution.
    layer = LambdaLayer(dim_out=512, dim_k=16, heads=4, dim_u=1, position="local",
                        receptive_field=9, position_bias=True, stride=2, stride_pool="2x2")
    loaded = lambda_jax.load_layer(layer, path, prefix="stages.3.0.self_attn")
    _assert_same(loaded, {collection: tree["stages_3_0"]["self_attn"]
                          for collection, tree in variables.items()})


def test_load_layer_reads_a_lambda_networks_file(tmp_path):
    torch = pytest.importorskip("torch", reason="the layer file is made with torch (parity extra)")
    lambda_networks = pytest.importorskip("lambda_networks", reason="parity extra")
    import safetensors.torch
    from torch_reference import assert_layer_matches, randomise_

    torch.manual_seed(0)
    reference = randomise_(lambda_networks.LambdaLayer(16, dim_k=8, heads=4, dim_out=32, dim_u=2,
                                                       r=3), 0)
    path = tmp_path / "layer.safetensors"
    safetensors.torch.save_file(reference.state_dict(), path)
    layer = LambdaLayer(dim_out=32, dim_k=8, heads=4, dim_u=2, position="local",
                        receptive_field=3, position_bias=True)
    variables = lambda_jax.load_layer(layer, path)
    images = np.random.default_rng(0).normal(size=(2, 7, 5, 16)).astype(np.float32)
    assert_layer_matches(reference, layer, variables, images, train=False)
