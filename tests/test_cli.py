"""The fp8compile command line, in process (main(argv)) and as the installed script."""

import json
import shutil
import subprocess
import sys

import pytest

from fp8compile import cli

FACTORY = "tests/cli_factory.py:build"


@pytest.fixture(autouse=True)
def _factory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "cli_factory.py").write_text(
        "import torch\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    m = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(),\n"
        "                            torch.nn.Linear(512, 256), torch.nn.LayerNorm(256))\n"
        "    return m, (torch.randn(4, 256),)\n"
        "def kw():\n"
        "    m, (x,) = build()\n"
        "    return m, (), {'input': x}\n"
    )


@pytest.mark.parametrize("cmd", ["plan", "calibrate", "export"])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([cmd, "--help"])
    assert e.value.code == 0
    assert "MODULE:FACTORY" in capsys.readouterr().out


def test_plan_prints_the_table_and_writes_json(capsys, tmp_path):
    assert cli.main(["plan", FACTORY, "--json", "plan.json"]) == 0
    out = capsys.readouterr().out
    assert "2 GEMMs: 2 fp8" in out
    data = json.loads((tmp_path / "plan.json").read_text())
    assert [e["precision"] for e in data["entries"] if e["gemm"]] == ["fp8", "fp8"]


def test_plan_with_policy_and_recipe(capsys, tmp_path):
    (tmp_path / "policy.json").write_text(json.dumps({"overrides": {"0": "bf16"}}))
    assert cli.main(["plan", FACTORY, "--config", "policy.json", "--recipe", "rowwise"]) == 0
    out = capsys.readouterr().out
    assert "override '0' -> bf16" in out and "fp8 (rowwise)" in out


def test_kwargs_factory(capsys):
    assert cli.main(["plan", "tests/cli_factory.py:kw"]) == 0
    assert "2 GEMMs" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["plan", "nocolon"], "not MODULE:FACTORY"),
        (["plan", "tests/missing.py:build"], "no such file"),
        (["plan", "tests/cli_factory.py:nope"], "no callable 'nope'"),
        (["plan", "no_such_module_xyz:build"], "cannot import"),
    ],
)
def test_bad_model_spec_exits_2_with_a_message(argv, msg, capsys):
    assert cli.main(argv) == 2
    assert msg in capsys.readouterr().err


def test_bad_policy_value_is_named(tmp_path, capsys):
    (tmp_path / "bad.json").write_text(json.dumps({"recipe": "nope"}))
    assert cli.main(["plan", FACTORY, "--config", "bad.json"]) == 2
    assert "recipe='nope'" in capsys.readouterr().err


def test_console_script_is_installed():
    exe = shutil.which("fp8compile")
    assert exe, "pip install -e . puts the fp8compile script on PATH"
    out = subprocess.run([exe, "plan", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--html" in out.stdout
    out = subprocess.run([sys.executable, "-m", "fp8compile.cli", "plan", "x"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "not MODULE:FACTORY" in out.stderr
