"""``python -m benchmarks`` (what ``make bench`` runs) parses its command line: no suite named means
all of them, in order; a wrong name is refused. Nothing is benchmarked here."""
import pytest

from benchmarks.__main__ import SUITES, parse


def test_no_suite_named_runs_every_suite():
    args = parse([])
    assert args.suites == ["techniques", "causal_lm", "llama_lm", "overhead", "allocation",
                           "runtimes", "scale", "methods"] == list(SUITES)
    assert args.only is None


def test_named_suites_and_rows():
    args = parse(["overhead", "techniques", "--only", "original"])
    assert args.suites == ["overhead", "techniques"]
    assert args.only == ["original"]


def test_an_unknown_suite_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        parse(["speed"])
    assert exc.value.code == 2
    assert "invalid choice: 'speed'" in capsys.readouterr().err
