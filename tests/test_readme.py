"""The README as a test: every command block it shows runs, in order, in a scratch copy of the
repository, exactly as printed; every output it shows is checked against what the commands print.

Run with ``make test-readme`` (CI runs it after ``make test``). What the README source marks:

* a ```` ```bash ```` block runs, unless the line before it is ``<!-- readme: skip REASON -->``
  (Kubernetes, AWS, placeholders): skipped blocks are listed by the test, with their reasons;
* a block whose lines start with ``$ `` is a transcript: each command runs and every line shown
  under it must appear in what it printed (unless marked ``skip REASON`` as well);
* ``<!-- readme: output of COMMAND -->`` before a plain block: every line shown must appear in
  what the last block running ``COMMAND`` printed.

Lines are compared with numbers, pids, paths of the checkout and durations normalised, so a shown
run with other figures still matches, while a changed message, a missing line or a traceback do not.
Long-running servers the README starts (``optuna-dashboard``, ``tensorboard``) are started, checked
to answer HTTP and stopped. The documented commands are shrunk without being rewritten through
``CLIPLUNG_OVERRIDES`` (:mod:`cliplung.arguments`): a small phantom store, few trials. Each run's
actual output is written to ``$CLIPLUNG_README_OUT`` (default: the scratch directory) as
``transcript.md``, which is what the README's shown outputs are refreshed from.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README_CHECKOUT = "/work/main"
"""The checkout path in the outputs README shows (where they were recorded): like the scratch copy's
and this checkout's own path, it reads as ``<repo>``, so the check holds in a clone anywhere (CI's)."""
README = Path(os.environ.get("CLIPLUNG_README", REPO / "README.md"))
BLOCK_TIMEOUT_S = 20 * 60
SERVERS = ("optuna-dashboard", "tensorboard")
SHRINK = "; ".join(
    [
        "prepare.limit=80",  # ~200 nodules from 80 scans: every fold holds every class
        "tune.trials=2",
    ]
)

pytestmark = [pytest.mark.readme, pytest.mark.timeout(60 * 60)]

NEVER_PRINTED = {
    "Traceback (most recent call last)": "every failure is one clear line (exit 2), never a traceback",
    "Cluster resources are not enough": "a run that fits its cluster never starves its data path",
    "Failed to stop PlacementGroupCleaner": "Ray Train's clean-up reaches the cluster it runs on",
    "Timed out while waiting for GCS": "every Ray process finds the cluster it runs on",
}
"""What the README says no command prints (README "Placement", "A local two-node cluster")."""


@dataclass
class Block:
    lang: str
    text: str
    line: int
    marker: str = ""
    outputs: list[tuple[str, str]] = field(default_factory=list)

    @property
    def skip_reason(self) -> str | None:
        m = re.match(r"skip\s*(.*)", self.marker)
        return (m.group(1).strip(" ()") or "marked skip") if m else None


def parse_readme(text: str) -> list[Block]:
    """Fenced blocks with the ``<!-- readme: ... -->`` marker on the line before each."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        indent, lang = m.group(1), m.group(2)
        j = i + 1
        body = []
        while j < len(lines) and not re.match(rf"^{indent}```\s*$", lines[j]):
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j])
            j += 1
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        marker = ""
        if k >= 0 and (mk := re.match(r"^\s*<!--\s*readme:\s*(.*?)\s*-->\s*$", lines[k])):
            marker = mk.group(1)
        blocks.append(Block(lang=lang, text="\n".join(body), line=i + 1, marker=marker))
        i = j + 1
    return blocks


def normalise(line: str, roots: tuple[str, ...]) -> str:
    for root in roots:
        line = line.replace(root, "<repo>")
    line = re.sub(r"\x1b\[[0-9;]*m", "", line)  # Ray's coloured prefixes
    line = re.sub(r"pid=\d+", "pid=N", line)
    line = re.sub(r"\d+(\.\d+)?(e-?\d+)?", "N", line)
    return " ".join(line.split())


def shown_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("...")]


_PRELUDE = textwrap.dedent(
    """
    set -euo pipefail
    _serve() {
      local name=$1; shift
      local port=""
      local args=("$@")
      for ((i = 0; i < ${#args[@]}; i++)); do
        [[ ${args[$i]} == --port ]] && port=${args[$((i + 1))]}
        [[ ${args[$i]} == --port=* ]] && port=${args[$i]#--port=}
      done
      [[ -n $port ]] || port=6006
      command "$name" "$@" >"$README_SCRATCH/$name.log" 2>&1 &
      local pid=$!
      for _ in $(seq 1 120); do
        if curl -fs -o /dev/null "http://127.0.0.1:$port/"; then
          echo "$name answers on port $port"; kill "$pid"; wait "$pid" 2>/dev/null || true; return 0
        fi
        kill -0 "$pid" 2>/dev/null || { cat "$README_SCRATCH/$name.log"; return 1; }
        sleep 0.5
      done
      kill "$pid"; echo "$name did not answer on port $port"; return 1
    }
    optuna-dashboard() { _serve optuna-dashboard "$@"; }
    tensorboard() { _serve tensorboard "$@"; }
    """
)


