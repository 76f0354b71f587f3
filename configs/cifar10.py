"""LambdaResNet-26 on CIFAR-10 (32x32), SGD with Nesterov momentum and a cosine schedule.

    tfds build cifar10 --file_format=array_record
    python train.py --config=configs/cifar10.py --workdir=/tmp/cifar10

Lambda layers (k=16, h=4, u=1, 7x7 lambda convolution) in c4 and c5. The recipe is the
common CIFAR one (batch 128, peak learning rate 0.1, weight decay 5e-4, pad-and-crop and
flip augmentation); the paper trains on ImageNet only.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.model = "lambda_resnet26_cifar"

    config.dataset = "cifar10"
    config.image_size = 32
    config.augment = "cifar"
    config.num_workers = 4

    config.batch_size = 128
    config.eval_batch_size = 1000
    config.num_epochs = 200.0

    config.learning_rate = 0.2  # peak 0.1 at batch 128
    config.warmup_epochs = 5.0
    config.weight_decay = 5e-4
    config.label_smoothing = 0.1
    config.ema_decay = 0.999

    config.log_every_steps = 100
    config.keep_checkpoints = 3
    return config
