"""Load a prepared model directory onto a device, with safetensors weights only."""

from __future__ import annotations

import os
from pathlib import Path

from kvcore.errors import KvcoreError, UsageError

DTYPES = ("auto", "float32", "float16", "bfloat16")


def resolve_device(device: str = "auto") -> str:
    """`auto` is CUDA when a GPU is visible, else CPU."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} asked for, but no CUDA GPU is visible (use 'auto' or 'cpu')")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UsageError(f"device must be auto, cpu, cuda or cuda:N (got {device!r})")
    return device


def resolve_dtype(dtype: str, device: str):
    """`auto`: bfloat16 on a GPU, float32 on the CPU (where half precision is slow and lossy)."""
    import torch

    if dtype not in DTYPES:
        raise UsageError(f"dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    except Exception as exc:  # a binary, truncated or ill-shaped tokenizer.json fails in many types (KeyError...)
        raise KvcoreError(f"could not load the tokenizer in {model_dir}: {type(exc).__name__}: {exc}") from None


def load_model(model_dir: str | Path, device: str = "auto", dtype: str = "auto", attn_implementation: str = "sdpa"):
    """(model, tokenizer, device) for a directory made by kvcore.sources.prepare_model."""
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise KvcoreError(f"{model_dir} is not a model directory (no config.json); run the download step first")
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=torch_dtype, use_safetensors=True, trust_remote_code=False,
            attn_implementation=attn_implementation)
    except (OSError, ValueError) as exc:
        raise KvcoreError(f"could not load the model in {model_dir}: {exc}") from None
    return model.to(device).eval(), load_tokenizer(model_dir), device


def layer_count(config) -> int:
    """Layers of a causal LM config (GPT-2 and LLaMA naming alike)."""
    return int(getattr(config, "num_hidden_layers", None) or config.n_layer)


def kv_shape(config) -> dict:
    """Layer/head geometry of a causal LM config (GPT-2 and LLaMA naming alike)."""
    layers = layer_count(config)
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return {"num_layers": int(layers), "num_heads": int(heads), "num_kv_heads": int(kv_heads), "head_dim": int(head_dim)}
