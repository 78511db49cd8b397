"""TensorFlow's import without the start-up lines that look like failures and are not.

Loading TensorFlow 2.16's native library prints three error-level lines on every machine without
a GPU (`E ... cuda_fft.cc ...] Unable to register cuFFT factory: Attempting to register factory
for plugin cuFFT when one has already been registered`, and the same for cuDNN and cuBLAS): two
copies of its CUDA plugins register at load time. `TF_CPP_MIN_LOG_LEVEL=3` would hide them, and
every real error with them. Instead, while the `tensorflow` package itself is first imported, the
process's stderr goes through a filter that drops exactly those lines and passes everything else
on unchanged. Installed by the `digits` command's entry point; a command that never imports
TensorFlow never pays for it.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import os
import re
import subprocess
import sys

# The whole line, as TensorFlow's logger prints it (timestamp, level E, the XLA source, the message).
HARMLESS_STARTUP_LINES = re.compile(
    rb"^\S+ \S+: E external/local_xla/xla/stream_executor/cuda/cuda_(?:fft|dnn|blas)\.cc:\d+\] "
    rb"Unable to register cu(?:FFT|DNN|BLAS) factory: Attempting to register factory for plugin "
    rb"cu(?:FFT|DNN|BLAS) when one has already been registered\r?\n?$")


# The filter runs in a child process of its own: a thread of this process would need the GIL to
# drain the pipe, which the importing thread holds while the native library's initialisers write,
# so more than a pipe's worth of output there would block both for ever; and a child outlives a
# crash of this process, so whatever was written before the crash still reaches the terminal.
_FILTER = """
import re, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the command; this drains until the pipe closes
pattern = re.compile(sys.argv[1].encode("latin-1"))
out = sys.stdout.buffer
for line in sys.stdin.buffer:
    if not pattern.match(line):
        out.write(line)
        out.flush()
"""


@contextlib.contextmanager
def stderr_without(pattern: re.Pattern[bytes]):
    """Lines written to file descriptor 2 (by C++ or Python) that match `pattern` are dropped.

    Everything else reaches the original stderr unchanged and in order. If the filter cannot be
    started, stderr is left as it is (nothing is dropped, nothing is lost).
    """
    sys.stderr.flush()
    original = os.dup(2)
    try:
        child = subprocess.Popen([sys.executable, "-I", "-S", "-c", _FILTER, pattern.pattern.decode("latin-1")],
                                 stdin=subprocess.PIPE, stdout=original, stderr=subprocess.DEVNULL)
    except OSError:
        os.close(original)
        yield
        return
    os.dup2(child.stdin.fileno(), 2)
    child.stdin.close()  # fd 2 is now the pipe's only write end here
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(original, 2)  # the pipe's write end closes: the filter drains it and exits
        os.close(original)
        try:  # so that what comes next is printed after what was filtered
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass  # a process started meanwhile holds the pipe open; the filter serves it until it exits


class _QuietLoader(importlib.abc.Loader):
    """The package's own loader, its `exec_module` run through the filter; afterwards the module
    names its own loader again, so nothing downstream sees this one."""

    def __init__(self, loader: importlib.abc.Loader, finder: "_QuietTensorFlowFinder"):
        self._loader = loader
        self._finder = finder

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._finder.used = True  # once: the first import is the one that loads the native library
        module.__spec__.loader = module.__loader__ = self._loader
        with stderr_without(HARMLESS_STARTUP_LINES):
            self._loader.exec_module(module)


class _QuietTensorFlowFinder(importlib.abc.MetaPathFinder):
    """Finds `tensorflow` as the normal path finder does, and runs its `__init__` through the filter."""

    def __init__(self) -> None:
        self.used = False

    def find_spec(self, name, path=None, target=None):
        # Not only on the first call: a library may look the package up (importlib.util.find_spec)
        # before anything imports it.
        if name != "tensorflow" or self.used:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader, self)
        return spec


def quiet_tensorflow_import() -> None:
    """From now on, the first `import tensorflow` (direct or through TFX, TFT, ...) drops those lines."""
    if "tensorflow" in sys.modules or any(isinstance(f, _QuietTensorFlowFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _QuietTensorFlowFinder())
