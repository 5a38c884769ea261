"""Faults at any moment: the whole job (every process) is SIGKILLed inside phase 1, during the
conversion at the switch, inside phase 2 and during a checkpoint write; after each kill the same
launcher command resumes, and the run ends bit-identical to an uninterrupted one (the loss at every
logged step, the validation losses, the final weights), with no duplicate or partial metrics records."""

import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
import torch

from tests.test_pretrain import args

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SEED = 20261122  # the kill delays are drawn from this: the same "random" points on every run


def command(corpus, save):
    # switch at iteration 6 of 24; checkpoints every 2 steps, so every kill loses at most 2 steps
    return [sys.executable, "-m", "megatron_tst.launch", *args(corpus, save, "--save-interval", "2")]


class Job:
    """The launcher in its own session, its output read line by line in a thread."""

    def __init__(self, argv):
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        self.lines, self.seen, self.drained = queue.Queue(), [], False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def poll_output(self):
        """New output lines; False once the job has ended and its output is drained (and on every
        call after that)."""
        while not self.drained:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                return True
            if line is None:
                self.drained = True
                break
            self.seen.append(line)
        return False

    def kill_everything(self):
        """SIGKILL the launcher and every process it started, wherever their session (torchrun puts
        its workers in their own), as a node failure would."""
        try:
            processes = [psutil.Process(self.process.pid)]
            processes += processes[0].children(recursive=True)
        except psutil.NoSuchProcess:
            processes = []
        for process in processes:
            try:
                process.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        self.process.wait(timeout=60)
        psutil.wait_procs(processes, timeout=30)
        assert not [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    def finish(self, timeout=600):
        self.process.wait(timeout=timeout)
        while self.poll_output():
            time.sleep(0.01)
        return self.process.returncode


def run_until(argv, trigger, delay, timeout=600):
    """Start the job, wait for ``trigger(output, job)``, sleep ``delay`` and kill it all. Returns
    whether the trigger fired (False: the job ended first)."""
    job = Job(argv)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = job.poll_output()
        if trigger("".join(job.seen)):
            time.sleep(delay)
            job.kill_everything()
            return True
        if not alive:
            job.finish()
            return False
        time.sleep(0.001)
    job.kill_everything()
    raise TimeoutError(f"the trigger never fired: {''.join(job.seen)[-2000:]}")


def exists(path):
    return lambda output: os.path.exists(path)


def logged(iteration):
    return lambda output: f" iteration {iteration:8d} |" in output


def metrics(save):
    rows = []
    for phase in ("superposition", "recovery"):
        with open(os.path.join(save, phase, "metrics.jsonl")) as handle:
            text = handle.read()
        assert text.endswith("\n")
        rows += [json.loads(line) for line in text.splitlines()]
    return [r for r in rows if "loss" in r], [r for r in rows if "validation_loss" in r]


def final_weights(save, tmp_path, name):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = str(tmp_path / f"{name}.pt")
    dcp_to_torch_save(os.path.join(save, "recovery", "iter_0000024"), path)
    return torch.load(path, weights_only=False)


def test_killed_at_any_moment_and_resumed_is_bit_identical(corpus, tmp_path, launched_tst_run):
    # the reference: the same launcher command, uninterrupted and without periodic checkpoints
    reference, interrupted = launched_tst_run, str(tmp_path / "interrupted")

    rng = random.Random(SEED)
    phase1, phase2 = os.path.join(interrupted, "superposition"), os.path.join(interrupted, "recovery")
    # one kill in each distinct region: phase 1, the switch (conversion), phase 2, a checkpoint write
    # (in phase 2: the converted model's checkpoint, after a resume across the switch)
    kills = [  # (where, trigger, delay after it)
        ("inside phase 1", logged(3), rng.uniform(0.0, 0.05)),
        ("during the conversion", exists(os.path.join(phase2)), 0.0),
        ("inside phase 2", logged(15), rng.uniform(0.0, 0.05)),
        ("during a phase-2 checkpoint write", exists(os.path.join(phase2, "iter_0000018.tmp")), rng.uniform(0, 0.1)),
    ]
    for where, trigger, delay in kills:
        assert run_until(command(corpus, interrupted), trigger, delay), f"the job ended before the kill {where}"
    job = Job(command(corpus, interrupted))
    assert job.finish() == 0, "".join(job.seen)

    steps, valid = metrics(interrupted)
    reference_steps, reference_valid = metrics(reference)
    assert [r["iteration"] for r in steps] == list(range(1, 25))  # each step once: no duplicates
    assert [r["loss"] for r in steps] == [r["loss"] for r in reference_steps]
    assert [r["lr"] for r in steps] == [r["lr"] for r in reference_steps]
    assert [(r["iteration"], r["validation_loss"]) for r in valid] == \
        [(r["iteration"], r["validation_loss"]) for r in reference_valid]
    weights, reference_weights = final_weights(interrupted, tmp_path, "a"), final_weights(reference, tmp_path, "b")
    assert weights.keys() == reference_weights.keys()
    for key, value in reference_weights.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(weights[key], value), key
    for folder in (phase1, phase2):
        assert not [name for name in os.listdir(folder) if name.endswith(".tmp")], os.listdir(folder)


@pytest.mark.parametrize("killed", ["launcher", "torchrun"])
def test_a_job_whose_launcher_or_torchrun_dies_saves_and_stops(corpus, tmp_path, killed):
    """The launcher's job gets SIGTERM when the launcher dies (PR_SET_PDEATHSIG); torchrun's workers,
    in their own sessions, watch torchrun. Either way the ranks save and stop instead of training
    on unattended."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    save = str(tmp_path / "run")
    nproc = 1 if killed == "launcher" else 2
    job = Job([sys.executable, "-m", "megatron_tst.launch", "--nproc-per-node", str(nproc), "--master-port", str(port),
               *args(corpus, save, "--allow-data-repetition", iters=200000, tst=False)])
    deadline = time.monotonic() + 300
    while not any(" iteration " in line and "| loss" in line for line in job.seen):
        assert job.poll_output() and time.monotonic() < deadline, "".join(job.seen)
        time.sleep(0.01)
    launcher = psutil.Process(job.process.pid)
    descendants = launcher.children(recursive=True)
    victim = launcher if killed == "launcher" else launcher.children()[0]  # torchrun
    victim.send_signal(signal.SIGKILL)
    # a step takes well under a second here: a rank that is still alive after a minute trains on
    gone, alive = psutil.wait_procs([p for p in descendants if p.pid != victim.pid], timeout=60)
    for process in alive:  # a failed test leaves nothing training behind
        process.kill()
    assert not alive, "".join(job.seen)
    if killed == "torchrun":
        job.finish(timeout=60)
    tracker = os.path.join(save, "latest_checkpointed_iteration.txt")
    assert os.path.isfile(tracker), "".join(job.seen)
    assert int(open(tracker).read()) >= 1 and not [n for n in os.listdir(save) if n.endswith(".tmp")]


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_to_every_process_of_the_job_saves_and_stops(corpus, tmp_path, nproc):
    """A scheduler's stop (SLURM's scancel or preemption, Kubernetes) sends SIGTERM to every process
    of the job at once, helpers included. megatron-core's checkpoint writer serves its results from a
    helper process, and a killed helper made the save that the signal asked for fail (broken pipe):
    the run then lost everything since the last periodic checkpoint. The job must save where it
    stands, stop, and leave no process behind."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    save = str(tmp_path / "run")
    # a periodic checkpoint at 2 starts the writer's helper; the signal's checkpoint comes later
    job = Job([sys.executable, "-m", "megatron_tst.launch", "--nproc-per-node", str(nproc), "--master-port", str(port),
               *args(corpus, save, "--allow-data-repetition", "--save-interval", "2", iters=200000, tst=False)])
    deadline = time.monotonic() + 300
    while not any(" iteration        5 |" in line for line in job.seen):
        assert job.poll_output() and time.monotonic() < deadline, "".join(job.seen)
        time.sleep(0.01)
    launcher = psutil.Process(job.process.pid)
    everything = [launcher, *launcher.children(recursive=True)]
    assert len(everything) >= 2 + nproc  # launcher, job or torchrun + workers, the writer's helper(s)
    for process in everything:
        try:
            process.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    job.finish(timeout=180)
    gone, alive = psutil.wait_procs(everything, timeout=60)
    for process in alive:
        process.kill()
    assert not alive, "".join(job.seen)
    saved = int(open(os.path.join(save, "latest_checkpointed_iteration.txt")).read())
    logged_steps = [int(line.split("|")[0].split()[-1]) for line in job.seen if line.startswith(" iteration ")]
    assert saved == max(logged_steps) >= 5, "".join(job.seen[-30:])  # where it stood, not the last periodic one
    assert not [n for n in os.listdir(save) if n.endswith(".tmp")]
