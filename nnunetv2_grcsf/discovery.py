"""How `nnUNetv2_train` and `nnUNetv2_predict` find our trainers with nothing but `pip install`.

nnU-Net v2 (2.8) looks a trainer up by class name in its own trainer tree, then in each directory
listed in the environment variable ``nnUNet_extTrainer`` (``os.pathsep``-separated, read at lookup
time). Each such directory is put on ``sys.path``, every module in it is imported under a top-level
name, and those modules are dropped from ``sys.modules`` afterwards. So we ship a *shim directory*,
``nnunetv2_grcsf/nnunet_trainer_shim/``, holding one module that re-exports our trainers from
:mod:`nnunetv2_grcsf.trainers`; our package directory itself is never given to nnU-Net.

The installed file ``nnunetv2_grcsf-autoregister.pth`` (in site-packages) calls
:func:`register_with_nnunet` at interpreter start-up. It only *appends* the shim directory to
``nnUNet_extTrainer``: directories a user set there keep their place and are searched first.
It imports nothing but ``os``. Switch it off with ``NNUNETV2_GRCSF_NO_AUTOREGISTER=1`` (then set
``nnUNet_extTrainer`` yourself, see :func:`shim_directory`), or remove it with ``pip uninstall``.
"""

import os

EXT_TRAINER_VARIABLE = "nnUNet_extTrainer"
OPT_OUT_VARIABLE = "NNUNETV2_GRCSF_NO_AUTOREGISTER"
HOOK_FILE_NAME = "nnunetv2_grcsf-autoregister.pth"


def shim_directory() -> str:
    """The directory to list in ``nnUNet_extTrainer`` so that nnU-Net finds our trainers."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "nnunet_trainer_shim")


def ext_trainer_directories(environ=os.environ) -> list:
    """The directories currently listed in ``nnUNet_extTrainer`` (empty entries dropped)."""
    return [p for p in environ.get(EXT_TRAINER_VARIABLE, "").split(os.pathsep) if p.strip()]


def is_registered(environ=os.environ) -> bool:
    """Whether the shim directory is listed in ``nnUNet_extTrainer``."""
    shim = os.path.realpath(shim_directory())
    return any(os.path.realpath(p) == shim for p in ext_trainer_directories(environ))


def register_with_nnunet(environ=os.environ) -> bool:
    """Append the shim directory to ``nnUNet_extTrainer`` unless it is there or the user opted out.

    Returns whether the shim directory is registered afterwards.
    """
    if environ.get(OPT_OUT_VARIABLE, "").strip().lower() in ("1", "true", "yes"):
        return is_registered(environ)
    if not is_registered(environ):
        environ[EXT_TRAINER_VARIABLE] = os.pathsep.join(ext_trainer_directories(environ) + [shim_directory()])
    return True
