"""The board's child processes: every action that does work is `python -m lmforge VERB ARGS…` in a child process.

Owns: starting children from an argv list (never a shell string), their logs, the training queue (at most
`max_runs` trainings at once, the others wait in order), graceful stop (SIGINT: `lmforge train` finishes the step and
saves a checkpoint), and the job record a run dir keeps (`ui_job.json`: pid, state, argv) so a restarted board finds
a training it started still running. Must not parse what the children print beyond their exit codes (api.py and
runs.py read the files they write) and must not import the stages it starts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

LMFORGE = (sys.executable, "-m", "lmforge")
JOB_FILE = "ui_job.json"  # in a run dir: the board's record of the training child that writes it
TRAIN_LOG = "train.log"


@dataclass
class Job:
    kind: str  # train, eval, compare, export, serve, inspect, clean, split, chat
    args: list[str]  # after `lmforge`
    log: str  # stdout + stderr (stdout alone goes to <log>.out when capture_stdout)
    run: str | None = None
    meta: dict = field(default_factory=dict)
    capture_stdout: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    state: str = "queued"  # queued → running → (stopping →) done | failed | stopped
    pid: int | None = None
    returncode: int | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None

    @property
    def active(self) -> bool:
        return self.state in ("queued", "running", "stopping")

    def to_dict(self) -> dict:
        return asdict(self)


class Supervisor:
    def __init__(self, workspace: Path, max_runs: int = 1, env: dict | None = None):
        self.workspace = Path(workspace)
        self.max_runs = max(1, int(max_runs))
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1", "TOKENIZERS_PARALLELISM": "false",
                    **(env or {})}
        self.jobs: dict[str, Job] = {}
        self._processes: dict[str, subprocess.Popen] = {}
        self._lock = threading.RLock()
        self._closed = threading.Event()
        self._adopt_trainings()
        self._thread = threading.Thread(target=self._watch, name="lmforge-ui-jobs", daemon=True)
        self._thread.start()

    # --- submitting and stopping ------------------------------------------------------------------------------
    def submit(self, kind: str, args: list[str], log: Path, *, run: str | None = None, meta: dict | None = None,
               capture_stdout: bool = False) -> Job:
        if not all(isinstance(a, str) for a in args):
            raise TypeError("job arguments must be strings")
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        job = Job(kind, list(args), str(log), run, dict(meta or {}), capture_stdout)
        with self._lock:
            self.jobs[job.id] = job
            if kind != "train":
                self._start(job)
            else:
                self._record(job)
                self._start_queued()
        return job

    def stop(self, job_id: str) -> Job:
        """Queued: dropped from the queue. Running: SIGINT (training checkpoints and exits; others stop)."""
        with self._lock:
            job = self.jobs[job_id]
            if job.state == "queued":
                job.state, job.ended = "stopped", time.time()
                self._record(job)
            elif job.state == "running" and job.pid:
                job.state = "stopping"
                _signal(job.pid, signal.SIGINT)
                self._record(job)
            return job

    def terminate(self, job_id: str) -> Job:
        """SIGTERM (a server: it shuts down cleanly)."""
        with self._lock:
            job = self.jobs[job_id]
            if job.state in ("running", "stopping") and job.pid:
                job.state = "stopping"
                _signal(job.pid, signal.SIGTERM)
            elif job.state == "queued":
                job.state = "stopped"
            return job

    def training_of(self, run: str) -> Job | None:
        with self._lock:
            found = [j for j in self.jobs.values() if j.kind == "train" and j.run == run]
            return max(found, key=lambda j: j.created) if found else None

    def queue_position(self, job: Job) -> int | None:
        with self._lock:
            queued = [j.id for j in sorted(self.jobs.values(), key=lambda j: j.created)
                      if j.kind == "train" and j.state == "queued"]
            return queued.index(job.id) + 1 if job.id in queued else None

    def list(self, kind: str | None = None) -> list[Job]:
        with self._lock:
            return sorted((j for j in self.jobs.values() if kind in (None, j.kind)), key=lambda j: j.created)

    def wait(self, job_id: str, timeout: float) -> Job:
        deadline = time.monotonic() + timeout
        while self.jobs[job_id].active and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.jobs[job_id]

    def close(self) -> list[Job]:
        """Stop the watcher and every child except trainings, which keep running (the next board adopts them).
        Returns the trainings still running."""
        self._closed.set()
        self._thread.join(5)
        with self._lock:
            for job in self.jobs.values():
                if job.kind != "train" and job.state in ("running", "stopping") and job.pid:
                    _signal(job.pid, signal.SIGTERM)
            for job_id, process in list(self._processes.items()):
                if self.jobs[job_id].kind != "train":
                    try:
                        process.wait(10)
                    except subprocess.TimeoutExpired:
                        process.kill()
                        process.wait(5)
            return [j for j in self.jobs.values() if j.kind == "train" and j.state in ("running", "stopping")]

    # --- internals ---------------------------------------------------------------------------------------------
    def _start(self, job: Job) -> None:
        log = open(job.log, "ab")  # handed to the child; closed after the fork
        out = open(job.log + ".out", "wb") if job.capture_stdout else log
        try:
            process = subprocess.Popen([*LMFORGE, *job.args], cwd=self.workspace, env=self.env,
                                       stdin=subprocess.DEVNULL, stdout=out, stderr=log,
                                       start_new_session=True)  # a Ctrl-C of the board is not the child's
        finally:
            log.close()
            if out is not log:
                out.close()
        self._processes[job.id] = process
        job.pid, job.state, job.started = process.pid, "running", time.time()
        self._record(job)

    def _start_queued(self) -> None:
        running = sum(1 for j in self.jobs.values() if j.kind == "train" and j.state in ("running", "stopping"))
        for job in sorted(self.jobs.values(), key=lambda j: j.created):
            if running >= self.max_runs:
                break
            if job.kind == "train" and job.state == "queued":
                self._start(job)
                running += 1

    def _watch(self) -> None:
        while not self._closed.wait(0.2):
            with self._lock:
                for job in self.jobs.values():
                    if job.state not in ("running", "stopping"):
                        continue
                    process = self._processes.get(job.id)
                    if process is not None:
                        code = process.poll()
                        if code is None:
                            continue
                    elif _alive(job.pid):
                        continue
                    else:
                        code = None  # adopted from an earlier board: its exit code is not ours to read
                    job.returncode, job.ended = code, time.time()
                    job.state = _final_state(job, code)
                    self._processes.pop(job.id, None)
                    self._record(job)
                self._start_queued()

    def _record(self, job: Job) -> None:
        if job.kind != "train" or not job.run:
            return
        run_dir = self.workspace / "runs" / job.run
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / f".tmp-{JOB_FILE}-{os.getpid()}"
        tmp.write_text(json.dumps(job.to_dict(), indent=2), encoding="utf-8")
        os.replace(tmp, run_dir / JOB_FILE)

    def _adopt_trainings(self) -> None:
        """A board restarted while its trainings ran: their jobs come back (running ones watched by pid, queued
        ones queued again)."""
        runs = self.workspace / "runs"
        if not runs.is_dir():
            return
        for path in sorted(runs.glob(f"*/{JOB_FILE}")):
            try:
                job = Job(**json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError, TypeError):
                continue
            if job.state in ("running", "stopping") and not (_alive(job.pid) and _is_lmforge(job.pid)):
                job.state = "stopped" if job.state == "stopping" else "ended"
            self.jobs[job.id] = job


def _final_state(job: Job, code: int | None) -> str:
    if code == 0:
        return "done"
    if code in (130, -signal.SIGINT, -signal.SIGTERM) or job.state == "stopping":
        return "stopped"
    return "failed" if code is not None else "ended"


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


def _is_lmforge(pid: int) -> bool:
    """The pid is still an `lmforge train` (not an unrelated process that reused the number)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # no /proc: trust the record
    return b"lmforge" in argv and b"train" in argv
