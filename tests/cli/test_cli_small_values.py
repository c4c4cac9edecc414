"""Small command-line behaviours found by a new user's trial of the privacy options."""

from __future__ import annotations

import pytest

from fedstack.cli.main import main
from fedstack.cli.output import short


def test_small_floats_keep_their_digits() -> None:
    assert short(7.6e-06) == "7.6e-06"
    assert short(1e-05) == "1e-05"
    assert short(0.0) == "0.0000"
    assert short(0.93554) == "0.9355"
    assert short(-2.5e-4) == "-0.00025"


def test_an_unknown_trainer_argument_is_one_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "agent",
            "--name",
            "x",
            "--trainer",
            "fedstack.trainers.digits:DigitsLinearTrainer",
            "--trainer-arg",
            "dp_noise=1.0",
            "--url",
            "ws://127.0.0.1:9",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "refused its arguments" in err and "dp_noise" in err and "--trainer-arg" in err
    assert "Traceback" not in err
