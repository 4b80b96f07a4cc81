"""PEP 517 build backend: setuptools, plus nnU-Net's start-up hook at the root of every wheel.

Everything declarative lives in setup.cfg. The only thing setuptools cannot do from there is put
`nnunetv2_grcsf-autoregister.pth` at the top of site-packages (where Python's `site` module runs
it) for both `pip install .` and `pip install -e .` (editable wheels drop `data_files`). So this
backend lets setuptools build the wheel, then rewrites it with the hook file added; the wheel's
RECORD is regenerated with the file's hash, so `pip uninstall` removes the hook too.
See nnunetv2_grcsf/discovery.py for what the hook does and how to switch it off.
"""
import tempfile
from pathlib import Path

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (the other PEP 517 hooks, unchanged)

HOOK_FILE = Path(__file__).resolve().parent.parent / "nnunetv2_grcsf-autoregister.pth"


def _add_hook(wheel_path: Path) -> None:
    from wheel.wheelfile import WheelFile

    with tempfile.TemporaryDirectory() as tmp:
        rewritten = Path(tmp, wheel_path.name)
        with WheelFile(wheel_path) as source, WheelFile(rewritten, "w") as target:
            for info in source.infolist():
                if not info.filename.endswith(".dist-info/RECORD"):
                    target.writestr(info, source.read(info))
            target.write(HOOK_FILE, HOOK_FILE.name)
        rewritten.replace(wheel_path)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    name = _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)
    _add_hook(Path(wheel_directory, name))
    return name


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    name = _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)
    _add_hook(Path(wheel_directory, name))
    return name
