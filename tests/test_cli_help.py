"""What the CLI says beyond its work (issue 18): examples, version, the extra a command needs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from clinbundle import __version__, cli_help
from clinbundle.cli import build_parser, main


def test_every_command_help_has_a_runnable_looking_example() -> None:
    tree = cli_help.subparsers(build_parser())
    assert len(tree) >= 15  # the root, groups and commands (a walk that found nothing fails)
    for path, parser in tree:
        text = parser.format_help()
        assert "example:\n  clinbundle " + " ".join(path) in text, (path, text[-300:])


def test_version_names_clinbundle_and_its_libraries(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"clinbundle {__version__} (python 3.") and "monai 1.6" in out, out


@pytest.mark.parametrize(
    ("argv", "blocked", "extra"),
    [
        (["serve", "x.bento"], "bentoml", "serve"),
        (["run-map", "map", "-i", "in", "-o", "out"], "holoscan_cli", "map"),
        (["demo", "--bundle", "b"], "gradio", "demo"),
        (["quickstart", "--package"], "holoscan_cli", "map"),  # before training starts
    ],
)
def test_a_missing_extra_is_named_with_exit_2_before_any_work(
    monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path, argv, blocked, extra
) -> None:
    """A module set to None in sys.modules is how Python reports it not installed."""
    monkeypatch.setitem(sys.modules, blocked, None)
    assert main([*argv, "--workdir", str(tmp_path)] if argv[0] != "run-map" else argv) == 2
    err = capsys.readouterr().err
    assert f"pip install 'clinbundle[{extra}]'" in err and blocked in err, err
    assert "Traceback" not in err and not any(tmp_path.iterdir())


def test_an_extra_missing_deeper_down_is_named_too(monkeypatch, capsys, tmp_path: Path) -> None:
    """Without the up-front check, the import error on the way is turned into the same advice."""
    monkeypatch.setattr(cli_help, "NEEDS", {})
    monkeypatch.setitem(sys.modules, "bentoml", None)
    (tmp_path / "x.bento").write_bytes(b"")
    assert main(["serve", str(tmp_path / "x.bento"), "--workdir", str(tmp_path)]) == 2
    assert "pip install 'clinbundle[serve]'" in capsys.readouterr().err
