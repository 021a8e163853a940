"""``explain(model, data, method=...)``: the one entry point for input attribution."""

from __future__ import annotations

import numbers
import time
from typing import Any

import torch

from whatmatters.core.errors import MethodError, ModelError, WhatMattersError
from whatmatters.core.importance import Importance
from whatmatters.core.params import check_params
from whatmatters.core.registry import get_method, keyword_defaults
from whatmatters.core.task import Task, check_units, guarded, make_task, probe, torch_module
from whatmatters.core.text import chooses_class, is_text_request, make_text_task


def explain(
    model: Any,
    data: Any,
    method: str,
    target: Any = None,
    *,
    y: Any = None,
    background: Any = None,
    feature_names: list[str] | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    progress: bool | None = None,
    allow_train_mode: bool = False,
    tokenizer: Any = None,
    attention_mask: Any = None,
    generate: int | None = None,
    max_length: int | None = None,
    **params: Any,
) -> Importance:
    """Score the inputs of ``model`` on ``data`` with ``method``.

    Args:
        model: a torch ``nn.Module``, a scikit-learn estimator, or a callable on arrays.
        data: samples to explain, shape ``(n, features)`` or ``(n, C, H, W)``; a pandas
            DataFrame's columns become the unit names (matched by name, in any order, to the features
            of a model that knows them, e.g. scikit-learn's ``feature_names_in_``). A
            :class:`~whatmatters.core.task.Task` from ``make_task`` is used as it is (its data,
            background, labels and target).
        method: a name from ``whatmatters.methods()``.
        target: output index to explain (int or one per sample); default: the predicted class
            (or the only output of a regressor).
        y: true labels, for methods that score against them (permutation importance).
        background: reference samples for baselines / maskers (default: ``data`` itself).
        feature_names: names of the data's columns (default: a DataFrame's columns).
        seed: seed of every random draw, for reproducible results.
        batch_size: rows per model call (memory bound).
        progress: show progress bars (default: on a terminal, for long work).
        tokenizer, attention_mask, generate, max_length: text (see :func:`explain_text`): ``data`` may be a
            string, a list of strings (with ``tokenizer``) or token ids of a Hugging Face model; on text,
            ``output=`` (in ``params``) is what an LM explains per token.
        **params: the method's own parameters (``whatmatters.describe(method)`` lists them); values of
            the wrong type, NaN or infinite ones raise :class:`~whatmatters.core.errors.ParameterError`.

    Returns:
        An :class:`Importance` with one score per sample and unit (or per unit for global methods).
    """
    if not isinstance(method, str):
        raise MethodError(f"method must be a method name (str), got {method!r}; whatmatters.methods() lists them")
    info = get_method(method)
    if info.verb != "explain":
        hint = "whatmatters.compress.score(model, method, data=...)" if info.verb == "compress" else info.verb
        raise MethodError(f"{method!r} is a {info.verb} method, not an explain method; use {hint} for it")
    module = torch_module(model)
    text_data = is_text_request(data, tokenizer, attention_mask, generate) or _token_ids_for(info, model, data)
    wants_text = "token" in info.variants or tokenizer is not None  # else a string is non-numeric data
    if text_data and wants_text and module is not None:
        output = params.pop("output", None)  # on text, output= is a task option, not a method's
        return explain_text(
            model, data, info, target, tokenizer=tokenizer, attention_mask=attention_mask, generate=generate,
            output=output, max_length=max_length, seed=seed, batch_size=batch_size, progress=progress,
            allow_train_mode=allow_train_mode, params=params,
        )  # fmt: skip
    params = check_params(info.name, params, info.defaults, fn=info.fn)
    if info.needs in ("gradients", "module") and module is None:
        raise ModelError(
            f"{info.name} needs gradients, so it needs a PyTorch nn.Module; for a {type(model).__name__} "
            f"use a model-agnostic method: {', '.join(m for m in _agnostic())}"
        )
    with guarded(model, allow_train_mode):
        if isinstance(data, Task):  # built once by the caller (benchmark): no re-check, no second prediction
            task = data.with_target(target)
            check_units(task.inputs, (info.name, info.units))
        else:
            task = make_task(
                model, data, target, y=y, background=background, feature_names=feature_names,
                seed=seed, batch_size=batch_size, progress=progress, method=(info.name, info.units),
                checks_target=info.checks_target, class_agnostic=info.class_agnostic,
                predicts_target=info.predicts_target,
            )  # fmt: skip
        start = time.perf_counter()
        try:
            out = info.fn(task, **params)
        except WhatMattersError:
            raise
        except Exception:
            if task.n_outputs is None:  # no probe row was run: if the model fails on one row, say so with its shape
                probe(task.model, task.inputs)
            raise
        seconds = time.perf_counter() - start
        task.predicted()
    return info.to_importance(
        out,
        unit=task.unit,
        names=task.names if task.inputs.ndim == 2 else None,
        params=params,
        seed=task.seed,
        seconds=seconds,
        target=None if info.class_agnostic and target is None else _shown_target(target, task.target),
    )


