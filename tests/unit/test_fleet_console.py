"""The fleet's console (server/fleet/console.py): whole lines only, however threads interleave.

Ray's log thread forwards replica output with print() (the text, then the newline: two writes)
while the fleet prints its own lines; without the line writers a fleet message could land inside
another line and a reader waiting for "^loraplex: fleet serving" would never see it."""

from __future__ import annotations

import io
import sys
import threading
import time

from loraplex.server.fleet.console import LineWriter, whole_lines


class PipeLike(io.StringIO):
    """A target whose write lets other threads run, as a write to a pipe does (the GIL is let go)."""

    def write(self, text: str) -> int:
        written = super().write(text)
        time.sleep(0)
        return written


def _print_many(stream, tag: str, count: int, start: threading.Barrier) -> None:
    start.wait()
    for index in range(count):
        print(f"{tag} line {index} " + "x" * (index % 37), file=stream)    # two writes per line


def _run_printers(out, err) -> list[str]:
    start = threading.Barrier(4)
    threads = [threading.Thread(target=_print_many, args=(stream, f"t{n}", 500, start))
               for n, stream in enumerate((out, err, out, err))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [f"t{n} line {i} " + "x" * (i % 37) for n in range(4) for i in range(500)]


def test_concurrent_prints_on_two_streams_reach_the_target_as_whole_lines():
    # (the same printers straight onto a PipeLike break hundreds of the 2000 lines)
    target, lock = PipeLike(), threading.Lock()
    out, err = LineWriter(target, lock), LineWriter(target, lock)      # stdout and stderr: one pipe
    expected = _run_printers(out, err)
    lines = target.getvalue().split("\n")
    assert lines[-1] == "" and sorted(lines[:-1]) == sorted(expected)


def test_a_partial_line_waits_for_its_newline_or_an_explicit_flush():
    target, lock = io.StringIO(), threading.Lock()
    writer = LineWriter(target, lock)
    writer.write("progress 1")
    assert target.getvalue() == ""
    writer.write("0%\nnext")
    assert target.getvalue() == "progress 10%\n"
    writer.flush()
    assert target.getvalue() == "progress 10%\nnext"


def test_whole_lines_swaps_and_restores_the_std_streams(capsys):
    saved = sys.stdout, sys.stderr
    with whole_lines():
        assert isinstance(sys.stdout, LineWriter) and isinstance(sys.stderr, LineWriter)
        print("done", end="")                                         # no newline: written on exit
    assert (sys.stdout, sys.stderr) == saved
    assert capsys.readouterr().out == "done"