def _scratch_copy(dest: Path) -> Path:
    """The tracked files of the checkout (modification times kept, so make sees the set-up done)
    and a link to its virtual environment."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    (dest / ".venv").symlink_to(REPO / ".venv")
    return dest


def _environment(scratch: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "CLIPLUNG_", "PYTEST"))}
    venv_bin = str(scratch / ".venv" / "bin")
    env.update(
        PATH=f"{venv_bin}:{env.get('PATH', '')}",
        VIRTUAL_ENV=str(scratch / ".venv"),
        CLIPLUNG_OVERRIDES=SHRINK,
        README_SCRATCH=str(scratch),
        PYTHONUNBUFFERED="1",
    )
    return env


def _never_printed(line: int, out: str) -> list[str]:
    return [
        f"README line {line}: printed {text!r}, which the README says never happens ({why})"
        for text, why in NEVER_PRINTED.items()
        if text in out
    ]


def _run(script: str, scratch: Path, env: dict[str, str]) -> tuple[int, str]:
    proc = subprocess.run(
        ["bash", "-c", _PRELUDE + "\n" + script],
        cwd=scratch,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=BLOCK_TIMEOUT_S,
    )
    return proc.returncode, proc.stdout


def _missing(expected: str, actual: str, roots: tuple[str, ...]) -> list[str]:
    have = {normalise(line, roots) for line in actual.splitlines()}
    have_text = "\n".join(have)
    return [
        line
        for line in shown_lines(expected)
        if normalise(line, roots) not in have and normalise(line, roots) not in have_text
    ]


def test_readme_parses_and_every_skip_has_a_reason():
    blocks = parse_readme(README.read_text())
    bash = [b for b in blocks if b.lang == "bash"]
    assert bash, "the README shows no command block"
    for block in blocks:
        if block.skip_reason is not None:
            assert block.skip_reason != "marked skip", f"README line {block.line}: skip without a reason"


def _roots(scratch: Path, repo: Path = REPO) -> tuple[str, ...]:
    """The paths that read as ``<repo>`` when output is compared with README."""
    return (str(scratch), str(repo), README_CHECKOUT)


def test_outputs_recorded_in_another_checkout_match_this_one(tmp_path):
    """README's outputs were recorded in ``README_CHECKOUT``; run in a clone elsewhere (CI clones to
    its own path) the same lines must match (they did not: the first clean-clone run failed here)."""
    scratch, clone = tmp_path / "repo", Path("/check/work/main")
    shown = f"  run directory:     {README_CHECKOUT}/runs/quickstart"
    roots = _roots(scratch, clone)
    for printed in (f"{scratch}/runs/quickstart", f"{clone}/runs/quickstart"):
        assert _missing(shown, f"  run directory:     {printed}\n", roots) == []
    assert _missing(shown, "  run directory:     /elsewhere/runs/quickstart\n", roots) == [shown]


def test_every_readme_command_block_runs_as_printed(tmp_path_factory):
    scratch = _scratch_copy(tmp_path_factory.mktemp("readme") / "repo")
    env = _environment(scratch)
    roots = _roots(scratch)
    out_dir = Path(os.environ.get("CLIPLUNG_README_OUT") or scratch)
    transcript: list[str] = []
    failures: list[str] = []
    skipped: list[str] = []
    outputs: list[tuple[str, str]] = []  # (script, output) of every block run so far
    try:
        for block in parse_readme(README.read_text()):
            first = block.text.strip().splitlines()[0] if block.text.strip() else ""
            if block.lang == "bash":
                if block.skip_reason is not None:
                    skipped.append(f"line {block.line} ({first}): {block.skip_reason}")
                    continue
                started = time.monotonic()
                code, out = _run(block.text, scratch, env)
                outputs.append((block.text, out))
                failures += _never_printed(block.line, out)
                transcript += [
                    f"## README line {block.line} (exit {code}, {time.monotonic() - started:.0f} s)",
                    "```",
                    block.text,
                    "```",
                    "```",
                    out,
                    "```",
                ]
                if code != 0:
                    failures.append(
                        f"README line {block.line}: exit {code}\n{block.text}\n--- output ---\n{out[-4000:]}"
                    )
            elif block.text.lstrip().startswith("$ "):
                if block.skip_reason is not None:
                    skipped.append(f"line {block.line} ({first}): {block.skip_reason}")
                    continue
                failures += _check_transcript(block, scratch, env, roots, transcript)
            elif block.marker.startswith("output of "):
                command = block.marker[len("output of ") :].strip()
                ran = [out for script, out in outputs if command in script]
                if not ran:
                    failures.append(f"README line {block.line}: no block ran {command!r} before it")
                    continue
                missing = _missing(block.text, ran[-1], roots)
                if missing:
                    failures.append(f"README line {block.line}: output of {command!r} lacks: {missing}")
    finally:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "transcript.md").write_text("\n".join(transcript) + "\n")
        subprocess.run(
            ["bash", "-c", "cluster/local-cluster.sh down"], cwd=scratch, env=env, capture_output=True
        )
    print("README blocks not run here:\n  " + "\n  ".join(skipped), file=sys.stderr)
    assert not failures, "\n\n".join(failures)


def _check_transcript(block: Block, scratch: Path, env, roots, transcript: list[str]) -> list[str]:
    failures = []
    entries: list[tuple[str, list[str]]] = []
    for line in block.text.splitlines():
        if line.startswith("$ "):
            entries.append((line[2:], []))
        elif entries:
            entries[-1][1].append(line)
    for command, expected in entries:
        started = time.monotonic()
        code, out = _run(command, scratch, env)
        failures += _never_printed(block.line, out)
        took = time.monotonic() - started
        transcript += [
            f"## README line {block.line}: $ {command} (exit {code}, {took:.0f} s)",
            "```",
            out,
            "```",
        ]
        missing = _missing("\n".join(expected), out, roots)
        if missing:
            failures.append(
                f"README line {block.line}: `{command}` printed\n{out[-3000:]}\nwithout: {missing}"
            )
    return failures
