"""Evaluates saved weights on a data set split, at any image size, and writes the metrics.

    python evaluate.py --weights=/tmp/lambda_digits
    python evaluate.py --weights=/tmp/lambda_digits/checkpoints/200 --image_size=24
    python evaluate.py --weights=hf-hub:timm/lambda_resnet26t.c1_in1k --model=lambda_resnet26t \
        --dataset=imagenet2012 --split=validation --image_size=256 --crop_fraction=0.94 \
        --interpolation=bicubic --data_dir=DIR --output=metrics.json

--weights is a train.py workdir (its newest intact checkpoint's EMA weights) or one of its step
folders, a lambda_jax.save_model export, a timm .safetensors file, or hf-hub:<repo_id> from the
local Hugging Face cache. A workdir supplies its run's model, data set, split, image size and
transform; each flag replaces one. At another image size than the weights', global relative
position tables are resized. Prints the metrics as JSON and writes them to --output if given.
"""

import json
import sys

import jax
from absl import app, flags

from lambda_jax import evaluation

FLAGS = flags.FLAGS
flags.DEFINE_string("weights", None, "A workdir, a step folder, an export, a timm .safetensors "
                    "file or hf-hub:<repo_id>.")
flags.DEFINE_string("model", None, "The model name (lambda_jax.list_models()); required for "
                    "timm files, checked against an export or a workdir.")
flags.DEFINE_string("dataset", None, "A TFDS image-classification name, or 'digits' (built in); "
                    "default: the workdir's.")
flags.DEFINE_string("split", None, "The split; default: the workdir's eval_split, else the data "
                    "set's evaluation split.")
flags.DEFINE_integer("image_size", None, "Side of the evaluated images; default: the weights'.")
flags.DEFINE_float("crop_fraction", None, "timm's crop_pct: the central crop keeps image_size / "
                   "floor(image_size / crop_fraction) of the shorter side (timm's "
                   "LambdaResNets: 0.94, 0.95, 0.94); default: the augmentation's own.")
flags.DEFINE_enum("interpolation", None, ["bicubic", "bilinear", "nearest", "lanczos"],
                  "Resampling filter; default: bicubic for a crop, bilinear for a resize.")
flags.DEFINE_enum("augment", None, ["imagenet", "cifar", "none"], "Which evaluation transform: "
                  "'imagenet' central crop, or a resize; default: the workdir's or data set's.")
flags.DEFINE_string("data_dir", None, "TFDS data directory; default: the workdir's, else TFDS's.")
flags.DEFINE_integer("batch_size", evaluation.DEFAULT_BATCH_SIZE,
                     "Global batch, rounded up to a multiple of the device count.")
flags.DEFINE_integer("num_workers", 0, "grain worker processes decoding images (0: in process).")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype; default: the run's, "
                  "else float32.")
flags.DEFINE_string("output", None, "Where to write the metrics JSON.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host).")
flags.mark_flags_as_required(["weights"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if FLAGS.distributed:
        jax.distributed.initialize()
    options = evaluation.EvalOptions(
        dataset=FLAGS.dataset, split=FLAGS.split, image_size=FLAGS.image_size,
        crop_fraction=FLAGS.crop_fraction, interpolation=FLAGS.interpolation,
        augment=FLAGS.augment, data_dir=FLAGS.data_dir, batch_size=FLAGS.batch_size,
        num_workers=FLAGS.num_workers)
    overrides = {"dtype": getattr(jax.numpy, FLAGS.dtype)} if FLAGS.dtype else {}
    metrics = evaluation.evaluate(FLAGS.weights, options, model=FLAGS.model, **overrides)
    if jax.process_index() == 0:
        json.dump(metrics, sys.stdout, indent=2)
        sys.stdout.write("\n")
        if FLAGS.output:
            evaluation.write_metrics(FLAGS.output, metrics)


if __name__ == "__main__":
    app.run(main)
