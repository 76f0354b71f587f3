"""The causal lambda language model and its benchmark script."""

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lambda_jax.models.language import AttentionLanguageModel, LambdaLanguageModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import causal_lm  # noqa: E402


def test_decoding_token_by_token_equals_the_full_call():
    model = LambdaLanguageModel(vocab_size=11, dim=16, depth=2, heads=2, dim_k=4,
                                receptive_field=5)
    tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, 11)
    variables = model.init(jax.random.key(1), tokens)
    full = model.apply(variables, tokens)
    assert full.shape == (2, 9, 11) and full.dtype == jnp.float32
    step = jax.jit(lambda state, token: model.apply(variables, token, decode_state=state))
    state = model.init_decode_state(2)
    outputs = []
    for t in range(9):
        logits, state = step(state, tokens[:, t:t + 1])
        outputs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outputs, axis=1), full, rtol=1e-5, atol=1e-5)


def test_both_decoders_learn_the_shipped_text():
    tokens, vocab = causal_lm.encode(causal_lm.load_text())
    assert len(tokens) > 10_000 and 30 < len(vocab) < 200
    data = causal_lm.batches(tokens, batch=4, length=32, seed=0)
    for model in (LambdaLanguageModel(len(vocab), dim=32, depth=1, receptive_field=8),
                  AttentionLanguageModel(len(vocab), max_length=32, dim=32, depth=1)):
        inputs, targets = next(data)
        params = model.init(jax.random.key(0), inputs)["params"]
        optimizer = optax.adam(1e-2)
        opt_state = optimizer.init(params)

        @jax.jit
        def step(params, opt_state, inputs, targets):
            loss, grads = jax.value_and_grad(
                lambda p: causal_lm.cross_entropy(model, p, inputs, targets))(params)
            updates, opt_state = optimizer.update(grads, opt_state)
            return optax.apply_updates(params, updates), opt_state, loss

        first = None
        for _ in range(40):
            params, opt_state, loss = step(params, opt_state, *next(data))
            first = float(loss) if first is None else first
        assert float(loss) < 0.8 * first


def test_attention_decoder_refuses_sequences_beyond_its_positions():
    model = AttentionLanguageModel(vocab_size=5, max_length=4, dim=8, depth=1, heads=2)
    with pytest.raises(ValueError, match="max_length is 4; got 6"):
        model.init(jax.random.key(0), jnp.zeros((1, 6), jnp.int32))


def test_benchmark_script_runs_and_writes_its_results(tmp_path):
    output = tmp_path / "causal_lm.json"
    results = causal_lm.main(["--smoke", "--output", str(output)])
    saved = json.loads(output.read_text())
    assert saved["models"].keys() == {"lambda", "attention"}
    for metrics in saved["models"].values():
        assert metrics["train_tokens_per_s"] > 0 and np.isfinite(metrics["heldout_loss"])
    assert saved["models"]["lambda"]["decode_tokens_per_s"] > 0
    assert results["lambda_over_attention_train_speed"] > 0
