"""`python -m sdlora.ui.child JOB_DIR ARG...`: run `python -m sdlora ARG...` and write its exit status to
JOB_DIR/exit_code, so a UI started later still learns how a job it did not start ended.

The UI starts this in a process group of its own (a closed page or a restarted UI leaves the job running); a stop
sends SIGINT to the group: the trainer stops as on Ctrl-C (its checkpoints are written atomically, so the last
complete one stays), and this process waits for it."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from ..storage.atomic import atomic_file

EXIT_FILE = "exit_code"


def main(argv: list[str]) -> int:
    job_dir, args = Path(argv[0]), argv[1:]
    # the group's SIGINT is for the trainer: this process only waits for it (a handler, not SIG_IGN, which the child would inherit)
    signal.signal(signal.SIGINT, lambda *_: None)
    child = subprocess.Popen([sys.executable, "-m", "sdlora", *args], stdin=subprocess.DEVNULL)
    signal.signal(signal.SIGTERM, lambda *_: child.terminate())
    code = child.wait()
    with atomic_file(job_dir / EXIT_FILE) as tmp:
        tmp.write_text(str(code), encoding="utf-8")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
