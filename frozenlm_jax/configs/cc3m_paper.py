"""The paper's setup: NF-ResNet-50, n = 2, a 7B-class LM in bfloat16, Conceptual Captions, global batch 128 on
a TPU v3-64 (64 cores as a 16 data x 4 model-parallel mesh, as in the paper's appendix).

    ./launch_tpu.sh  (CONFIG=cc3m_paper:/path/to/hf_llama_7b_dir, see docs/tpu.md)
    python -m frozenlm_jax.train --config=cc3m_paper:/path/to/hf_llama_7b_dir --workdir=gs://BUCKET/run

The argument is the LM: a local HF directory (config.json + safetensors) or any `load_lm` source.
CC3M is prepared first from a manual directory (docs/data.md, "Conceptual Captions").
"""

from frozenlm_jax.config import default_config


def get_config(arg=None):
    if not arg:
        raise ValueError("cc3m_paper needs the LM: --config=cc3m_paper:/path/to/hf_lm_dir")
    c = default_config()
    c.lm.source = arg
    c.lm.dtype = "bfloat16"  # the frozen LM's weights and activations; vision params stay float32
    c.lm.remat = "full"  # backprop through a frozen 7B LM is activation-bound
    c.vision.encoder = "nf_resnet50"
    c.vision.image_size = 224
    c.model.num_prefix_tokens = 2
    c.data.dataset = "conceptual_captions"
    c.data.image_key = "image"
    c.data.caption_key = "caption"
    c.data.eval_split = "validation"
    c.data.max_len = 2 + 40
    c.data.augment = True
    c.optimizer.learning_rate = 3e-4
    c.optimizer.warmup_steps = 1000
    c.optimizer.weight_decay = 0.0
    c.train.batch_size = 128
    c.train.num_steps = 100_000
    c.train.log_every = 50
    c.train.eval_every = 2000
    c.train.eval_batches = 20
    c.train.checkpoint_every = 2000
    c.train.keep_checkpoints = 3
    c.train.eval_tasks = ""  # the shapes-world evaluators say nothing about this data
    c.mesh.data = 16
    c.mesh.fsdp = 1
    c.mesh.tensor = 4
    return c
