"""The README says what the code does: its tables name every close code, setting and make target."""

import re

from pingpong import protocol
from tests.processes import ROOT

README = (ROOT / "README.md").read_text()
SETTINGS_SOURCE = (ROOT / "project" / "settings.py").read_text()
MAKEFILE = (ROOT / "Makefile").read_text()


def test_every_close_code_constant_is_in_the_close_code_table():
    codes = [int(code) for code in protocol.CloseCode]
    for code in codes:
        assert re.search(rf"^\| {code} \|", README, re.MULTILINE), f"close code {code} is not in the README table"


def test_every_environment_setting_is_in_the_settings_table():
    names = set(re.findall(r'env_(?:str|int|bool|float|list)\("([A-Z_]+)"', SETTINGS_SOURCE))
    assert names
    for name in names:
        assert f"| `{name}` |" in README, f"{name} is read by settings.py but not documented"


def test_the_two_commands_and_test_fast_are_make_targets():
    for target in ("run", "test", "test-fast"):
        assert f"make {target}" in README
        assert re.search(rf"^{target}:", MAKEFILE, re.MULTILINE)


def test_the_ci_script_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_the_module_table_names_every_module_of_the_app_and_nothing_else():
    """A reader finds each module the README's table lists, and the table lists each one there is."""
    listed = set(re.findall(r"^\| `pingpong/(\w+)\.py` \|", README, re.MULTILINE))
    present = {path.stem for path in (ROOT / "pingpong").glob("*.py")} - {"__init__", "apps"}
    assert listed == present
