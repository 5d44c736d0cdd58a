import subprocess
import sys

import lightning


def test_all_is_sorted_public_names():
    import types

    public = sorted(
        n
        for n, v in vars(lightning).items()
        if not n.startswith("_") and not isinstance(v, types.ModuleType)  # submodules
    )
    assert lightning.__all__ == public


def test_public_objects_live_in_lightning():
    for name in lightning.__all__:
        obj = getattr(lightning, name)
        if hasattr(obj, "__module__"):
            assert obj.__module__ == "lightning", name


def test_import_is_light():
    code = (
        "import sys, lightning, lightning.testing\n"
        "heavy = ('torch', 'transformers', 'triton', 'numpy', 'opentelemetry')\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in heavy]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_rollouts_and_lightning_otel_do_not_import_opentelemetry():
    # Span export costs nothing until the app itself imports opentelemetry; the OTLP
    # receiver (lightning.otel) decodes JSON without it.
    code = (
        "import sys, lightning, lightning.otel\n"
        "@lightning.rollout\n"
        "def f():\n"
        "    with lightning.span('s'):\n"
        "        lightning.emit_reward(1.0)\n"
        "    return 1\n"
        "f()\n"
        "loaded = [m for m in sys.modules if m.startswith('opentelemetry')]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_import_lightning_without_fcntl():
    """Where fcntl does not exist (Windows), lightning imports and spill-dir locking
    reports that it cannot lock (so no live process's spill log is ever adopted)."""
    code = (
        "import os, sys, tempfile\n"
        "sys.modules['fcntl'] = None\n"
        "import lightning\n"
        "from lightning import _runtime\n"
        "assert _runtime._fcntl is None\n"
        "fd = os.open(os.path.join(tempfile.mkdtemp(), 'lock'), os.O_CREAT | os.O_RDWR)\n"
        "assert _runtime._try_lock(fd) is (_runtime._msvcrt is not None)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