def _shown_target(given: Any, target: torch.Tensor) -> int | list[int]:
    """The target an Importance reports: one int when every sample has the same, else one per sample."""
    if isinstance(given, numbers.Integral) and not isinstance(given, bool):  # checked when the task was made
        return int(given)
    return int(target[0]) if bool((target == target[0]).all()) else target.tolist()


def _token_ids_for(info: Any, model: Any, data: Any) -> bool:
    """Integer ``(n, seq_len)`` ids given to a token method of a model with an embedding layer."""
    return (
        "token" in info.variants
        and isinstance(data, torch.Tensor)
        and data.ndim == 2
        and not data.is_floating_point()
        and callable(getattr(model, "get_input_embeddings", None))
    )


def explain_text(
    model: Any,
    data: Any,
    method: Any,
    target: Any = None,
    *,
    params: dict[str, Any] | None = None,
    allow_train_mode: bool = False,
    **options: Any,
) -> Importance:
    """Token attribution: ``method`` (a name or its registry entry) on the text or token ids ``data``.

    The :class:`~whatmatters.core.text.TextTask` is built by :func:`~whatmatters.core.text.make_text_task`
    (``tokenizer``, ``attention_mask``, ``generate``, ``output``, ``max_length``, ``seed``, ``batch_size``,
    ``progress`` are its options). Values are ``(n, seq_len)`` for classifiers, ``(n, generated, seq_len)``
    for causal LMs, aligned to the padded ``extra["input_ids"]``; ``extra["tokens"]`` holds the token strings.
    """
    info = get_method(method) if isinstance(method, str) else method
    fn = info.variants.get("token")
    if fn is None:
        from whatmatters.core.registry import methods

        token_methods = [m for m in methods(unit="token", verb="explain") if "token" in get_method(m).variants]
        raise MethodError(f"{info.name} does not score text; token methods: {', '.join(token_methods)}")
    params = check_params(info.name, dict(params or {}), keyword_defaults(fn), fn=fn)
    with guarded(model, allow_train_mode):
        for p in model.parameters():  # gradients reach the embeddings only (flags restored by guarded)
            p.requires_grad_(False)
        task = make_text_task(model, data, target, predicts_target=chooses_class(fn), **options)
        start = time.perf_counter()
        out = fn(task, **params)
        seconds = time.perf_counter() - start
        task.predicted()
    target_out = task.target[:, 0].tolist() if task.kind == "classifier" else "continuation"
    if task.kind == "classifier" and len(set(target_out)) == 1:
        target_out = target_out[0]
    values, extra = out
    return Importance(
        values=values,
        unit="token",
        method=info.name,
        params={**keyword_defaults(fn), **params},
        target=target_out,
        seed=task.seed,
        seconds=seconds,
        extra=extra,
    )


def _agnostic() -> list[str]:
    from whatmatters.core.registry import SCORERS

    return sorted(m.name for m in SCORERS.entries.values() if m.verb == "explain" and m.needs == "predict")
