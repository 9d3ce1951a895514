"""Process-level settings the heavy verbs share: torch's thread count, the cycle collector, transformers' progress
bars, usable CPUs, peak RSS.

torch and transformers are imported only inside the helpers that need them, so that the CLI can use the rest
before torch is loaded.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import logging
import os
import sys
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` for the block, restored after.

    The setting is process-wide: other torch work in this process sees it meanwhile. Threads started inside take
    it on their first parallel op.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Python's cycle collector paused for the block; reference counting still frees everything.

    For code that makes many objects and no cycles (imports, a streaming loop), where collections would only walk
    the objects torch created at import, again and again.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextlib.contextmanager
def hf_progress(enabled: bool) -> Iterator[None]:
    """transformers' loading progress bars on or off for the duration (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled and not enabled:
            hf_logging.enable_progress_bar()


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask on Linux)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def peak_rss_bytes() -> int | None:
    """This process's peak resident set size so far, in bytes (None where the OS does not say).

    Linux: ``VmHWM`` of /proc/self/status, the peak of this program's own address space. ``ru_maxrss`` would
    also count the parent's memory: a child created by fork or vfork inherits its high-water mark through exec.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak_rss() -> bool:
    """Start :func:`peak_rss_bytes` afresh from the current RSS (Linux ≥ 4.0: ``5`` written to
    /proc/self/clear_refs resets ``VmHWM``), so that a peak can be measured per stage of one process.

    Returns:
        whether the peak was reset (False elsewhere: the peak is then the process's so far).
    """
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")
    except OSError:
        return False
    return True


@contextlib.contextmanager
def env_defaults(values: dict[str, str]) -> Iterator[None]:
    """Set each of ``values`` that the environment does not set yet; on exit, remove exactly those again.

    A library call that configures a third-party runtime through its environment (vLLM reads ``VLLM_*`` when an
    engine starts) leaves ``os.environ`` as it found it; a value the user set is never touched.
    """
    added = [name for name in values if name not in os.environ]
    os.environ.update({name: values[name] for name in added})
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


@contextlib.contextmanager
def stderr_to(path: str | os.PathLike) -> Iterator[None]:
    """Send everything this process writes to stderr (file descriptor 2: Python, C extensions, child processes) to
    ``path`` (appended), and restore the terminal's stderr on exit. stdout is untouched."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(path, "ab") as log:
            os.dup2(log.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def quiet_third_party(enabled: bool):
    """While a quiet command runs, silence what libraries print besides our errors: Python warnings (PEFT's, torch's)
    and transformers' logging, which has its own level and handler, read from TRANSFORMERS_VERBOSITY when it is
    first imported. Everything is restored afterwards (``main`` may run in a longer-lived process)."""
    if not enabled:
        yield
        return
    had_env = os.environ.get("TRANSFORMERS_VERBOSITY")
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    was_imported = "transformers" in sys.modules
    before = sys.modules["transformers"].logging.get_verbosity() if was_imported else logging.WARNING
    if was_imported:
        sys.modules["transformers"].logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if had_env is None:
            del os.environ["TRANSFORMERS_VERBOSITY"]
        else:
            os.environ["TRANSFORMERS_VERBOSITY"] = had_env
        if "transformers" in sys.modules:
            sys.modules["transformers"].logging.set_verbosity(before)


def import_deepspeed_logging_to_stderr(*, quiet: bool) -> None:
    """Import DeepSpeed, when it is installed and not imported yet, with its log on stderr (none of its import-time
    warnings when ``quiet``).

    accelerate imports it whenever it is installed (the HF Trainer unwraps every model through
    ``extract_model_from_parallel``), and DeepSpeed's logger writes to stdout: on a machine without CUDA its
    import warns "Setting accelerator to CPU", which broke the JSON that ``train --json`` prints on stdout. Its
    handler takes ``sys.stdout`` as it is at import, so the import runs with stdout sent elsewhere; the handler is
    then pointed at stderr, where its later warnings and errors belong.
    """
    if "deepspeed" in sys.modules or importlib.util.find_spec("deepspeed") is None:
        return
    with open(os.devnull, "w") as devnull:
        with contextlib.redirect_stdout(devnull if quiet else sys.stderr):
            try:
                import deepspeed  # noqa: F401
            except Exception:  # a broken install: accelerate's own import reports it
                return
        for handler in logging.getLogger("DeepSpeed").handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is devnull:
                handler.setStream(sys.stderr)


@contextlib.contextmanager
def deferred_log_records(logger_name: str) -> Iterator[None]:
    """Hold back what logger ``logger_name`` and its children log during the block; when it ends, replay each
    distinct message once. bitsandbytes warns once per process about a kernel package on CPU and again on every
    8-bit matmul: the user then reads each warning once, after the command's own output. The logger is restored.
    """
    logger = logging.getLogger(logger_name)
    held: dict[tuple, logging.LogRecord] = {}

    class Hold(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            held.setdefault((record.name, record.levelno, record.getMessage()), record)

    handler, propagate = Hold(), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
        for record in held.values():
            replay = logging.getLogger(record.name)
            if replay.isEnabledFor(record.levelno):  # the level may have been set (-q) after it was logged
                replay.handle(record)


def import_torch(*, one_thread: bool = False) -> None:
    """Import torch with Python's cycle collector paused, then freeze what the import made.

    torch's import creates some 10⁶ objects and no garbage: collections during it cost ~0.15 s of its ~1.3 s, and
    every later full collection would walk those objects again (measured on 2 cores).

    ``one_thread``: use one torch thread unless OMP_NUM_THREADS says otherwise. Conversion and inspection are
    memory-bound passes over many small tensors: one thread is as fast on an idle machine, and OpenMP's thread
    hand-offs made them 10-20× slower on a busy one.

    Only the call that imports torch freezes: a later one (``main`` run again in one process) would also freeze
    what the commands since have made, and objects never collected are still alive when the interpreter exits,
    where extension modules report them (triton's nanobind "leaked N instances" once bitsandbytes loaded it).
    """
    first = "torch" not in sys.modules
    with paused_gc():
        import torch
    if first:
        gc.freeze()  # objects alive now are never collected: later collections skip them
    if one_thread and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
