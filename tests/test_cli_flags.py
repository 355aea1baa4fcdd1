"""The flags the `python -m enat.*` commands share: one spelling for one thing (the renamed flags' old
spellings still parse, to the same value, with a deprecation warning naming the new one) and the
image-decoding workers' default."""

import os
import warnings
from unittest import mock

import pytest

import enat.train
from enat import cli, demo, evaluate, tokenize

TRAIN = ["--data", "tokens.npy", "--out", "run"]


def _parse(parser, argv):
    """(args, the warnings' messages) of parsing argv."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args = parser.parse_args(argv)
    return args, [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]


@pytest.mark.parametrize("build, fixed, new, old, dest, value", [
    (enat.train.build_parser, TRAIN, ["--model", "ENAT-S"], ["--config", "ENAT-S"], "model", "ENAT-S"),
    (enat.train.build_parser, TRAIN, ["--batch-size", "64"], ["--batch", "64"], "batch_size", 64),
    (enat.train.build_parser, TRAIN, ["--dtype", "bf16"], ["--bf16"], "dtype", "bf16"),
    (enat.train.build_parser, TRAIN, ["--dtype", "fp16"], ["--fp16"], "dtype", "fp16"),
    (demo.build_parser, [], ["--batch-size", "16"], ["--batch", "16"], "batch_size", 16),
], ids=["train --config", "train --batch", "train --bf16", "train --fp16", "demo --batch"])
def test_old_spellings_parse_to_the_new_flags_with_a_warning(build, fixed, new, old, dest, value):
    args, messages = _parse(build(), fixed + new)
    assert getattr(args, dest) == value and messages == []
    args, messages = _parse(build(), fixed + old)
    assert getattr(args, dest) == value
    assert messages == [f"{old[0]} is deprecated: use {new[0]}" + (f" {new[1]}" if len(old) == 1 else "")]


def test_old_spellings_keep_the_defaults_and_are_hidden_from_help():
    args, _ = _parse(enat.train.build_parser(), TRAIN)
    assert (args.model, args.batch_size, args.dtype) == (None, 256, "fp32")
    assert demo.build_parser().parse_args([]).batch_size == 64
    text = enat.train.build_parser().format_help()
    assert "--batch-size" in text and "--dtype" in text
    assert not any(flag in text.split() for flag in ("--config", "--batch", "--bf16", "--fp16"))


@pytest.mark.parametrize("argv", [["--bf16", "--fp16"], ["--dtype", "fp16", "--bf16"]])
def test_train_precision_flags_exclude_each_other(argv, capsys):
    with pytest.raises(SystemExit):
        _parse(enat.train.build_parser(), TRAIN + argv)
    assert "not allowed with argument" in capsys.readouterr().err


def test_every_command_spells_the_batch_size_alike():
    for parser in (enat.train.build_parser(), demo.build_parser(), tokenize.build_parser(), evaluate.build_parser(),
                   evaluate.build_stats_parser()):
        assert "--batch-size" in parser.format_help(), parser.prog


@pytest.mark.parametrize("cpus, expected", [(1, 1), (2, 2), (3, 3), (16, 4)])
def test_default_workers_are_the_cpus_at_most_4(cpus, expected):
    with mock.patch.object(os, "sched_getaffinity", lambda pid: set(range(cpus)), create=True):
        assert cli.default_workers() == expected


@pytest.mark.parametrize("cpu_count, expected", [(2, 2), (8, 4), (None, 1)])
def test_default_workers_without_sched_getaffinity(monkeypatch, cpu_count, expected):
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: cpu_count)
    assert cli.default_workers() == expected


def test_tokenize_workers_default_to_this_machine_and_say_so():
    expected = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    for parser in (tokenize.build_parser(), evaluate.build_stats_parser()):
        args = parser.parse_args(["images/", "tokens.npy"] if parser.prog.endswith("tokenize")
                                 else ["--images", "images/", "--out", "ref.npz"])
        assert args.workers == expected
        help_text = " ".join(parser.format_help().split())
        assert f"this machine's CPUs, at most 4: {expected} here" in help_text
