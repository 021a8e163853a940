"""A quantized causal LM as a folder: ``config.json``, the tokenizer and ``quantized.safetensors``.

:func:`save_quantized_folder` writes what :func:`~whatmatters.compress.gptq.gptq` / ``rsq`` returned;
:func:`load_quantized_folder` builds the architecture from the config (transformers) and loads the packed
weights with :func:`~whatmatters.compress.packed.load_quantized`, so the logits are those of the model saved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from whatmatters.compress.packed import load_quantized, save_quantized
from whatmatters.core.errors import InputError, ModelError

WEIGHTS = "quantized.safetensors"


def save_quantized_folder(model: nn.Module, folder: str | Path, tokenizer: Any = None) -> int:
    """Write ``model`` (a transformers model holding ``QuantLinear`` layers) and ``tokenizer`` to ``folder``;
    returns the bytes of the weights file."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise ModelError("save_quantized_folder needs a transformers model (one with a .config)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return save_quantized(model, folder / WEIGHTS)


def load_quantized_folder(folder: str | Path) -> tuple[nn.Module, Any]:
    """The model (eval mode) and tokenizer (``None`` when the folder has none) that ``save_quantized_folder`` wrote."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    if not (folder / WEIGHTS).is_file() or not (folder / "config.json").is_file():
        raise InputError(f"{folder} holds no config.json + {WEIGHTS}; give a folder save_quantized_folder wrote")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    model = load_quantized(AutoModelForCausalLM.from_config(config), folder / WEIGHTS).eval()
    tokenizer = None
    if (folder / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model, tokenizer
