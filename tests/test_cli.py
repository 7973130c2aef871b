"""The command-line pieces every tool shares (distill/cli.py)."""

from distill.cli import none_as_null, reports_user_errors


def test_python_none_from_an_agent_becomes_null_and_nothing_else_changes():
    argv = [
        "--config=x.yaml",
        "--data.crop_size=None",
        "--data.cache_dir",
        "None",
        "--model.student={'name': 'unet', 'encoder_weights': None, 'extra': {'depth': [None, 3]}}",
        "--run_name='None'",
        "--model.lr=1e-3",
        "--data.data_root=None_of_these",
        "--text={'a': None",
    ]
    assert none_as_null(argv) == [
        "--config=x.yaml",
        "--data.crop_size=null",
        "--data.cache_dir",
        "null",
        '--model.student={"name": "unet", "encoder_weights": null, "extra": {"depth": [null, 3]}}',
        "--run_name='None'",
        "--model.lr=1e-3",
        "--data.data_root=None_of_these",
        "--text={'a': None",
    ]


def test_a_permission_error_is_reported_in_words_with_the_path(capsys):
    """A read-only runs or cache folder is the user's to fix: no traceback, the path and what to check."""

    @reports_user_errors
    def main() -> int:
        raise PermissionError(13, "Permission denied", "/data/runs/a/config.yaml")

    assert main() == 2
    assert "error: /data/runs/a/config.yaml: permission denied" in capsys.readouterr().err
