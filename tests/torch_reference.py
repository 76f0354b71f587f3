"""The parity tests' common part: random PyTorch weights, layouts, outputs and gradients.

Imports torch unconditionally: the parity tests must fail, not skip, without the
``parity`` extra.
"""

import jax
import jax.numpy as jnp
import numpy as np
import torch

torch.set_num_threads(1)  # the suite shares the machine's cores


def randomise_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random batch-norm statistics, scales and shifts and biases, in place.

    Weights keep the library's own random initialisation. timm starts the last batch-norm
    scale of each residual branch at zero, which would hide the branch: it gets a small
    random scale instead.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, tensor in module.state_dict().items():
            if not tensor.is_floating_point() or tensor.ndim != 1:
                continue
            uniform = torch.rand(tensor.shape, generator=generator)
            if key.endswith("conv3_1x1.bn.weight"):
                tensor.copy_(0.1 + 0.2 * uniform)
            elif key.endswith(("running_var", "weight")):
                tensor.copy_(0.5 + uniform)
            else:
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))
    return module


def calibrate_(model: torch.nn.Module, size: int, seed: int, count: int = 8) -> torch.nn.Module:
    """Sets every batch norm's running statistics to their mean over ``count`` random images.

    As in a trained network, eval-mode batch norm then sees activations of the scale its
    statistics describe (random statistics shrink or blow up the signal with depth). The
    images are not the test's, whose pre-activations would otherwise sit exactly on the
    ReLU kinks of channels that are constant over the batch.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average
    model.train()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model(torch.randn((count, 3, size, size), generator=generator))
    for norm in norms:
        norm.momentum = 0.1
    return model


def to_nchw(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(x, -1, 1))


def to_nhwc(x: np.ndarray) -> np.ndarray:
    return np.moveaxis(x, 1, -1)


def output_and_input_gradient(module: torch.nn.Module, images: np.ndarray,
                              loss_fn) -> tuple[np.ndarray, np.ndarray]:
    """``module(images)`` and d loss_fn(output) / d images, both channels-last.

    Args:
      images: ``[batch, height, width, channels]``.
      loss_fn: torch output (channels-first) -> scalar.
    """
    inputs = torch.tensor(to_nchw(images), requires_grad=True)
    outputs = module(inputs)
    loss_fn(outputs).backward()
    out = outputs.detach().numpy()
    if out.ndim == 4:
        out = to_nhwc(out)
    return out, to_nhwc(inputs.grad.numpy())


TOLERANCE = 1e-4  # max abs difference, float32


def assert_layer_matches(reference: torch.nn.Module, layer, variables, images: np.ndarray,
                         train: bool) -> None:
    """A PyTorch layer and a Flax layer agree in output and input gradient to TOLERANCE.

    Args:
      reference: the PyTorch layer (channels-first).
      layer, variables: the Flax layer and its converted variables.
      images: ``[batch, height, width, channels]``.
      train: batch statistics (both) or running statistics.
    """
    reference.train(train)

    def forward(x):
        out, _ = layer.apply(variables, x, train=train, mutable=["batch_stats"])
        return out

    out_shape = jax.eval_shape(forward, jnp.asarray(images)).shape
    cotangent = np.random.default_rng(1).normal(size=out_shape).astype(np.float32)
    expected, expected_gradient = output_and_input_gradient(
        reference, images, lambda out: (out * torch.tensor(to_nchw(cotangent))).sum())
    out, pullback = jax.vjp(jax.jit(forward), jnp.asarray(images))
    (gradient,) = pullback(jnp.asarray(cotangent))
    assert out.shape == expected.shape
    assert np.abs(out - expected).max() <= TOLERANCE
    assert np.abs(gradient - expected_gradient).max() <= TOLERANCE
    assert np.abs(expected).max() > 0.5  # not a comparison of near-zero arrays
