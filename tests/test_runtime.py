"""The shared runtime: precision policy and logging (tracking: tests/test_tracking.py)."""

from __future__ import annotations

import logging

import pytest

from align.errors import BadInput
from align.runtime import CURRENT_STAGE, choose_precision, setup_logging


def test_precision_on_cpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    auto = choose_precision("auto")
    assert auto.name == "fp32" and "no GPU" in auto.reason and auto.train_args == {"bf16": False, "fp16": False}
    with pytest.raises(BadInput, match="fp16 needs a CUDA GPU"):
        choose_precision("fp16")


@pytest.mark.parametrize(("bf16_ok", "expected"), [(True, "bf16"), (False, "fp16")])
def test_precision_on_gpus(monkeypatch, caplog, bf16_ok, expected):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Some GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_ok)
    with caplog.at_level(logging.WARNING):
        chosen = choose_precision("auto")
    assert chosen.name == expected and chosen.train_args[expected] is True
    if expected == "fp16":
        assert "NaN" in caplog.text, "fp16 is chosen with a warning that names the NaN risk"
        with pytest.raises(BadInput, match="does not support bf16"):
            choose_precision("bf16")


def test_log_lines_carry_time_level_and_stage(tmp_path, capsys):
    setup_logging("info", tmp_path / "align.log")
    token = CURRENT_STAGE.set("sft")
    try:
        logging.getLogger("align.test").info("hello")
        logging.getLogger("align.test").debug("only in the file")
    finally:
        CURRENT_STAGE.reset(token)
    err = capsys.readouterr().err
    assert "INFO    [sft] align.test: hello" in err and "only in the file" not in err
    text = (tmp_path / "align.log").read_text()
    assert "[sft] align.test: hello" in text and "DEBUG   [sft] align.test: only in the file" in text


def test_transformers_tensor_parallel_notes_are_dropped_and_its_other_warnings_kept(caplog):
    """transformers 5 warns "The following layers were not sharded" on every load of a reward model, parallel or
    not; align never shards by tensor parallelism."""
    import logging

    from align.runtime import setup_logging

    setup_logging("info")
    tensor_parallel = logging.getLogger("transformers.distributed.tensor_parallel")
    with caplog.at_level(logging.WARNING):
        tensor_parallel.warning("The following layers were not sharded: transformer.h.*.ln_2.bias")
        tensor_parallel.warning("The following TP rules were not applied on any of the layers: {}")
        tensor_parallel.warning("something else")
    messages = [r.getMessage() for r in caplog.records if r.name == tensor_parallel.name]
    assert messages == ["something else"]


@pytest.fixture
def terminal():
    """A pseudo-terminal's writing end, and a function that gives it a width in columns (a new one has none)."""
    import fcntl
    import os
    import struct
    import termios

    leader, follower = os.openpty()
    stream = os.fdopen(follower, "w")

    def resize(columns: int) -> None:
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))

    yield stream, resize
    stream.close()
    os.close(leader)


def test_at_a_terminal_log_lines_go_above_the_progress_bars(monkeypatch, terminal):
    """On a terminal, log lines were glued to tqdm's bars (`...1.26it/s]07:08:01 INFO ...`): through tqdm.write they
    clear the bars first."""
    import io
    import logging

    import tqdm

    from align.runtime import _ConsoleHandler

    stream, resize = terminal
    resize(100)
    written = []
    monkeypatch.setattr(tqdm.tqdm, "write", classmethod(lambda cls, text, file=None, **kw: written.append(text)))
    pipe = io.StringIO()
    record = logging.LogRecord("align.x", logging.INFO, __file__, 1, "a line", None, None)
    _ConsoleHandler(stream).emit(record)
    _ConsoleHandler(pipe).emit(record)
    assert written == ["a line"], "the terminal's line went through tqdm.write"
    assert pipe.getvalue() == "a line\n", "a pipe or file gets the plain line"


def test_a_terminal_without_a_width_draws_no_progress_bars(monkeypatch, terminal):
    """`script` without a terminal (and some CI runners) gives a pseudo-terminal of 0 columns, where every tqdm bar
    came out as a blank line: there align draws none, as in a pipe (the Trainer's `disable_tqdm` follows it)."""
    import io
    import sys

    from align.runtime import draws_progress_bars

    stream, resize = terminal
    assert stream.isatty() and draws_progress_bars(stream) is False, "a new pty has 0 columns"
    resize(80)
    assert draws_progress_bars(stream) is True
    assert draws_progress_bars(io.StringIO()) is False
    resize(0)
    monkeypatch.setattr(sys, "stderr", stream)
    assert draws_progress_bars() is False
