"""Token and word heatmaps: each token's background is red where it raises the explained output, blue where it
lowers it (scores that are never negative: red only), its strength the score over the sample's largest |score|.

:func:`text_rows` gives the pieces to draw, :func:`rich_heatmap` a terminal rendering (``rich``),
:func:`html_heatmap` the HTML block the report embeds. A generative LM's importance gives one row per
generated token (its context coloured, the token itself after an arrow).
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import torch

from whatmatters.core.errors import InputError
from whatmatters.core.importance import Importance

_MARKERS = {"Ġ": " ", "▁": " ", "Ċ": "↵", "ĉ": "⇥"}


@dataclass
class TextRow:
    """One coloured line: the sample, the generated token explained (LMs) and ``(piece, score)`` pairs."""

    sample: int
    label: str | None
    pieces: list[tuple[str, float]]
    scale: float


def display(token: str, unit: str) -> str:
    """A token as it reads in the text: byte-level / SentencePiece markers become spaces, ``##`` pieces join."""
    if unit == "word":
        return " " + token
    if token.startswith("##"):
        return token[2:]
    for marker, text in _MARKERS.items():
        token = token.replace(marker, text)
    return token if token.startswith((" ", "↵")) else " " + token


def text_rows(imp: Importance, max_samples: int = 8, max_generated: int = 8) -> list[TextRow]:
    """The rows of a token (``extra["tokens"]``) or word (``extra["words"]``) importance, padding left out."""
    key = "words" if imp.unit == "word" else "tokens"
    if imp.unit not in ("token", "word") or key not in imp.extra or not imp.per_sample:
        raise InputError("a text heatmap needs a per-sample token or word importance from token attribution")
    values = imp.values.detach().float().cpu()
    lm = values.ndim == 3
    rows = []
    for i in range(min(max_samples, values.shape[0])):
        names = imp.extra[key][i]
        real = _real(imp, i, len(names))
        grid = values[i] if lm else values[i][None]
        targets = imp.extra.get("target_tokens", [[]] * values.shape[0])[i] if lm else [None]
        shown = [t for t in range(grid.shape[0]) if not lm or imp.extra["target_mask"][i][t]][:max_generated]
        for t in shown:
            scores = grid[t, : len(names)]
            if lm:
                scores = scores[: _context(imp, t, len(names))]
            pieces = [(display(names[j], imp.unit), float(scores[j])) for j in range(len(scores)) if real[j]]
            scale = max((abs(s) for _, s in pieces), default=0.0) or 1.0
            label = display(targets[t], "token").strip() if lm else None
            rows.append(TextRow(i, label, pieces, scale))
    return rows


def _real(imp: Importance, i: int, width: int) -> list[bool]:
    if imp.unit == "word":
        return [True] * width
    return [bool(m) for m in imp.extra["attention_mask"][i][:width]]


def _context(imp: Importance, t: int, width: int) -> int:
    """Positions before generated token ``t`` (tokens), or every word of a word importance."""
    return width if imp.unit == "word" else imp.extra["prompt_len"] + t


def _rgb(score: float, scale: float) -> tuple[int, int, int, float]:
    strength = min(1.0, abs(score) / scale)
    return (220, 50, 47, strength) if score >= 0 else (38, 110, 200, strength)


def rich_heatmap(imp: Importance, max_samples: int = 8, max_generated: int = 8):
    """A ``rich`` renderable: one line per sample (per generated token for LMs), tokens on coloured backgrounds."""
    from rich.console import Group
    from rich.text import Text

    lines = []
    for row in text_rows(imp, max_samples, max_generated):
        line = Text(f"[{row.sample}] ", style="dim")
        for piece, score in row.pieces:
            r, g, b, a = _rgb(score, row.scale)
            mix = [int(255 - a * (255 - c)) for c in (r, g, b)]
            line.append(piece, style=f"black on rgb({mix[0]},{mix[1]},{mix[2]})")
        if row.label is not None:
            line.append(f"  → {row.label}", style="bold")
        lines.append(line)
    return Group(*lines)


def html_heatmap(imp: Importance, max_samples: int = 20, max_generated: int = 8) -> str:
    """The heatmap as an HTML block (inline styles; a tooltip gives each token's score)."""
    out = []
    for row in text_rows(imp, max_samples, max_generated):
        spans = []
        for piece, score in row.pieces:
            r, g, b, a = _rgb(score, row.scale)
            text = html.escape(piece).replace(" ", "&nbsp;", 1) if piece.startswith(" ") else html.escape(piece)
            spans.append(
                f'<span class="tok" style="background: rgba({r},{g},{b},{a:.2f})" title="{score:.4g}">{text}</span>'
            )
        target = f' <span class="gen">→ {html.escape(row.label)}</span>' if row.label is not None else ""
        out.append(f'<div class="textrow"><span class="idx">{row.sample}</span>{"".join(spans)}{target}</div>')
    return '<div class="heatmap">' + "".join(out) + "</div>"


def is_text(imp: Importance) -> bool:
    """An importance that :func:`text_rows` can draw."""
    key = "words" if imp.unit == "word" else "tokens"
    return imp.unit in ("token", "word") and imp.per_sample and key in imp.extra and torch.is_tensor(imp.values)
