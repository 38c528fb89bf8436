"""Every input a user can get wrong: one clear line on stderr, a non-zero exit, nothing written."""

import pytest

from svdzip.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["compress", "--out", "{tmp}/o", "--ratio", "1.5"], "strictly between 0 and 1"),
        (["compress", "--out", "{tmp}/o", "--ratio", "0"], "strictly between 0 and 1"),
        (["compress", "--out", "{tmp}/o", "--kept", "1.0"], "strictly between 0 and 1"),
        (["compress", "--out", "{tmp}/o", "--method", "magic"], "unknown method"),
        (["compress", "--out", "{tmp}/o", "--allocator", "magic"], "unknown allocator"),
        (["compress", "--out", "{tmp}/o", "--model", "no-such-model"], "unknown model"),
        (["compress", "--out", "{tmp}/o", "--device", "cuda:7"], "CUDA is not available"),
        (["compress", "--out", "{tmp}/o", "--allocator-option", "novalue"], "key=value"),
        (["info", "{tmp}/missing"], "not a directory"),
        (["info"], "needs a directory"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, capsys, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, err = _run(capsys, *argv)
    assert code == 2
    assert message in err.lower() or message in err
    assert err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_existing_output_directory_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep").write_text("x")
    code, err = _run(capsys, "compress", "--out", str(out))
    assert code == 2 and "already exists" in err
    assert (out / "keep").read_text() == "x"


def test_info_on_a_dense_directory(tmp_path, capsys):
    from tiny_models import save_tiny

    save_tiny(tmp_path / "dense")
    code, err = _run(capsys, "info", str(tmp_path / "dense"))
    assert code == 2 and "dense model directory" in err


def test_info_lists_allocators(capsys):
    assert main(["info", "--allocators"]) == 0
    assert "uniform" in capsys.readouterr().out
