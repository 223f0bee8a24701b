"""The command-line programs and the packaging around them.

`--config` names a file or a built-in config (moejax.config.files), the console scripts of
setup.cfg point at callables, a missing optional extra is one line, and reading a
checkpoint logs no Orbax warning (eval.py printed "Given directory is read only" four
times when its managers were opened with `read_only=True`).
"""
from __future__ import annotations

import configparser
import importlib
import logging
import shutil
import subprocess
import sys
import zipfile

import orbax.checkpoint as ocp
import pytest
from conftest import ROOT, subprocess_env

from moejax.config import (builtin_config_dir, builtin_config_names, config_path,
                           load_config_file)
from moejax.train import checkpoint

# ------------------------------------------------------------------ built-in config names


def test_a_builtin_name_loads_the_file_of_the_configs_folder():
    assert builtin_config_dir() == ROOT / "configs"  # a checkout (or an editable install)
    assert {"tiny", "small", "deepseek_v3", "deepseek_v4"} <= set(builtin_config_names())
    assert "__init__" not in builtin_config_names()
    assert load_config_file("tiny").to_dict() == \
        load_config_file(str(ROOT / "configs/tiny.py")).to_dict()
    assert load_config_file("deepseek_v4:tiny").model.architecture == "deepseek_v4"
    assert config_path("deepseek_v4:flash") == f"{ROOT / 'configs/deepseek_v4.py'}:flash"


def test_an_existing_file_wins_over_a_builtin_name(tmp_path, monkeypatch):
    (tmp_path / "tiny.py").write_text("def get_config():\n    return {'mine': 1}\n")
    monkeypatch.chdir(tmp_path)
    assert config_path("tiny.py") == "tiny.py"
    assert load_config_file("tiny.py") == {"mine": 1}
    assert load_config_file("tiny") != {"mine": 1}  # a bare name is the built-in one


def test_an_unknown_name_lists_the_builtin_configs():
    with pytest.raises(FileNotFoundError, match="does not exist.*tiny"):
        load_config_file("no_such_config")
    assert config_path("some/dir/tiny.py") == "some/dir/tiny.py"  # a path is not a name


def test_train_py_from_another_folder_takes_builtin_names(tmp_path):
    """`--config tiny` (the override is checked against it) and a missing name: exit 1,
    one line, nothing written; run from a folder without configs/."""
    for config, expected in [("tiny", "no field train.nope"),
                             ("nope", "config file 'nope' does not exist")]:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "train.py"), "--config", config, "--workdir",
             str(tmp_path / "run"), "--config.train.nope=1"], cwd=tmp_path,
            env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------- console scripts


def console_scripts() -> dict[str, str]:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    lines = parser["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict(line.replace(" ", "").split("=") for line in lines)


def test_every_console_script_is_a_callable():
    scripts = console_scripts()
    assert {"moejax-train", "moejax-eval", "moejax-plan", "moejax-aot",
            "moejax-hf"} <= set(scripts)
    for name, target in scripts.items():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), name


def test_moejax_hf_without_safetensors_says_which_extra():
    code = ("import sys; sys.modules['safetensors'] = None\n"
            "from moejax.cli.hf import run\nrun()")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "pip install 'moejax[hf]'" in proc.stderr and "Traceback" not in proc.stderr


# ----------------------------------------------------------------- quiet checkpoint reads


def test_reading_a_checkpoint_logs_no_warning(tmp_path, caplog):
    directory = checkpoint.checkpoint_dir(tmp_path)
    with ocp.CheckpointManager(directory) as manager:
        manager.save(3, args=ocp.args.Composite(config=ocp.args.JsonSave({"model": {}})))
    before = sorted(p.name for p in directory.iterdir())
    with caplog.at_level(logging.WARNING):
        assert checkpoint.latest_step(tmp_path) == 3
        assert checkpoint.saved_config(tmp_path, 3) == {"model": {}}
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert sorted(p.name for p in directory.iterdir()) == before  # nothing written


def test_the_wheel_ships_the_configs_the_programs_and_the_licence(tmp_path):
    """What a non-editable `pip install .` installs: built (~3 s, offline, with this
    environment's setuptools) from a copy of the checkout, as the build writes build/ and
    *.egg-info next to setup.py."""
    pytest.importorskip("setuptools")
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", "tests", "bench", "build", "*.egg-info", "__pycache__", "runs"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist"), str(source)], check=True, timeout=600)
    (wheel,) = (tmp_path / "dist").glob("moejax-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
    configs = {f"moejax/configs/{p.name}" for p in (ROOT / "configs").glob("*.py")}
    assert configs <= names and f"{info}/licenses/LICENSE" in names
    assert {"moejax/cli/train.py", "moejax/cli/eval.py", "moejax/cli/hf.py"} <= names
    for name, target in console_scripts().items():
        assert f"{name} = {target}" in entry_points
