"""`whatmatters compress quantize|prune`: every bad option is one `error:` line before any model loads, and a
tiny random Llama folder quantized from the command line reloads with the logits of the in-memory result."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import whatmatters.cli.compress as compress_cli
from whatmatters.cli import app
from whatmatters.cli.compress import compress_app

runner = CliRunner()
WORDS = ["the", "cat", "sat", "on", "a", "mat", "while", "dog", "ran", "fast", "and", "slow", "big", "red", "blue"]


def invoke(*args):
    return runner.invoke(app, ["compress", *map(str, args)], catch_exceptions=False)


def assert_one_error_line(result, *words):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(source):
        pytest.fail(f"the model {source} was loaded before the options were checked")

    monkeypatch.setattr(compress_cli, "_load", refuse)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["quantize", "--bits", "5"], ["--bits must be one of (2, 3, 4, 8)", "5"]),
        (["quantize", "--group-size", "0"], ["--group-size must be >= 1"]),
        (["quantize", "--method", "awq"], ["unknown --method 'awq'", "gptq, rsq, rtn"]),
        (["quantize", "--seq-len", "1"], ["--seq-len must be >= 2"]),
        (["quantize", "--model", "no/such/folder"], ["neither smollm2 nor a folder"]),
        (["prune", "--sparsity", "1.0"], ["sparsity"]),
        (["prune", "--sparsity", "-0.1"], ["sparsity"]),
        (["prune", "--method", "obd"], ["unknown --method 'obd'", "wanda, magnitude, sparsegpt"]),
        (["prune", "--nm", "4:2"], ["N:M"]),
        (["prune", "--nm", "2:4", "--sparsity", "0.3"], ["not both"]),
        (["prune", "--calibration-docs", "0"], ["--calibration-docs must be >= 1"]),
    ],
)
def test_bad_options_are_one_line_before_loading(args, words, tmp_path, no_model_load):
    assert_one_error_line(invoke(*args, "-o", tmp_path / "out"), *words)


def test_model_folder_and_output_are_checked_first(tmp_path, no_model_load):
    assert_one_error_line(invoke("quantize", "--model", tmp_path, "-o", tmp_path / "out"), "has no config.json")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert_one_error_line(invoke("prune", "-o", tmp_path / "full"), "not an empty folder")


@settings(max_examples=30, deadline=None)
@given(bits=st.integers(-4, 40), group=st.integers(-300, 300))
def test_bits_and_group_size_property(bits, group, tmp_path_factory):
    def refuse(source):
        raise AssertionError("loaded")

    original, compress_cli._load = compress_cli._load, refuse
    try:
        result = invoke("quantize", "--bits", bits, "--group-size", group, "-o", tmp_path_factory.mktemp("o") / "q")
    finally:
        compress_cli._load = original
    assert result.exit_code == 2
    if bits not in (2, 3, 4, 8):
        assert "--bits must be one of" in result.stderr
    elif group < 1:
        assert "--group-size must be >= 1" in result.stderr
    else:  # valid options: the (refused) load is reached only after every check passed
        assert "internal error: AssertionError: loaded" in result.stderr


def test_every_compress_command_turns_errors_into_one_line():
    commands = compress_app.registered_commands
    assert {c.name for c in commands} == {"quantize", "prune"}
    assert all(getattr(cmd.callback, "clean_errors", False) for cmd in commands)


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def tiny_folder(tmp_path):
    """A random tiny Llama + word tokenizer saved as a Hugging Face folder, and a text file of 6 documents."""
    model, tok = tiny_model("llama", vocab=len(WORDS) + 2, positions=64), word_tokenizer()
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    gen = torch.Generator().manual_seed(0)
    docs = [" ".join(WORDS[i] for i in torch.randint(len(WORDS), (60,), generator=gen)) for _ in range(6)]
    (tmp_path / "docs.txt").write_text("\n\n".join(docs))
    return model, tok, docs


def test_quantize_a_local_folder_and_reload_identically(tmp_path):
    pytest.importorskip("safetensors")
    from whatmatters.compress import gptq, lm_windows
    from whatmatters.compress.checkpoint import load_quantized_folder

    model, tok, docs = tiny_folder(tmp_path)
    out = tmp_path / "q4"
    source = ["--model", tmp_path / "tiny", "--texts", tmp_path / "docs.txt", "--seq-len", 12]
    options = ["--bits", 4, "--group-size", 16, "--calibration-docs", 8, "--eval-docs", 3]
    result = invoke("quantize", *source, *options, "-o", out)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "compress-report.json").read_text())
    assert summary["bytes on disk"] == (out / "quantized.safetensors").stat().st_size
    assert summary["perplexity after"] > 0 and f"bytes on disk: {summary['bytes on disk']}" in result.stdout

    calibration = lm_windows(docs[0::2], tok, n_sequences=8, seq_len=12, seed=0)
    in_memory, _ = gptq(model, 4, data=calibration, group_size=16)
    reloaded, reloaded_tok = load_quantized_folder(out)
    ids = calibration[:2]
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, in_memory(ids).logits)
    assert reloaded_tok("the cat")["input_ids"] == tok("the cat")["input_ids"]
    layers = json.loads((out / "compress-layers.json").read_text())
    assert len(layers) == 7 * 2 and {r["bits"] for r in layers} == {4}  # 7 linear layers in each of 2 blocks


def test_prune_a_local_folder_to_two_of_four(tmp_path):
    from transformers import AutoModelForCausalLM

    tiny_folder(tmp_path)
    out = tmp_path / "p24"
    result = invoke("prune", "--model", tmp_path / "tiny", "--texts", tmp_path / "docs.txt", "--method", "wanda",
                    "--nm", "2:4", "--calibration-docs", 4, "--seq-len", 12, "-o", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    pruned = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    w = pruned.model.layers[1].mlp.up_proj.weight
    assert torch.equal((w.reshape(w.shape[0], -1, 4) != 0).sum(-1), torch.full((w.shape[0], w.shape[1] // 4), 2))
    assert json.loads((out / "compress-report.json").read_text())["sparsity of the pruned layers"] == 0.5


def test_a_folder_without_tokenizer_or_documents_is_one_line(tmp_path):
    from whatmatters.compress import load_quantized_folder
    from whatmatters.core.errors import InputError

    tiny_folder(tmp_path)
    (tmp_path / "one.txt").write_text("the cat sat on the mat")
    one = ["--texts", tmp_path / "one.txt", "-o", tmp_path / "out"]
    assert_one_error_line(invoke("quantize", "--model", tmp_path / "tiny", *one), "at least two documents")
    tiny_model("llama", vocab=20, positions=64).save_pretrained(tmp_path / "bare")
    six = ["--texts", tmp_path / "docs.txt", "-o", tmp_path / "out"]
    assert_one_error_line(invoke("prune", "--model", tmp_path / "bare", *six), "has no tokenizer")
    with pytest.raises(InputError, match="save_quantized_folder"):
        load_quantized_folder(tmp_path / "tiny")
