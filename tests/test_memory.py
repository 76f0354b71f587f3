"""The default local formulation keeps the lambda convolution's training memory.

At every local lambda layer of the paper's ResNet-50s at 224 pixels, batch 8 (Table 3's
lambda rows, r=23 with u=1 and r=7 with u=4, and LambdaResNet-50), the compiled training
step of ``implementation="auto"`` (XLA's memory analysis: temporaries of the gradients of
the parameters and the input, with batch statistics) needs at most 1.25x the temporaries of
``implementation="conv"``, the paper's formulation. Compile only: nothing runs.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import lambda_shapes  # noqa: E402
from lambda_jax.core import position  # noqa: E402

BOUND = 1.25
SHAPES = lambda_shapes.paper_lambda_shapes()


def test_the_paper_models_have_the_lambda_shapes_of_table_3():
    labels = {shape.label for shape in SHAPES}
    for stage, side, width in (("c2", 56, 64), ("c3", 28, 128), ("c4", 14, 256),
                               ("c5", 7, 512)):
        for scope in ("r=23 u=1", "r=7 u=4"):
            assert f"{stage} {side}x{side}x{width} {scope}" in labels
    assert len(SHAPES) == 14  # and each stage's first layer at the previous stage's side
    # The compiled memory measured here on CPU is that of the formulation every backend uses.
    for shape in SHAPES:
        args = ((shape.side, shape.side), shape.receptive_field, shape.dim_u)
        assert {position.resolve_local_implementation("auto", *args, backend=backend)
                for backend in ("cpu", "gpu", "tpu")} == {"tiled"}


@pytest.mark.slow
@pytest.mark.parametrize("shape", SHAPES, ids=[shape.label for shape in SHAPES])
def test_auto_training_memory_is_within_the_bound_of_the_lambda_convolution(shape):
    memory = {}
    for implementation in ("auto", "conv"):
        step, args = lambda_shapes.layer_steps(shape, implementation)["train"]
        memory[implementation] = lambda_shapes.compiled_memory(step, args)["temp_bytes"]
    assert memory["auto"] <= BOUND * memory["conv"], (
        f"{shape.label}: auto {memory['auto'] / 2**20:.1f} MiB, conv "
        f"{memory['conv'] / 2**20:.1f} MiB")
