"""A tiny random LM with a byte tokenizer on a tiny shapes split: the whole loop in seconds (tests)."""

from frozenlm_jax.config import default_config


def get_config(arg=None):
    del arg
    c = default_config()
    c.lm.source = "random"
    c.lm.tokenizer = "bytes"
    c.lm.random.init_std = 0.5  # a random LM with peaked logits, like a trained one, so a prefix can steer it
    c.vision.encoder = "nf_resnet_tiny"
    c.vision.image_size = 16
    c.data.builder_config = "tiny"
    c.data.max_len = 24
    c.data.host_order = "interleave"  # the same batches with 1 or 2 processes (tests)
    c.optimizer.learning_rate = 3e-3
    c.optimizer.warmup_steps = 2
    c.train.batch_size = 8
    c.train.num_steps = 12
    c.train.log_every = 1
    c.train.eval_every = 6
    c.train.eval_batches = 1
    c.train.num_samples = 2
    c.train.eval_examples = 8
    c.train.checkpoint_every = 4
    c.eval.tasks = "shapes_captions,shapes_vqa,fast_binding,real_name"
    c.eval.num_examples = 4
    c.eval.vqa_shots = (0, 1)
    c.eval.episode_ways = (2,)
    c.eval.episode_shots = (1,)
    c.eval.batch_size = 4
    return c
