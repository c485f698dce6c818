"""Every key a training config may have, with its default. Config files start from `default_config()`."""

from __future__ import annotations

from pathlib import Path

import ml_collections

from frozenlm_jax.models.frozen import VARIANTS
from frozenlm_jax.parallel import DEFAULT_RULES


def default_config() -> ml_collections.ConfigDict:
    """The full key set (locked: setting an unknown key raises) with defaults."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.lm = ml_collections.ConfigDict()
    c.lm.source = "smollm2-135m"  # named LM, .gguf, HF directory or Hub id; "random" builds `lm.random`
    c.lm.dtype = "float32"  # storage and compute dtype of the LM ("bfloat16" halves a frozen LM's memory)
    c.lm.scan_layers = False
    c.lm.remat = "none"  # none | full | save_dots: activation checkpointing of LM blocks
    # xla | cudnn: cuDNN's fused attention on a CUDA GPU in bfloat16/float16 (1.25x faster 1B-class step on an
    # H200, docs/benchmarks.md), the XLA path elsewhere
    c.lm.attention_impl = "xla"
    c.lm.tokenizer = "bytes"  # for source="random": "bytes" or an LM source whose tokenizer to use
    c.lm.random = ml_collections.ConfigDict(dict(
        family="llama", vocab_size=0, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
        intermediate_size=64, init_std=0.02))  # vocab_size 0: the tokenizer's

    c.vision = ml_collections.ConfigDict()
    c.vision.encoder = "nf_resnet_small"
    c.vision.image_size = 64
    c.vision.skip_gain_init = 0.0  # NF-ResNet residual-branch gains at init (0: each block starts as identity)
    # How the encoder's output is pooled, empty: its default. NF-ResNet, convnet: mean | max; ViT: cls | mean | tokens
    c.vision.pool = ""
    c.vision.init = ""  # a .safetensors of pretrained encoder weights (timm or HF ViT layout); empty: random init

    c.model = ml_collections.ConfigDict()
    c.model.num_prefix_tokens = 2
    c.model.variant = "frozen"  # frozen | finetuned | scratch | train_blind
    c.model.prefix_init_std = 0.0  # 0: lecun-normal projection; else each prefix entry's std at init
    c.model.label_rules = ()  # ((regex, label), ...); empty: the variant's default

    c.data = ml_collections.ConfigDict()
    c.data.dataset = "frozen_shapes"
    c.data.builder_config = ""  # e.g. "64_large"; empty: the builder's default
    c.data.data_dir = ""  # empty: $TFDS_DATA_DIR or ~/tensorflow_datasets
    c.data.image_key = "image"
    c.data.caption_key = "captions"
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.max_len = 20  # tokens per example, prefix slots included
    c.data.augment = False
    c.data.caption_choice = "random"  # "random" of an example's captions, or always the "first"
    # "shard": each host reads its own shard (tfds.split_for_jax_process); "interleave": one global order,
    # so the batches do not depend on the number of hosts (every host must be able to read the whole split)
    c.data.host_order = "shard"

    # prefix_learning_rate: 0 trains the prefix projection with the encoder; else at this rate, with its own
    # AdamW and gradient clipping (label "prefix", optimizer.py)
    c.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=1e-3, lm_learning_rate=1e-5, prefix_learning_rate=0.0, warmup_steps=50,
        schedule_kind="cosine", weight_decay=0.0, grad_clip_norm=1.0, b1=0.9, b2=0.999))

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 32  # global
    c.train.num_steps = 600
    c.train.grad_accum_steps = 1
    c.train.log_every = 10
    c.train.eval_every = 100
    c.train.eval_batches = 4
    c.train.num_samples = 16  # validation images captioned greedily at each eval (metrics, samples/step_N.png)
    c.train.eval_tasks = "shapes_captions"  # evaluators run every eval_every steps (eval.* settings), "" for none
    c.train.eval_examples = 64  # their eval.num_examples in the loop: a few dozen keeps training fast
    c.train.checkpoint_every = 100
    c.train.keep_checkpoints = 2  # the latest N, plus the best by validation loss
    c.train.init_checkpoint = ""  # a checkpoint dir to start from when this workdir has none
    c.train.profile_steps = (0, 0)  # [start, stop): jax.profiler trace into WORKDIR/profile

    c.eval = ml_collections.ConfigDict()  # `python -m frozenlm_jax.evaluate` (and the trainer's train.eval_tasks)
    c.eval.tasks = "shapes_captions,shapes_vqa,fast_binding,real_name"  # of frozenlm_jax.eval.suite.TASKS
    c.eval.num_examples = 200  # per task and shot count: questions, episodes or captioned images (0: a whole file)
    c.eval.vqa_shots = (0, 1, 4)
    c.eval.episode_ways = (2, 5)
    c.eval.episode_shots = (1, 3)
    c.eval.task_induction = False  # episode prompts open with "Answer with dax or blicket."
    c.eval.blind_baseline = True  # also a "<run> (blind)" row: the same prompts with every image blanked
    c.eval.data_dir = ""  # holds vqav2/ and okvqa/ (official files, see docs/evaluation.md); shapes tasks need none
    c.eval.batch_size = 16
    c.eval.caption_tokens = 16  # longest generated caption (shapes_captions)
    c.eval.seed = 0

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.axis_rules = tuple(DEFAULT_RULES)
    c.lock()
    return c


def applicable(config: ml_collections.ConfigDict) -> dict:
    """The config as a dict without the keys that do not apply to it (a random LM's `lm.random` and
    `lm.tokenizer` when the LM is loaded): what a run's `config.json` records."""
    out = config.to_dict()
    if config.lm.source != "random":
        for key in ("random", "tokenizer"):
            del out["lm"][key]
    return out


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raise naming every key of `config` that `default_config()` does not have, or an unknown variant."""

    unknown = _unknown_keys(config, default_config(), "")
    if unknown:
        raise ValueError(f"unknown config key(s): {', '.join(unknown)}; the known keys are those of "
                         "frozenlm_jax.config.default_config()")
    if config.model.variant not in VARIANTS:
        raise ValueError(f"model.variant {config.model.variant!r} is not one of {', '.join(VARIANTS)}")


def _unknown_keys(config, reference, prefix):
    unknown = []
    for key in config.keys():
        path = f"{prefix}{key}"
        if key not in reference:
            unknown.append(path)
        elif isinstance(reference[key], ml_collections.ConfigDict) and isinstance(config[key], ml_collections.ConfigDict):
            unknown += _unknown_keys(config[key], reference[key], path + ".")
    return unknown


def config_file(spec: str) -> str:
    """`path[:arg]` of a config given as a file (`path/to/config.py[:arg]`) or by the name of a packaged one
    (`shapes_smollm2[:arg]`, a file of `frozenlm_jax/configs/`)."""
    name, sep, arg = spec.partition(":")
    if Path(name).is_file():
        return spec
    packaged = Path(__file__).resolve().parent / "configs"
    if (packaged / f"{name}.py").is_file():
        return f"{packaged / name}.py{sep}{arg}"
    names = sorted(p.stem for p in packaged.glob("[!_]*.py"))
    raise ValueError(f"--config={spec}: no file {name!r} and no packaged config of that name; packaged: "
                     f"{', '.join(names)} (or pass a path to a config file)")
