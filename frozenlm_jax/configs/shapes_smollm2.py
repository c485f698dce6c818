"""The embedded default (the quick start's main job): frozen SmolLM2-135M, a small max-pooled CNN, n = 2, the shapes world.

    python -m frozenlm_jax.train --config=shapes_smollm2 --workdir=/tmp/frozen_shapes

An argument picks the paper's variant (docs/evaluation.md, "The Frozen experiment, in miniature"):
`shapes_smollm2:train_blind` (blank images), `:finetuned` (the LM trains too, at
`optimizer.lm_learning_rate`), `:scratch` (the LM starts from random weights and trains).
"""

from frozenlm_jax.config import default_config


def get_config(variant=None):
    c = default_config()
    c.model.variant = variant or "frozen"
    c.lm.source = "smollm2-135m"
    # A batch-normalised CNN, max-pooled: the mean-pooled NF-ResNet and CNN named shapes barely above chance
    # (docs/training.md, "The default run, measured").
    c.vision.encoder = "convnet_small"
    c.vision.pool = "max"
    c.vision.image_size = 64
    c.model.num_prefix_tokens = 2
    c.model.prefix_init_std = 0.14  # SmolLM2's token embeddings have std 0.136 per entry
    c.data.max_len = 14  # 2 prefix slots + 12 caption tokens (63 % of captions fit whole; the rest are cut)
    c.data.caption_choice = "first"  # the plain listing ("a red circle and two blue squares"): all signal
    c.optimizer.learning_rate = 1e-3
    c.optimizer.prefix_learning_rate = 5e-3  # the projection learns faster than the encoder: colours 0.98 vs 0.70
    c.optimizer.warmup_steps = 20
    c.train.batch_size = 16
    c.train.num_steps = 600  # about 12 minutes of steps on 2 cores (1.21 s/step)
    c.train.eval_every = 300
    c.train.eval_batches = 2
    c.train.checkpoint_every = 300
    c.train.log_every = 10
    # python -m frozenlm_jax.evaluate --workdir=/tmp/frozen_shapes: the paper's 0/1/4-shot VQA and 2-/5-way
    # fast binding with 1 and 3 shots, on the shapes world, plus caption accuracy and the blind baseline.
    c.eval.tasks = "shapes_captions,shapes_vqa,fast_binding"
    c.eval.num_examples = 200
    c.eval.vqa_shots = (0, 1, 4)
    c.eval.episode_ways = (2, 5)
    c.eval.episode_shots = (1, 3)
    c.eval.blind_baseline = True
    return c
