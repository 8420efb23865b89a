"""The search's live view, as a person at a terminal sees it, and the plain lines everywhere else.

A script drives the real leaderboard callback (stand-in Tune trials, a real leaderboard) through a
``SearchReporter`` whose console writes to a pseudo-terminal, or to a pipe; the test reads what
came out, with the terminal's cursor movements and colours taken away.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

TESTS = Path(__file__).parent

#: what the leaderboard callback tells the reporter of four trials of one study (two slots), on a
#: clock of the script's own: ``a`` runs both epochs, ``b`` is stopped after one, ``c`` fails,
#: ``d`` runs both epochs; then (``interrupt``) ``e`` is running when the search is interrupted
SCRIPT = r"""
import sys, types
sys.path.insert(0, sys.argv[1])
from conftest import tiny_search
from rich.console import Console

import medpeft_ray.search.callbacks as callbacks
from medpeft_ray.config import validate_search_dict
from medpeft_ray.search.progress import SearchReporter

now = [1000.0]
callbacks.time = types.SimpleNamespace(time=lambda: now[0])  # the callback's clock is the reporter's
console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)  # as the CLI's
reporter = SearchReporter(console, clock=lambda: now[0])
config = validate_search_dict(tiny_search(search={"num_samples": 4}), "tiny.yaml")
timeline = callbacks.SearchTimeline()
reporter.watch("val_auroc", "max", 2, timeline)
reporter.storage = "/results/tiny"
callback = callbacks.LeaderboardCallback(config, 1.0, "sqlite:///" + sys.argv[2], reporter, timeline)


class Trial:
    def __init__(self, trial_id, lr, error=None):
        self.trial_id, self.config, self.error = trial_id, {"lr": lr}, error

    def get_error(self):
        return self.error


def epoch(trial, n, auroc):
    callback.on_trial_result(0, [], trial, {"epoch": n, "val_auroc": auroc, "train_time_s": 25.0 * n})


a, b, c, d, e = (Trial("a", 3e-3), Trial("b", 1e-3), Trial("c", 9e-3, "ValueError: bad lr"), Trial("d", 5e-3),
                 Trial("e", 2e-3))
reporter.study_starts(1.0, 4)
callback.on_trial_start(0, [], a)
callback.on_trial_start(0, [], b)
now[0] += 30; epoch(a, 1, 0.70); epoch(b, 1, 0.60)
now[0] += 30; epoch(a, 2, 0.81)
callback.on_trial_complete(0, [], a)           # 60 s
callback.on_trial_complete(0, [], b)           # stopped after one of two epochs
callback.on_trial_start(0, [], c)
callback.on_trial_start(0, [], d)
now[0] += 10; callback.on_trial_error(0, [], c)
now[0] += 50; epoch(d, 1, 0.75); epoch(d, 2, 0.79)
callback.on_trial_complete(0, [], d)
if sys.argv[3] == "interrupt":
    callback.on_trial_start(0, [], e)
    reporter.interrupted()
    callback.on_trial_complete(0, [], e)       # the leaving process's last event: recorded, not shown
else:
    reporter.study_ends(1.0)
    reporter.close()
