"""The one check behind every "refused in one sentence" promise: a message for a person is one
line, one sentence ending in a full stop (or a question mark), no traceback, and it names the
facts the person needs. It checks a message, an exception's message or a command's stderr."""

from __future__ import annotations

import re
import subprocess

SECOND_SENTENCE = re.compile(r"[.!?]\s+[A-Z]")


def one_sentence(said: str | BaseException | subprocess.CompletedProcess, *facts: str,
                 prefix: str | None = None, max_length: int | None = None) -> str:
    """`said` is one sentence starting with `prefix`, at most `max_length` characters, holding
    every fact; returned. A message is checked as it is; an exception by its message; a
    command must have failed, printing nothing but that sentence on stderr, after `Error: `
    (the default prefix for a command)."""
    if isinstance(said, subprocess.CompletedProcess):
        assert said.returncode != 0, said.stdout
        assert "Traceback" not in said.stderr, said.stderr
        lines = said.stderr.splitlines()
        assert len(lines) == 1, said.stderr
        text, prefix = lines[0], "Error: " if prefix is None else prefix
    else:
        text = str(said)
    assert text and "\n" not in text and "Traceback" not in text, text
    assert text.startswith(prefix or ""), (prefix, text)
    assert text[-1] in ".?", f"no full stop: {text}"
    assert not SECOND_SENTENCE.search(text), f"more than one sentence: {text}"
    assert max_length is None or len(text) <= max_length, f"longer than {max_length}: {text}"
    for fact in facts:
        assert fact in text, (fact, text)
    return text
