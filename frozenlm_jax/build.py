"""The Frozen model, LM and tokenizer that a run's config describes: training builds them here, and so does
`load_frozen` from a run's saved config."""

from __future__ import annotations

from frozenlm_jax.models.frozen import Frozen
from frozenlm_jax.models.lm import LMConfig
from frozenlm_jax.models.vision import EncoderConfig, encoder_config
from frozenlm_jax.parallel import DEFAULT_RULES
from frozenlm_jax.tokenizer import byte_tokenizer
from frozenlm_jax.weights import load_lm


def encoder_config_for(config) -> EncoderConfig:
    """The vision encoder's config: `vision.encoder` with the `vision.*` fields that apply to its family."""
    vision = encoder_config(config.vision.encoder)
    if vision.family == "nf_resnet":
        vision = vision.replace(skip_gain_init=config.vision.skip_gain_init)
    if config.vision.pool:
        vision = vision.replace(pool=config.vision.pool)
    return vision


def build_lm(config, mesh=None, rules=DEFAULT_RULES):
    """(LMConfig, LM params or None for a random LM, tokenizer, source string) from `config.lm`; the params are
    None too for the `scratch` variant (its LM starts from random weights)."""
    c = config.lm
    overrides = dict(scan_layers=c.scan_layers, remat=c.remat, attention_impl=c.attention_impl)
    if c.source != "random":
        lm = load_lm(c.source, dtype=c.dtype, mesh=mesh, rules=rules, **overrides)
        if lm.tokenizer is None:
            raise ValueError(f"lm.source={c.source!r} has no tokenizer; captions cannot be tokenised")
        params = None if config.model.variant == "scratch" else lm.params
        return lm.config, params, lm.tokenizer, c.source
    tokenizer = byte_tokenizer() if c.tokenizer == "bytes" else load_lm(c.tokenizer).tokenizer
    fields = dict(c.random.to_dict())
    fields["vocab_size"] = fields["vocab_size"] or tokenizer.vocab_size
    lm_config = LMConfig(**fields, dtype=c.dtype, param_dtype=c.dtype, **overrides)
    return lm_config, None, tokenizer, f"random(seed={config.seed})"


def build_model(config, lm_config: LMConfig) -> Frozen:
    """The Frozen module of `config` around an LM of `lm_config`."""
    return Frozen(lm_config, encoder_config_for(config), config.model.num_prefix_tokens,
                  variant=config.model.variant, prefix_init_std=config.model.prefix_init_std or None)
