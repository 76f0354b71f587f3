"""A causal character language model with lambda layers in place of attention, trained on
text that ships with scikit-learn (its data set descriptions), against an attention decoder
of about the same size. Prints a table and writes JSON.

    python benchmarks/causal_lm.py                  # the full run
    python benchmarks/causal_lm.py --smoke          # seconds, tiny sizes

Reports, for each model: parameters, training tokens/s (after compilation), final train
loss, held-out loss (the last 10% of the text), and for the lambda model the tokens/s of
step-by-step decoding with its constant-size state.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lambda_jax.models.language import AttentionLanguageModel, LambdaLanguageModel


def load_text() -> str:
    """The reStructuredText descriptions of scikit-learn's data sets, concatenated."""
    folder = importlib.resources.files("sklearn.datasets") / "descr"
    names = sorted(entry.name for entry in folder.iterdir() if entry.name.endswith(".rst"))
    return "\n".join((folder / name).read_text(encoding="utf-8") for name in names)


def encode(text: str) -> tuple[np.ndarray, list[str]]:
    """Characters -> int32 tokens ``[len(text)]`` and the vocabulary."""
    vocab = sorted(set(text))
    index = {char: i for i, char in enumerate(vocab)}
    return np.array([index[char] for char in text], np.int32), vocab


def batches(tokens: np.ndarray, batch: int, length: int, seed: int):
    """Endless random windows: (inputs, targets), each ``[batch, length]``."""
    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, len(tokens) - length - 1, size=batch)
        window = np.stack([tokens[s:s + length + 1] for s in starts])
        yield window[:, :-1], window[:, 1:]


def cross_entropy(model, params, inputs, targets):
    logits = model.apply({"params": params}, inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def heldout_loss(model, params, tokens, length):
    """Mean loss over consecutive windows ``[n, length]`` of the held-out tokens."""
    count = (len(tokens) - 1) // length
    inputs = tokens[:count * length].reshape(count, length)
    targets = tokens[1:count * length + 1].reshape(count, length)
    return float(jax.jit(lambda p: cross_entropy(model, p, inputs, targets))(params))


def train(model, train_tokens, heldout_tokens, args, seed):
    data = batches(train_tokens, args.batch, args.length, seed)
    inputs, _ = next(data)
    params = model.init(jax.random.key(seed), inputs)["params"]
    optimizer = optax.adamw(args.learning_rate)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, inputs, targets):
        loss, grads = jax.value_and_grad(lambda p: cross_entropy(model, p, inputs, targets))(
            params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params, opt_state, first_loss = step(params, opt_state, *next(data))  # compiles
    first_loss.block_until_ready()
    start = time.perf_counter()
    for _ in range(args.steps):
        params, opt_state, loss = step(params, opt_state, *next(data))
    loss.block_until_ready()
    seconds = time.perf_counter() - start
    return params, {
        "parameters": int(sum(p.size for p in jax.tree.leaves(params))),
        "train_tokens_per_s": args.steps * args.batch * args.length / seconds,
        "first_loss": float(first_loss),
        "train_loss": float(loss),
        "heldout_loss": heldout_loss(model, params, heldout_tokens, args.length),
    }


def decode_speed(model, params, batch, steps):
    """Tokens/s of greedy step-by-step decoding with the lambda model's state."""
    step = jax.jit(lambda state, token: model.apply({"params": params}, token,
                                                    decode_state=state))
    state = model.init_decode_state(batch)
    token = jnp.zeros((batch, 1), jnp.int32)
    logits, state = step(state, token)  # compiles
    start = time.perf_counter()
    for _ in range(steps):
        logits, state = step(state, token)
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    token.block_until_ready()
    return batch * steps / (time.perf_counter() - start)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--receptive-field", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--output", default="benchmarks/results/causal_lm.json")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few steps")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.batch, args.length, args.dim, args.depth = 3, 2, 32, 16, 1
        args.receptive_field = 8

    tokens, vocab = encode(load_text())
    split = int(0.9 * len(tokens))
    train_tokens, heldout_tokens = tokens[:split], tokens[split:]
    models = {
        "lambda": LambdaLanguageModel(len(vocab), dim=args.dim, depth=args.depth,
                                      receptive_field=args.receptive_field),
        "attention": AttentionLanguageModel(len(vocab), max_length=args.length, dim=args.dim,
                                            depth=args.depth),
    }
    results = {"settings": vars(args), "text_characters": len(tokens),
               "vocabulary": len(vocab), "devices": str(jax.devices()), "models": {}}
    for name, model in models.items():
        params, metrics = train(model, train_tokens, heldout_tokens, args, seed=0)
        if name == "lambda":
            metrics["decode_tokens_per_s"] = decode_speed(model, params, args.batch,
                                                          steps=max(args.steps // 3, 3))
        results["models"][name] = metrics

    print(f"{'model':<10} {'params':>9} {'train tok/s':>12} {'first loss':>11} "
          f"{'train loss':>11} {'held-out':>9}")
    for name, m in results["models"].items():
        print(f"{name:<10} {m['parameters']:>9,} {m['train_tokens_per_s']:>12,.0f} "
              f"{m['first_loss']:>11.3f} {m['train_loss']:>11.3f} {m['heldout_loss']:>9.3f}")
    ratio = (results["models"]["lambda"]["train_tokens_per_s"]
             / results["models"]["attention"]["train_tokens_per_s"])
    results["lambda_over_attention_train_speed"] = ratio
    print(f"lambda / attention training speed: {ratio:.2f}x; lambda decoding: "
          f"{results['models']['lambda']['decode_tokens_per_s']:,.0f} tokens/s")
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
