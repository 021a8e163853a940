"""``whatmatters explain MODEL --text ...``: token attribution of the offline text models from the command line.

``minilm``: all-MiniLM-L6-v2 with a demo sentiment head (positive / negative) fitted in closed form on the
few labelled sentences below; ``news``: the project's 20 Newsgroups topic classifier
(:func:`~whatmatters.text.classifier.load_news_classifier`: MiniLM + a trained head, cached; about a minute the
first time); ``smollm2``: SmolLM2-135M, which greedily generates ``--generate`` tokens
(default 8) per text, or explains ``--target``, a continuation, and attributes each one to the text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from whatmatters.core.errors import InputError

TEXT_MODELS = ("minilm", "news", "smollm2")
# The demo head's training sentences: (text, 1 = positive / 0 = negative).
DEMO_SENTIMENT = [
    ("a wonderful, moving film", 1),
    ("I loved every minute of it", 1),
    ("great food and friendly staff", 1),
    ("the best book I have read this year", 1),
    ("a delightful and clever story", 1),
    ("excellent service, highly recommended", 1),
    ("terrible acting and a boring plot", 0),
    ("I hated the ending", 0),
    ("the food was cold and bland", 0),
    ("a dull, disappointing sequel", 0),
    ("rude staff and slow service", 0),
    ("the worst film I have seen", 0),
]


def text_model(name: str) -> tuple[Any, Any]:
    """The offline model ``name`` (``TEXT_MODELS``) and its tokenizer."""
    if name == "smollm2":
        from whatmatters.text.pretrained import load_smollm2

        return load_smollm2()
    if name == "news":
        from whatmatters.text.classifier import load_news_classifier

        news = load_news_classifier()
        return news.model, news.tokenizer
    if name == "minilm":
        from whatmatters.text.heads import PooledClassifier, fit_head
        from whatmatters.text.pretrained import load_minilm

        encoder, tok = load_minilm()
        head = PooledClassifier(encoder, 2, labels=["negative", "positive"]).eval()
        texts, labels = zip(*DEMO_SENTIMENT)
        return fit_head(head, tok, texts, labels), tok
    raise InputError(f"with --text, MODEL is one of {', '.join(TEXT_MODELS)}, got {name!r}")


def read_texts(texts: list[str] | None, path: Path | None) -> list[str]:
    """``--text`` values and the non-empty lines of ``--text-file``."""
    out = list(texts or [])
    if path is not None:
        if not path.is_file():
            raise FileNotFoundError(2, "no text file", str(path))
        out += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not out:
        raise InputError("no text to explain: give --text TEXT or a --text-file with one text per line")
    return out


def explain_texts(
    name: str,
    texts: list[str] | None,
    text_file: Path | None,
    method: str,
    target: str | None,
    generate: int | None,
    params: dict[str, Any],
    out: Path | None,
    report: Path | None,
    batch_size: int | None,
    seed: int,
) -> None:
    """Explain the texts with the model ``name``, print the heatmap, save the scores (and the report)."""
    from whatmatters.cli.commands import _console, _target
    from whatmatters.explain import explain
    from whatmatters.report.text import rich_heatmap

    items = read_texts(texts, text_file)
    model, tok = text_model(name)
    options: dict[str, Any] = {"tokenizer": tok, "seed": seed, "batch_size": batch_size, "progress": None}
    if name == "smollm2":
        if target is not None:
            options["target"] = [target] * len(items)
        else:
            options["generate"] = generate or 8
    else:
        if generate is not None:
            raise InputError("--generate needs a generative model: use MODEL smollm2")
        options["target"] = _target(target)
    importance = explain(model, items, method, **options, **params)
    out = out if out is not None else Path(f"{importance.method}.parquet")
    importance.save(out)
    console = _console()
    if name in ("minilm", "news"):
        target_class = importance.target if isinstance(importance.target, list) else [importance.target] * len(items)
        console.print("explained: " + ", ".join(f"[{i}] {model.labels[c]}" for i, c in enumerate(target_class)))
    console.print(rich_heatmap(importance, max_samples=20))
    console.print(f"wrote {' x '.join(map(str, importance.values.shape))} token scores to {out}", markup=False)
    if report is not None:
        from whatmatters.report.html import write_report

        write_report([importance, importance.to_words()], report, title=f"whatmatters: {name}", model=name)
        console.print(f"report: {report}", markup=False)
