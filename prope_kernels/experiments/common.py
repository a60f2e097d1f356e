"""What the experiments need from the trainer, in one place: build a run's TrainConfig, load a
trained run folder back (model, tokenizer, held-out documents), and read a model's per-layer
rotation. Everything that depends on the shape of ``TrainConfig`` / ``GemmaConfig`` lives here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import fields
from pathlib import Path

import torch

from ..rotary import PRoPESpec


def nested_train_config() -> bool:
    """True when ``TrainConfig`` holds the model's config (``model=GemmaConfig``)."""
    from ..train import TrainConfig
    return "model" in {f.name for f in fields(TrainConfig)}


def model_config(shape: dict, encoding: dict, attn: str = "auto"):
    """A GemmaConfig: ``shape`` (hidden, layers, heads, kv_heads, head_dim, mlp, vocab_size)
    with the position encoding ``encoding`` (p, theta, variant; p = 0 is NoPE, 1 RoPE) on every
    layer."""
    from ..models import gemma

    if hasattr(gemma.GemmaConfig, "updated"):
        return gemma.preset("gemma-small").updated(**shape, **encoding, attn=attn)
    pe = {0.0: "nope", 1.0: "rope"}.get(float(encoding["p"]), "prope")
    return gemma.GemmaConfig(**shape, pe=pe, attn=attn, **encoding).validate()


def unfused_attn() -> str:
    """The model's attention switch for "RoPE, then torch's SDPA" (the unfused baseline: the
    same math as the fused op, and on a CPU much faster than the reference backend's loop over
    packed documents)."""
    from ..models import gemma
    return "unfused" if "unfused" in gemma.ATTN_BACKENDS else "sdpa"


def train_config(model_cfg, **train_kw):
    """The trainer's TrainConfig for ``model_cfg`` and the training settings ``train_kw``."""
    from ..models import gemma
    from ..train import TrainConfig

    if nested_train_config():
        return TrainConfig(model=model_cfg, **train_kw)
    # flat TrainConfig: the shape goes in as a named preset, the encoding as flags
    digest = hashlib.sha1(json.dumps(model_cfg.to_dict(), sort_keys=True).encode()).hexdigest()
    name = "experiment-" + digest[:10]
    gemma.PRESETS[name] = model_cfg
    m = model_cfg
    return TrainConfig(preset=name, pe=m.pe, p=m.p, theta=m.theta, variant=m.variant,
                       layout=m.layout, attn=m.attn, **train_kw)


def config_from_dict(d: dict):
    """GemmaConfig from its ``to_dict()`` (a run folder's config.json ``"model"``)."""
    from ..models.gemma import GemmaConfig

    if hasattr(GemmaConfig, "from_dict"):
        return GemmaConfig.from_dict(d)
    return GemmaConfig(**d).validate()


def layer_rotation(cfg, i: int) -> PRoPESpec:
    """The rotation that layer ``i`` of a GemmaConfig applies to each head."""
    if hasattr(cfg, "layer_attn"):
        spec = cfg.layer_attn(i)
        return PRoPESpec(spec.head_dim, spec.p, spec.theta, cfg.variant, cfg.layout)
    return PRoPESpec(cfg.head_dim, cfg.rope_fraction, cfg.theta, cfg.variant, cfg.layout)


def layer_attention(cfg, i: int) -> dict:
    """head_dim, kv_heads, softmax scale, softcap and window of layer ``i``."""
    if hasattr(cfg, "layer_attn"):
        spec = cfg.layer_attn(i)
        return dict(head_dim=spec.head_dim, kv_heads=spec.kv_heads,
                    scale=cfg.softmax_scale(spec), softcap=spec.softcap,
                    window=spec.window if cfg.is_local(i) else 0)
    return dict(head_dim=cfg.head_dim, kv_heads=cfg.kv_heads, scale=cfg.head_dim ** -0.5,
                softcap=0.0, window=0)


def encoding_of(cfg) -> dict:
    """(p, theta, variant) of a model's global layers."""
    spec = layer_rotation(cfg, 0 if not hasattr(cfg, "is_local") else
                          next((i for i in range(cfg.layers) if not cfg.is_local(i)), 0))
    return dict(p=spec.p, theta=spec.theta, variant=spec.variant)


# --- a trained run folder -------------------------------------------------------------------------

def is_run_folder(path) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and (p / "checkpoint").is_dir()


def load_run(path, device="cpu", attn: str | None = None):
    """(model in eval mode, GemmaConfig, the run's train settings dict) of a run folder."""
    from safetensors.torch import load_file

    from ..models.gemma import Gemma

    p = Path(path)
    meta = json.loads((p / "config.json").read_text())
    d = dict(meta["model"])
    if attn is not None:
        d["attn"] = attn
    cfg = config_from_dict(d)
    weights = p / "checkpoint" / "model.safetensors"
    if not weights.is_file():
        raise ValueError(f"{p}: no checkpoint/model.safetensors (a sharded FSDP checkpoint "
                         "must be consolidated first)")
    model = Gemma(cfg)
    model.load_state_dict(load_file(str(weights), device="cpu"))
    return model.to(device).eval(), cfg, meta["train"]


def run_data(train: dict):
    """(tokenizer, train documents, held-out documents) of a run, rebuilt exactly as the trainer
    built them (same corpus, split seed and tokenizer; a trained tokenizer comes from the
    cache, or is retrained identically)."""
    from ..data import builtin_corpus, load_documents, load_tokenizer, split_docs, \
        train_tokenizer

    docs = load_documents(train["data"]) if train.get("data") else builtin_corpus()
    train_docs, val_docs = split_docs(docs, train["val_fraction"], train["seed"])
    if train.get("tokenizer"):
        tok = load_tokenizer(train["tokenizer"])
    else:
        tok = train_tokenizer(train_docs, train["vocab_size"])
    return tok, train_docs, val_docs


def default_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
