"""The start-up hook and nnUNet_extTrainer registration (unit level and in a fresh interpreter)."""
import os
import subprocess
import sys

from nnunetv2_grcsf import discovery


def test_register_appends_shim_after_user_directories():
    environ = {discovery.EXT_TRAINER_VARIABLE: os.pathsep.join(["/user/a", "/user/b"])}
    assert discovery.register_with_nnunet(environ)
    assert environ[discovery.EXT_TRAINER_VARIABLE].split(os.pathsep) == ["/user/a", "/user/b",
                                                                       discovery.shim_directory()]


def test_register_is_idempotent_and_sets_unset_variable():
    environ = {}
    discovery.register_with_nnunet(environ)
    discovery.register_with_nnunet(environ)
    assert environ[discovery.EXT_TRAINER_VARIABLE] == discovery.shim_directory()


def test_opt_out_leaves_variable_alone():
    environ = {discovery.OPT_OUT_VARIABLE: "1", discovery.EXT_TRAINER_VARIABLE: "/user/a"}
    assert not discovery.register_with_nnunet(environ)
    assert environ[discovery.EXT_TRAINER_VARIABLE] == "/user/a"


def test_shim_directory_is_not_the_package_and_reexports_trainers():
    shim = discovery.shim_directory()
    modules = [f for f in os.listdir(shim) if f.endswith(".py")]
    assert modules == ["nnunetv2_grcsf_trainers.py"]
    assert not os.path.exists(os.path.join(shim, "__init__.py"))
    text = open(os.path.join(shim, modules[0])).read()
    assert "from nnunetv2_grcsf.trainers import *" in text


def _fresh_interpreter_env(**extra):
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), **extra}
    return env


def test_installed_hook_registers_in_a_fresh_interpreter():
    """The .pth installed by pip runs at start-up: nothing but the interpreter is needed."""
    code = "import os; print(os.environ.get('nnUNet_extTrainer'))"
    out = subprocess.run([sys.executable, "-c", code], env=_fresh_interpreter_env(), capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == discovery.shim_directory()
    user = subprocess.run([sys.executable, "-c", code], env=_fresh_interpreter_env(nnUNet_extTrainer="/mine"),
                          capture_output=True, text=True, check=True).stdout.strip()
    assert user.split(os.pathsep) == ["/mine", discovery.shim_directory()]
    opted_out = subprocess.run([sys.executable, "-c", code],
                               env=_fresh_interpreter_env(NNUNETV2_GRCSF_NO_AUTOREGISTER="1"),
                               capture_output=True, text=True, check=True).stdout.strip()
    assert opted_out == "None"
