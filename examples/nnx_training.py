"""Trains a small Flax NNX classifier with a lambda layer on scikit-learn's 8x8 digits.

    PYTHONPATH=. python examples/nnx_training.py --steps 200

The model owns its variables (``lambda_jax.nnx.LambdaLayer``); ``nnx.Optimizer`` holds the
Optax state and ``nnx.jit`` compiles the step; ``model.eval()`` switches batch norm to the
running averages for the held-out accuracy.
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

import lambda_jax.nnx


class Classifier(nnx.Module):
    """images ``[batch, 8, 8, 1]`` -> logits ``[batch, 10]``: a 3x3 convolution, a local
    lambda layer (5x5 scope), mean pooling and a linear head."""

    def __init__(self, *, width: int = 32, rngs: nnx.Rngs):
        self.conv = nnx.Conv(1, width, (3, 3), rngs=rngs)
        self.lambda_layer = lambda_jax.nnx.LambdaLayer(
            width, width, dim_k=8, heads=4, position="local", receptive_field=5, rngs=rngs)
        self.head = nnx.Linear(width, 10, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        x = nnx.relu(self.conv(images))
        x = nnx.relu(self.lambda_layer(x))
        return self.head(x.mean(axis=(1, 2)))


def loss_fn(model: Classifier, images: jax.Array, labels: jax.Array) -> jax.Array:
    logits = model(images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@nnx.jit
def train_step(model: Classifier, optimizer: nnx.Optimizer, images: jax.Array,
               labels: jax.Array) -> jax.Array:
    loss, grads = nnx.value_and_grad(loss_fn)(model, images, labels)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def accuracy(model: Classifier, images: jax.Array, labels: jax.Array) -> jax.Array:
    return jnp.mean(jnp.argmax(model(images), axis=-1) == labels)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    digits = load_digits()
    images = (digits.images[..., None] / 16.0).astype(np.float32)  # [1797, 8, 8, 1]
    labels = digits.target.astype(np.int32)
    order = np.random.default_rng(args.seed).permutation(len(labels))
    train, test = order[360:], order[:360]

    model = Classifier(rngs=nnx.Rngs(args.seed))
    optimizer = nnx.Optimizer(model, optax.adam(args.learning_rate), wrt=nnx.Param)
    rng = np.random.default_rng(args.seed + 1)
    losses = []
    model.train()
    for step in range(args.steps):
        batch = rng.choice(train, args.batch_size, replace=False)
        losses.append(float(train_step(model, optimizer, images[batch], labels[batch])))
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {losses[-1]:.4f}")
    model.eval()
    test_accuracy = float(accuracy(model, images[test], labels[test]))
    print(f"held-out accuracy after {args.steps} steps: {test_accuracy:.3f}")
    return {"losses": losses, "test_accuracy": test_accuracy}


if __name__ == "__main__":
    main()
