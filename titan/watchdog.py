"""Hang watchdog (`training.health.hang_factor`) and the hang injection (`debug.hang_rank` / `hang_step`).

A step hook times each training step (eval, checkpoint saves and the time between steps are not
watched); a background thread checks, a few times a second, whether the step now running has run
`hang_factor` times the median of the recent step times (and at least `min_seconds`, 3 s). The
first step of the process (compilation, allocator warm-up, lazy init) is never part of the median
and never judged; the watch starts once one more step has ended (from step 3 of a fresh run).
When a step overruns, the thread appends every thread's Python stack and the rank's last collectives to
`<run.dir>/hang/rank-<N>.txt` (see :mod:`parallel.flight_recorder`) and prints one line; if the
step then ends after all, a line saying so follows in the file.

A rank stuck for good never raises: its peers give up after `parallel.timeout_s` (exit 3) and
torchrun then sends it SIGTERM, and SIGKILL 30 s later. Python runs signal handlers in the main
thread only, between bytecodes, which a rank blocked in a collective never reaches; so the watchdog
also hears signals (through `signal.set_wakeup_fd`) and, when SIGTERM or Ctrl-C comes while the
step is overdue, ends the process at once (128 + the signal; 130 for Ctrl-C) after noting it in the
hang file, where a C-level `faulthandler` dump registered on SIGTERM while the step was overdue
adds the stacks at that moment. A SIGTERM during a step that runs on time changes nothing here:
the preemption watch saves and stops at the step's end, and no hang file is written. A step
becomes overdue well before the peers' timeout when `hang_factor` x the median step time is below
`parallel.timeout_s`; keep it so, or the hung rank may be killed before it writes its stacks.
"""

from __future__ import annotations

import faulthandler
import os
import select
import signal
import statistics
import sys
import threading
import time
from collections import deque
from typing import Callable

from parallel import flight_recorder
from titan.config import ConfigError, DebugConfig
from titan.errors import INTERRUPT_EXIT

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def check_hang(cfg: DebugConfig, steps: int, world_size: int) -> None:
    """Refuse a hang injection that could never happen in this run."""
    if cfg.hang_rank < -1 or cfg.hang_rank >= world_size:
        raise ConfigError("debug.hang_rank", f"rank {cfg.hang_rank} does not exist in a job of {world_size} ranks.",
                          f"choose a rank below {world_size}, or -1 for none.")
    if cfg.hang_rank >= 0 and not 1 <= cfg.hang_step <= steps:
        raise ConfigError("debug.hang_step", f"step {cfg.hang_step} is outside this run's steps 1..{steps}.",
                          f"choose a step between 1 and training.steps={steps}.")


class HangInjection:
    """Step hook: `debug.hang_rank` stops answering at the start of `debug.hang_step` (sleeps forever)."""

    def __init__(self, cfg: DebugConfig, rank: int):
        self.cfg, self.rank = cfg, rank

    def begin(self, step: int) -> None:
        if self.rank == self.cfg.hang_rank and step == self.cfg.hang_step:
            print(f"debug.hang_rank: rank {self.rank} stops answering at step {step} (sleeps forever)",
                  file=sys.stderr, flush=True)
            injected_hang_sleeps_forever()

    def end(self, step: int) -> None:
        pass


def injected_hang_sleeps_forever() -> None:
    while True:
        time.sleep(3600)


