"""A tfds caption dataset with an HF GPT-2 directory: COCO captions through frozen GPT-2.

    python -m frozenlm_jax.train --config=coco_gpt2:/path/to/gpt2_dir --workdir=/tmp/coco_gpt2

The argument is the LM (an HF GPT-2 directory with config.json, model.safetensors, tokenizer.json, or a
Hub id where the network allows). Prepare coco_captions with tfds first (docs/data.md, "Real caption datasets").
"""

from frozenlm_jax.config import default_config


def get_config(arg=None):
    c = default_config()
    c.lm.source = arg or "gpt2"
    c.vision.encoder = "nf_resnet50"
    c.vision.image_size = 224
    c.data.dataset = "coco_captions"
    c.data.caption_key = "captions/text"
    c.data.eval_split = "val"
    c.data.max_len = 2 + 32
    c.data.augment = True
    c.optimizer.learning_rate = 3e-4
    c.optimizer.warmup_steps = 500
    c.train.batch_size = 64
    c.train.num_steps = 20_000
    c.train.log_every = 50
    c.train.eval_every = 1000
    c.train.checkpoint_every = 1000
    c.train.eval_tasks = ""  # the shapes-world evaluators say nothing about this data
    return c