"""

#: the lines of that script on a console that is not a terminal: exactly the search's lines of today
PLAIN = [
    "[ratio 1] trial 1/4 started  lr=0.003",
    "[ratio 1] trial 2/4 started  lr=0.001",
    "[ratio 1] trial 1/4 epoch 1/2  val_auroc=0.7",
    "[ratio 1] trial 2/4 epoch 1/2  val_auroc=0.6",
    "[ratio 1] trial 1/4 epoch 2/2  val_auroc=0.81",
    "[ratio 1] trial 1/4 completed: best val_auroc=0.81 at epoch 2 (60 s)",
    "[ratio 1] trial 2/4 stopped: best val_auroc=0.6 at epoch 1 (60 s)",
    "[ratio 1] trial 3/4 started  lr=0.009",
    "[ratio 1] trial 4/4 started  lr=0.005",
    "[ratio 1] trial 3/4 failed: ValueError: bad lr",
    "[ratio 1] trial 4/4 epoch 1/2  val_auroc=0.75",
    "[ratio 1] trial 4/4 epoch 2/2  val_auroc=0.79",
    "[ratio 1] trial 4/4 completed: best val_auroc=0.79 at epoch 2 (60 s)",
]

#: colours, cursor movements, line erasures and the cursor's show/hide
CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")
#: the same but colours: the live view's redraws (back up its lines, erase them) become line breaks
MOVES = re.compile(r"\x1b\[[0-9;?]*[A-Za-ln-z]")
COLOURS = re.compile(r"\x1b\[[0-9;]*m|\r")


def run_script(tmp_path: Path, mode: str, terminal: bool) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE",
                                                              "NO_COLOR", "COLUMNS", "LINES")}
    env.update(TERM="xterm-256color", HF_HUB_OFFLINE="1")
    command = [sys.executable, "-c", SCRIPT, str(TESTS), str(tmp_path / f"lb-{mode}.db"), mode]
    if not terminal:
        done = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # 40 rows of 160 columns
    process = subprocess.Popen(command, env=env, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    seen = bytearray()
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError as exc:  # EIO: the script has ended and closed the terminal
            if exc.errno != errno.EIO:
                raise
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    assert process.wait(timeout=60) == 0, seen.decode(errors="replace")[-3000:]
    return seen.decode(errors="replace")


@pytest.fixture(scope="module")
def seen_on_terminal(tmp_path_factory: pytest.TempPathFactory) -> str:
    return run_script(tmp_path_factory.mktemp("live"), "finish", terminal=True)


def frames(raw: str) -> list[str]:
    """The text of each drawing of the panel (the lines printed above it are between them)."""
    text = MOVES.sub("\n", COLOURS.sub("", raw))
    return re.findall(r"^ratio 1 [^\n]*\n[^\n]*\n[^\n]*slot\(s\)[^\n]*", text, re.MULTILINE)


def test_a_terminal_shows_the_study_bar_counts_best_and_times(seen_on_terminal: str) -> None:
    assert "\x1b[" in seen_on_terminal  # a live display moves the cursor; plain lines never do
    shown = frames(seen_on_terminal)
    assert shown, CONTROL.sub("", seen_on_terminal)[-3000:]
    last = shown[-1]  # left on the screen when the study has ended
    assert "2/4 done, 0 running, 1 stopped, 1 failed" in last, last
    assert "best val_auroc 0.81 (lr=0.003)" in last, last
    assert "2:00 elapsed, finished" in last, last
    # slot utilisation: 50 + 25 + 0 + 50 s of training over 2 slots x 120 s
    assert "2 slot(s), 0 trial(s) running, utilisation 52%" in last, last
    assert "━" in last  # the bar


def test_the_panel_follows_the_trials_as_they_run(seen_on_terminal: str) -> None:
    shown = frames(seen_on_terminal)
    assert any("0/4 done, 2 running, 0 stopped, 0 failed" in f and "left: estimated after the first trial" in f
               and "best: none yet" in f for f in shown), shown
    # after the first trial (60 s): two not started and nothing left of the running one, over two slots
    assert any("1/4 done, 1 running, 0 stopped, 0 failed" in f and "1:00 elapsed, left: ~1:00" in f
               and "best val_auroc 0.81 (lr=0.003)" in f for f in shown), shown
    assert any("1/4 done, 1 running, 1 stopped, 1 failed" in f for f in shown), shown


def test_event_lines_scroll_above_the_panel(seen_on_terminal: str) -> None:
    text = CONTROL.sub("", seen_on_terminal)
    for line in PLAIN:
        assert line in text, line
    # each line is printed, then the panel drawn again below it
    after_first = text.split(PLAIN[0], 1)[1]
    assert after_first.lstrip("\n").startswith("ratio 1 "), after_first[:300]


def test_without_a_terminal_the_output_is_the_plain_lines(tmp_path: Path) -> None:
    out = run_script(tmp_path, "finish", terminal=False)
    assert out.splitlines() == PLAIN


def test_an_interruption_stops_the_view_and_says_what_was_saved(tmp_path: Path) -> None:
    raw = run_script(tmp_path, "interrupt", terminal=True)
    text = CONTROL.sub("", raw)
    saved = ("saved: 4 finished trial(s) in the leaderboard (ratio 1: 2/4 done, 1 stopped, 1 failed); "
             "1 running trial(s) start again from their last checkpoint when resumed; "
             "the studies' state (Tune, Optuna) in /results/tiny")
    assert saved in text, text[-2000:]
    after = text.split(saved, 1)[1]
    assert "trial 5/4" not in after and "ratio 1 " not in after  # no line and no panel once interrupted
    assert raw.rfind("\x1b[?25h") > raw.rfind("\x1b[?25l") >= 0  # the live view hid the cursor, and showed it again


@pytest.mark.parametrize(("args", "said"), [
    (["--space", "SPACE", "--results", "RESULTS"], "`medpeft-ray search --resume tiny --results RESULTS` continues"),
    (["--resume", "older", "--db", "sqlite:///x.db"], "`medpeft-ray search --resume older --db sqlite:///x.db` continues"),
])
def test_ctrl_c_prints_the_command_that_resumes_the_experiment(args: list[str], said: str, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml
    from conftest import tiny_search

    from medpeft_ray.cli import app
    from medpeft_ray.search import runner

    space = tmp_path / "tiny.yaml"
    space.write_text(yaml.safe_dump(tiny_search()))
    results = tmp_path / "results"

    def interrupted(config: Any, **options: Any) -> None:
        exc = KeyboardInterrupt()
        exc.experiment = config.experiment_name  # type: ignore[attr-defined]  # as run_search does
        raise exc

    monkeypatch.setattr(runner, "run_search", interrupted)
    monkeypatch.setattr(runner, "resumable_config", lambda name, results: type("C", (), {"experiment_name": name})())
    args = [str(space) if a == "SPACE" else str(results) if a == "RESULTS" else a for a in args]
    result = CliRunner().invoke(app, ["search", *args])
    assert result.exit_code == 130
    assert said.replace("RESULTS", str(results)) in result.output, result.output


def test_the_panel_fits_80_columns_and_counts_trials_waiting_for_an_executor() -> None:
    """Each study's heading (label, bar, counts) is one line and no line of the panel is wider than
    the terminal, whatever the ratio, the counts or the best trial's parameters."""
    import io

    from rich.console import Console

    from medpeft_ray.search.progress import SearchReporter

    now = [1000.0]
    console = Console(file=io.StringIO(), width=80, force_terminal=False)
    reporter = SearchReporter(console, clock=lambda: now[0])
    reporter.watch("val_auroc", "max", 2)
    params = {"lr": 0.00123, "method": "lora", "rank": 16, "alpha": 32, "dropout": 0.1, "layer_decay": 0.75}
    for ratio in (0.125, 1.0):
        reporter.study_starts(ratio, 100)
        for number in range(1, 6):
            status = "waiting" if number > 3 else "running"
            reporter.trial(ratio, f"t{number}", number, 100, "started", status=status, params=params)
        now[0] += 100
        reporter.trial(ratio, "t1", 1, 100, "completed", status="completed", value=0.91)
        reporter.trial(ratio, "t2", 2, 100, "failed", status="failed")
        reporter.trial(ratio, "t4", 4, 100, "started", status="running")  # an executor took it
    screen = Console(file=io.StringIO(), width=80, force_terminal=False)  # the panel alone, as drawn
    screen.print(reporter.panel())
    lines = [line.rstrip() for line in screen.file.getvalue().splitlines()]
    assert max(len(line) for line in lines) <= 80, "\n".join(lines)
    assert len(lines) == 5  # two lines per study, then the slots' line
    assert lines[0].startswith("ratio 0.125 ") and lines[0].endswith("1/100 done, 2 running, 1 waiting, 0 stopped, 1 failed")
    assert lines[1].startswith("  3:20 elapsed, left: ~") and "best val_auroc 0.91 (lr=0.00123" in lines[1]
    assert lines[2].startswith("ratio 1 ") and lines[3].startswith("  1:40 elapsed, left: ~")
    assert lines[4].startswith("2 slot(s), 4 trial(s) running, 2 waiting for an executor")
    # a trial's time runs from when an executor took it: t4 has run for no time yet
    study = reporter._studies[1.0]
    assert study.trials["t4"].started_at == now[0] and study.trials["t5"].status == "waiting"