class HangWatchdog:
    """Step hook; also tells the flight recorder which step its collectives belong to."""

    def __init__(self, hang_factor: float, rank: int, min_seconds: float = 3.0, window: int = 64,
                 poll_s: float = 0.25, clock: Callable[[], float] = time.monotonic, watch: bool = True):
        """`watch=False`: no thread (tests call `check` themselves)."""
        self.factor, self.rank, self.min_seconds, self.poll_s, self.clock = hang_factor, rank, min_seconds, poll_s, clock
        self.watch = watch
        self.times: deque[float] = deque(maxlen=window)  # recent step times, the first step of the process excluded
        self.ended = 0  # steps ended in this process
        self.step: int | None = None  # the step running now
        self.started = 0.0
        self.dumped: int | None = None  # the step whose overrun was written to the hang file
        self.stop_signal: int | None = None  # SIGTERM / SIGINT heard during training
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.wakeup: tuple[int, int] | None = None  # pipe the signal wake-up bytes arrive on
        self.previous_wakeup = -1
        self.fault_file = None  # open while a C-level SIGTERM dump is registered

    # ------------------------------------------------------------------ step hook (main thread)

    def begin(self, step: int) -> None:
        flight_recorder.set_step(step, True)
        with self.lock:
            self.step, self.started = step, self.clock()
        if self.factor > 0 and self.watch and self.thread is None:
            self._start()

    def end(self, step: int) -> None:
        flight_recorder.set_step(step, False)
        now = self.clock()
        with self.lock:
            elapsed, was_dumped = now - self.started, self.dumped == step
            self.step, self.dumped = None, None
            self.ended += 1
            if self.ended > 1:
                self.times.append(elapsed)
        if was_dumped:
            self._unregister_fault_dump()
            flight_recorder.write_dump(f"step {step} ended after {elapsed:.1f} s: it was slow, not hung", [],
                                       full=False)

    # ------------------------------------------------------------------ judging (any thread)

    def threshold(self) -> float | None:
        """Seconds a step may run before it is overdue; None before the watch starts."""
        if self.factor <= 0 or not self.times:
            return None
        return max(self.factor * statistics.median(self.times), self.min_seconds)

    def overdue(self, now: float) -> tuple[int, float, float] | None:
        """(step, seconds it has run, threshold) when the step running now is overdue."""
        with self.lock:
            step, started = self.step, self.started
            limit = self.threshold()
        if step is None or limit is None or now - started <= limit:
            return None
        return step, now - started, limit

    def check(self, now: float | None = None) -> bool:
        """Write the hang file the first time the running step is found overdue; True while overdue."""
        now = self.clock() if now is None else now
        with self.lock:
            step, started, limit = self.step, self.started, self.threshold()
            if step is None or limit is None or now - started <= limit:
                return False
            first, self.dumped = self.dumped != step, step
            median = statistics.median(self.times)
        if first:
            running = now - started
            path = flight_recorder.write_dump(
                f"step {step} has run {running:.1f} s, over {limit:.1f} s "
                f"(training.health.hang_factor={self.factor:g} x the median step time {median:.3f} s)",
                ["the step has not ended: this rank is hung, or waits for a peer that is"])
            if path is not None:
                self._register_fault_dump(path)
            print(f"hang watchdog: rank {self.rank}: step {step} has run {running:.1f} s, "
                  f"{running / max(median, 1e-9):.0f}x the median step time ({median:.3f} s); every thread's "
                  f"stack and the last collectives are in {path or '(no run folder)'}", file=sys.stderr, flush=True)
        return True

    # ------------------------------------------------------------------ the thread

    def _start(self) -> None:
        """Called in the main thread (the only one that may set the signal wake-up descriptor)."""
        if threading.current_thread() is threading.main_thread():
            read, write = os.pipe()
            os.set_blocking(read, False)
            os.set_blocking(write, False)
            try:
                self.previous_wakeup = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
                self.wakeup = (read, write)
            except ValueError:
                os.close(read)
                os.close(write)
        self.thread = threading.Thread(target=self._run, name="hang-watchdog", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            if self.wakeup is not None:
                ready, _, _ = select.select([self.wakeup[0]], [], [], self.poll_s)
                if ready:
                    self._heard(os.read(self.wakeup[0], 64))
            else:
                time.sleep(self.poll_s)
            if self.check() and self.stop_signal is not None:
                self._exit_overdue(self.stop_signal)

    def _heard(self, data: bytes) -> None:
        for signum in data:
            if signum in STOP_SIGNALS and self.stop_signal is None:
                self.stop_signal = signum

    def _exit_overdue(self, signum: int) -> None:
        """A stop was asked for while the step is stuck: it will never reach the step end where the
        preemption watch would stop, so stop here."""
        name = signal.Signals(signum).name
        code = INTERRUPT_EXIT if signum == signal.SIGINT else 128 + signum
        flight_recorder.write_dump(f"{name} received while step {self.step} was overdue: this rank exits now ({code})",
                                   [], full=False)
        print(f"hang watchdog: rank {self.rank}: {name} while step {self.step} is overdue (hung): stopping now, "
              f"without saving (exit {code})", file=sys.stderr, flush=True)
        os._exit(code)

    def _register_fault_dump(self, path) -> None:
        """While the step is overdue, a SIGTERM also dumps every thread's stack at the C level (even
        when no Python code can run), then goes on to the Python handler."""
        try:
            self.fault_file = open(path, "a")
            self.fault_file.write(f"(rank {self.rank}: should a SIGTERM come while step {self.step} is overdue, "
                                  "faulthandler's dump of every thread at that moment follows)\n")
            self.fault_file.flush()
            faulthandler.register(signal.SIGTERM, file=self.fault_file, all_threads=True, chain=True)
        except (OSError, RuntimeError, ValueError):
            self.fault_file = None

    def _unregister_fault_dump(self) -> None:
        if self.fault_file is not None:
            faulthandler.unregister(signal.SIGTERM)
            self.fault_file.close()
            self.fault_file = None

    def close(self) -> None:
        """Give the signal wake-up descriptor back (the daemon thread ends with the process)."""
        if self.wakeup is not None and threading.current_thread() is threading.main_thread():
            signal.set_wakeup_fd(self.previous_wakeup)
        self._unregister_fault_dump()
