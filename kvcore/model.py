"""Load a prepared model directory onto a device, with safetensors weights only."""

from __future__ import annotations

import os
from pathlib import Path

from kvcore.errors import KvcoreError, UsageError, one_line

DTYPES = ("auto", "float32", "float16", "bfloat16")
ATTENTION = ("eager", "sdpa")


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


def import_model_code() -> None:
    """Import torch and transformers' model and tokenizer classes, starting no CUDA. A GPU job does
    this before it claims its GPU (kvcore.jobs.run_job): on the H200 these imports took 12 s of
    the job's start (docs/gpu.md), time in which a claimed GPU would sit idle."""
    import torch  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel  # noqa: F401


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    except Exception as exc:  # a binary, truncated or ill-shaped tokenizer.json fails in many types (KeyError...)
        raise KvcoreError(f"could not load the tokenizer in {model_dir}: {type(exc).__name__}: {exc}") from None


def attention_choice(model_dir: Path, requested: str | None) -> str | None:
    """The attention implementation asked for: the argument, else the model's config entry
    (`attn_implementation`, kept in the prepared directory's manifest), else None: transformers'
    own default, sdpa where the architecture supports it and eager where it must (Gemma-2)."""
    if requested is None:
        manifest = model_dir / "manifest.json"
        if manifest.is_file():
            from kvcore.inputs import read_json

            requested = (read_json(manifest, "model manifest").get("spec") or {}).get("attn_implementation")
    if requested is not None and requested not in ATTENTION:
        raise UsageError(f"attn_implementation must be one of {', '.join(ATTENTION)} (got {requested!r})")
    return requested


def load_model(model_dir: str | Path, device: str = "auto", dtype: str = "auto",
               attn_implementation: str | None = None):
    """(model, tokenizer, device) for a directory made by kvcore.sources.prepare_model.

    Every model kvcore runs is loaded here; `attn_implementation` (eager/sdpa, None: see
    `attention_choice`) ends up in `model.config._attn_implementation`.
    """
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise KvcoreError(f"{model_dir} is not a model directory (no config.json); run the download step first")
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    attention = attention_choice(model_dir, attn_implementation)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # On a GPU the weights go from the safetensors file to the device, converted there: no copy of
    # the model in host memory first (a job holding the GPU would wait for it).
    placement = {"device_map": device} if device.startswith("cuda") else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=torch_dtype, use_safetensors=True, trust_remote_code=False,
            attn_implementation=attention, **placement)
    except (OSError, ValueError) as exc:
        raise KvcoreError(f"could not load the model in {model_dir}: {one_line(exc)}") from None
    return (model if placement else model.to(device)).eval(), load_tokenizer(model_dir), device


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
