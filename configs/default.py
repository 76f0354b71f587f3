"""Default config: a small LambdaResNet on the built-in digits set, offline, on a CPU.

    python train.py --config=configs/default.py --workdir=/tmp/lambda_digits

Every other config starts from this one and states what it changes.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # Model: a name from lambda_jax.create_model, and field overrides passed to it.
    config.model = "lambda_resnet_tiny"
    # Unset (None) entries are not passed; these two exist so that a flag can set them, e.g.
    # --config.model_overrides.lambda_implementation=conv.
    config.model_overrides = ml_collections.ConfigDict({
        "lambda_implementation": ml_collections.config_dict.placeholder(str),
        "stride_pool": ml_collections.config_dict.placeholder(str),
    })
    config.dtype = "float32"  # compute dtype: "float32" or "bfloat16" (parameters stay float32)

    # Data (lambda_jax.data.create_datasets).
    config.dataset = "digits"
    config.data_dir = ml_collections.config_dict.placeholder(str)  # None: TFDS default
    config.image_size = 16
    config.augment = "none"
    config.num_workers = 0
    config.train_split = "train"
    config.eval_split = "test"
    # Evaluation transform (timm's crop_pct and interpolation): None keeps the augmentation's
    # own, a central size/(size+32) crop for 'imagenet' and a plain resize otherwise.
    config.eval_crop_fraction = ml_collections.config_dict.placeholder(float)
    config.eval_interpolation = ml_collections.config_dict.placeholder(str)

    # Global batch sizes: split over all devices of all hosts.
    config.batch_size = 64
    config.eval_batch_size = 120

    # Length: num_train_steps > 0 overrides num_epochs; -1 trains num_epochs.
    config.num_epochs = 8.0
    config.num_train_steps = -1

    # Optimizer: "sgd" (momentum, Nesterov by default) or "adamw".
    config.optimizer = "sgd"
    config.learning_rate = 0.4  # per 256 examples; peak = learning_rate * batch_size / 256
    config.warmup_epochs = 1.0
    config.momentum = 0.9
    config.nesterov = True
    config.weight_decay = 5e-5
    config.label_smoothing = 0.0
    config.grad_clip_norm = 0.0  # 0: no clipping
    config.ema_decay = 0.99  # EMA of weights for evaluation; 0: evaluate the raw weights

    # Devices: "pmap" or "shard_map" (jax.jit over a device mesh); both are data parallel.
    config.parallelism = "pmap"
    config.distributed = False  # call jax.distributed.initialize() (multi-host)

    # Logging, evaluation and checkpoints; 0: once per epoch.
    config.log_every_steps = 20
    config.eval_every_steps = 0
    config.checkpoint_every_steps = 0
    config.keep_checkpoints = 2
    config.async_checkpoints = True

    # Fine-tuning: a workdir, or one of its step directories, whose weights start a new run
    # (a new --workdir; the optimizer and step start afresh). Ignored when resuming.
    config.init_from = ""

    config.seed = 0
    return config
