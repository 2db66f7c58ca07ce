"""``import oscar_compile`` prints nothing, and the filter behind that drops only torchao's known noise."""

import enum
import logging
import subprocess
import sys

from oscar_compile.quiet_import import _PYTREE_FILTER


def test_import_prints_nothing():
    # a fresh process: torchao's import-time log lines (CUDA extensions missing, Enum constants) are dropped
    done = subprocess.run([sys.executable, "-c", "import oscar_compile, oscar_compile.kv_tensor"], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == "", (done.stdout, done.stderr)


def _record(cls):
    msg = "%s is an Enum subclass and is now natively supported ... register_constant() on Enum subclasses is deprecated"
    return logging.LogRecord("torch.utils._pytree", logging.WARNING, __file__, 1, msg, (cls,), None)


def test_filter_drops_only_torchao_enum_warnings():
    class Mine(enum.Enum):
        A = 1

    class Theirs(enum.Enum):
        A = 1

    Theirs.__module__ = "torchao.prototype.mx_formats.config"
    assert _PYTREE_FILTER.filter(_record(Mine)) is True  # the user's own Enum: still logged
    assert _PYTREE_FILTER.filter(_record(Theirs)) is False
    other = logging.LogRecord("torch.utils._pytree", logging.WARNING, __file__, 1, "something else %s", (Theirs,), None)
    assert _PYTREE_FILTER.filter(other) is True
