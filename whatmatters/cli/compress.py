"""``whatmatters compress quantize|prune``: GPTQ / RSQ / round-to-nearest packed low-bit weights, or Wanda /
magnitude / SparseGPT pruning, of SmolLM2 or any local Hugging Face causal LM folder, written to a folder.

Every option is checked before the model loads. Calibration windows come from the even-numbered documents
of ``--texts``, held-out windows (``--eval-docs``) from the odd-numbered ones, as in the benchmarks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from whatmatters.cli.commands import _clean_errors, _console
from whatmatters.core.errors import InputError, ModelError

compress_app = typer.Typer(
    name="compress",
    help="Compress a causal LM: real low-bit quantization (quantize) or pruning (prune), written to a folder.",
    no_args_is_help=True,
)

QUANT_METHODS = ("gptq", "rsq", "rtn")
PRUNE_METHODS = ("wanda", "magnitude", "sparsegpt")

_MODEL = typer.Option("smollm2", "--model", help="smollm2 (SmolLM2-135M, offline) or a local HF causal LM folder.")
_TEXTS = typer.Option("python-docs", "--texts", help="Text: a whatmatters.text.load_texts name or a .txt file.")
_CAL = typer.Option(16, "--calibration-docs", help="Calibration windows of --seq-len tokens.")
_SEQ = typer.Option(128, "--seq-len", help="Tokens per calibration / evaluation window.")
_EVAL = typer.Option(0, "--eval-docs", help="Held-out windows for perplexity before and after (0: skip).")
_SEED = typer.Option(0, "--seed", help="Seed of the calibration windows.")
_OUT = typer.Option(..., "--out", "-o", help="A new (or empty) folder to write the compressed model to.")


def _count(value: int, flag: str, minimum: int) -> int:
    if value < minimum:
        raise InputError(f"{flag} must be >= {minimum}, got {value}")
    return value


def _choice(value: str, flag: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise InputError(f"unknown {flag} {value!r}; choose {', '.join(choices)}")
    return value


def _model_source(model: str) -> str | Path:
    """``"smollm2"`` or the path of a folder holding a transformers ``config.json``, checked before loading."""
    if model == "smollm2":
        return model
    path = Path(model)
    if not path.is_dir():
        raise InputError(f"--model {model!r} is neither smollm2 nor a folder; give a local Hugging Face model folder")
    if not (path / "config.json").is_file():
        raise InputError(f"{path} has no config.json; give a folder written by save_pretrained")
    return path


def _new_folder(out: Path) -> Path:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out} already exists and is not an empty folder; choose a new folder for -o")
    return out


def _load(source: str | Path) -> tuple[Any, Any]:
    if source == "smollm2":
        from whatmatters.text.pretrained import load_smollm2

        return load_smollm2()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from whatmatters.text.pretrained import offline

    with offline():
        try:  # the tokenizer first: a folder without one fails before the weights load
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        except (OSError, ValueError) as err:
            fix = "save one there with tokenizer.save_pretrained"
            raise ModelError(f"{source} has no tokenizer ({err}); {fix}") from None
        model = AutoModelForCausalLM.from_pretrained(source, local_files_only=True)
    return model.eval(), tokenizer


def _documents(texts: str) -> list[str]:
    path = Path(texts)
    if texts.endswith(".txt") or path.is_file():
        docs = [d.strip() for d in path.read_text(encoding="utf-8").split("\n\n")]
        docs = [d for d in docs if d]
        if len(docs) < 2:
            raise InputError(f"{path} needs at least two documents separated by a blank line (calibration + held out)")
        return docs
    from whatmatters.text.pretrained import load_texts

    return load_texts(texts)


@dataclass
class _Job:
    """One compress run: the output folder, the loaded model and tokenizer, calibration and held-out windows."""

    out: Path
    model: Any
    tokenizer: Any
    calibration: Any
    held_out: Any
    summary: dict[str, Any]

    @classmethod
    def start(cls, model: str, texts: str, n_cal: int, seq_len: int, n_eval: int, seed: int, out: Path) -> _Job:
        """Check the shared options and the paths, then load the model and cut the windows (no model load before)."""
        from whatmatters.compress.batches import lm_windows
        from whatmatters.compress.lm_eval import held_out_windows

        _count(n_cal, "--calibration-docs", 1)
        _count(seq_len, "--seq-len", 2)
        _count(n_eval, "--eval-docs", 0)
        source, out = _model_source(model), _new_folder(out)
        docs = _documents(texts)
        lm, tokenizer = _load(source)
        calibration = lm_windows(docs[0::2], tokenizer, n_sequences=n_cal, seq_len=seq_len, seed=seed)
        held_out = held_out_windows(docs[1::2], tokenizer, n_eval, seq_len) if n_eval else None
        summary = {"model": str(source), "calibration": list(calibration.shape)}
        job = cls(out, lm, tokenizer, calibration, held_out, summary)
        job.perplexity(lm, "perplexity before")
        return job

    def perplexity(self, model: Any, key: str) -> None:
        from whatmatters.compress.lm_eval import perplexity

        if self.held_out is not None:
            self.summary[key] = round(perplexity(model, self.held_out, progress=True), 4)

    def finish(self, compressed: Any, frame: Any, **facts: Any) -> None:
        """Held-out perplexity after, then the summary and per-layer JSON files; the summary printed."""
        self.summary.update(facts)
        self.perplexity(compressed, "perplexity after")
        self.summary["folder"] = str(self.out)
        (self.out / "compress-report.json").write_text(json.dumps(self.summary, indent=1) + "\n")
        frame.reset_index().to_json(self.out / "compress-layers.json", orient="records", indent=1)
        console = _console()
        for key, value in self.summary.items():
            console.print(f"{key}: {value}", markup=False)


@compress_app.command("quantize")
@_clean_errors
def quantize_cmd(
    model: str = _MODEL,
    bits: int = typer.Option(4, "--bits", help="Bits per weight: 2, 3, 4 or 8."),
    group_size: int = typer.Option(128, "--group-size", help="Inputs sharing one scale and zero point (> 0)."),
    method: str = typer.Option("gptq", "--method", help="gptq, rsq (rotation + token importance) or rtn."),
    texts: str = _TEXTS,
    calibration_docs: int = _CAL,
    seq_len: int = _SEQ,
    eval_docs: int = _EVAL,
    seed: int = _SEED,
    out: Path = _OUT,
) -> None:
    """Real packed low-bit weights; writes config, tokenizer and quantized.safetensors (load_quantized_folder)."""
    from whatmatters.compress import gptq, rsq
    from whatmatters.compress.checkpoint import save_quantized_folder
    from whatmatters.compress.packed import check_bits

    check_bits(bits, "--bits")
    _count(group_size, "--group-size", 1)
    _choice(method, "--method", QUANT_METHODS)
    job = _Job.start(model, texts, calibration_docs, seq_len, eval_docs, seed, out)
    action = rsq if method == "rsq" else gptq
    options = {} if method == "rsq" else {"method": method}
    quantized, report = action(job.model, bits, data=job.calibration, group_size=group_size, progress=True, **options)
    size = save_quantized_folder(quantized, job.out, job.tokenizer)
    facts = {"method": method, "bits": bits, "group size": group_size, "average bits": round(report.average_bits, 3),
             "bytes on disk": size, "float bytes of the quantized layers": report.float_bytes,
             "seconds": round(report.seconds, 1)}  # fmt: skip
    job.finish(quantized, report.to_frame(), **facts)


@compress_app.command("prune")
@_clean_errors
def prune_cmd(
    model: str = _MODEL,
    method: str = typer.Option("wanda", "--method", help="wanda, magnitude or sparsegpt."),
    sparsity: float = typer.Option(None, "--sparsity", help="Share of each layer's weights zeroed, in [0, 1); 0.5."),
    nm: str = typer.Option(None, "--nm", help="N:M pattern instead of --sparsity, e.g. 2:4."),
    texts: str = _TEXTS,
    calibration_docs: int = _CAL,
    seq_len: int = _SEQ,
    eval_docs: int = _EVAL,
    seed: int = _SEED,
    out: Path = _OUT,
) -> None:
    """Zero the least important weights; writes a folder transformers loads (from_pretrained)."""
    from whatmatters.compress import prune, sparsegpt
    from whatmatters.compress.sparsity import check_sparsity, parse_pattern

    _choice(method, "--method", PRUNE_METHODS)
    pattern = "unstructured" if nm is None else nm
    n_m = parse_pattern(pattern)
    if n_m is not None and sparsity is not None:
        raise InputError(f"--nm {nm} fixes the sparsity at 1 - N/M; give --sparsity or --nm, not both")
    share = check_sparsity(0.5 if sparsity is None else sparsity) if n_m is None else None
    job = _Job.start(model, texts, calibration_docs, seq_len, eval_docs, seed, out)
    if method == "sparsegpt":
        pruned, report = sparsegpt(job.model, share, pattern, data=job.calibration, progress=True)
    else:
        pruned, report = prune(job.model, method, share, pattern, data=job.calibration)
    pruned.save_pretrained(job.out)
    job.tokenizer.save_pretrained(job.out)
    facts = {"method": method, "pattern": pattern, "sparsity of the pruned layers": round(report.achieved, 4),
             "sparsity of the model": round(report.model_sparsity, 4)}  # fmt: skip
    job.finish(pruned, report.to_frame(), **facts)
