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
        "heavy = [m for m in ('torch', 'transformers', 'triton', 'numpy') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
