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
    try:
        if device.startswith("cuda"):
            model = model_from_weights(model_dir, device, torch_dtype, attention)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                str(model_dir), dtype=torch_dtype, use_safetensors=True, trust_remote_code=False,
                attn_implementation=attention).to(device)
    except (OSError, ValueError, KeyError) as exc:
        raise KvcoreError(f"could not load the model in {model_dir}: {one_line(exc)}") from None
    return model.eval(), load_tokenizer(model_dir), device


def model_from_weights(model_dir: Path, device: str, torch_dtype, attention: str | None):
    """The model of `model_dir` built by transformers on `device` from `read_weights` (the same
    parameters, bit for bit, as its own `from_pretrained(model_dir, device_map=device)`, which
    tests/test_gpu_paths.py checks): no copy of the model in host memory, whose peak RSS the
    compress jobs must keep under 2 GB (issue 18)."""
    from transformers import AutoConfig, GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    model = model_class.from_pretrained(None, config=config, state_dict=read_weights(model_dir, device),
                                        dtype=torch_dtype, attn_implementation=attention, device_map=device)
    model.config._name_or_path = model.name_or_path = str(model_dir)  # as from_pretrained(model_dir) sets them
    if (model_dir / "generation_config.json").is_file():  # and what it reads too
        model.generation_config = GenerationConfig.from_pretrained(str(model_dir))
    return model


def read_weights(model_dir: Path, device: str) -> dict:
    """Every tensor of the directory's safetensors files, read one at a time onto `device` in the
    dtype it is stored in. Each read opens its file afresh, so the pages read leave host memory
    with the tensor's host copy: transformers' own load maps each file once for the whole load,
    and every page it has read counts in the process's RSS until the end (a 4.4 GB model: 4.4 GB
    of RSS in a job whose model goes to the GPU; docs/gpu.md)."""
    from safetensors import SafetensorError, safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise KvcoreError(f"{model_dir} holds no .safetensors weights; run the download step again")
    weights = {}
    for path in files:
        try:
            with safe_open(str(path), "pt") as f:
                names = list(f.keys())
            for name in names:
                with safe_open(str(path), "pt") as f:
                    weights[name] = f.get_tensor(name).to(device)
        except SafetensorError as exc:
            raise KvcoreError(f"could not load the model in {model_dir}: {path.name}: {one_line(exc)}") from None
    return weights


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
