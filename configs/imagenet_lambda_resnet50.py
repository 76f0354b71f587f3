"""LambdaResNet-50 on ImageNet at 224x224 with the paper's ResNet-50 recipe.

    tfds build imagenet2012 --file_format=array_record --manual_dir=<the ILSVRC2012 tars>
    python train.py --config=configs/imagenet_lambda_resnet50.py --workdir=gs://.../lr50

The recipe of the paper's ResNet-50 comparisons (90 epochs, global batch 4096 on 32 TPUv3
cores, Nesterov momentum 0.9, peak learning rate 0.1 x batch / 256 after 5 linear warm-up
epochs, cosine decay, weight decay 1e-4, label smoothing 0.1, Inception-style crops and
flips). The paper evaluates an exponential moving average of the weights; 0.9999 is the
decay of the ResNet-RS recipe its LambdaResNets build on. bfloat16 compute, float32
parameters. For the Table 3 row (a lambda layer in every 3x3 slot) use
``--config.model=resnet50_lambda_table3``.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.model = "lambda_resnet50"
    config.dtype = "bfloat16"

    config.dataset = "imagenet2012"
    config.image_size = 224
    config.augment = "imagenet"
    config.num_workers = 16

    config.batch_size = 4096
    config.eval_batch_size = 4096
    config.num_epochs = 90.0

    config.learning_rate = 0.1  # per 256 examples: peak 1.6 at batch 4096
    config.warmup_epochs = 5.0
    config.momentum = 0.9
    config.nesterov = True
    config.weight_decay = 1e-4
    config.label_smoothing = 0.1
    config.ema_decay = 0.9999

    config.log_every_steps = 100
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 3
    return config
