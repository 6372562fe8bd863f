from __future__ import annotations

import pytest

from dsl.engine.errors import UserError
from dsl.launcher.envfile import parse_env_file


def test_dotenv_forms():
    text = ("# comment\n\nA=1\nexport B = two words  # trailing\nC='lit $HOME \\n'\n"
            'D="x\\ty \\"q\\"" # c\nE=\n')
    assert parse_env_file(text, "f.env") == {
        "A": "1", "B": "two words", "C": "lit $HOME \\n", "D": 'x\ty "q"', "E": ""}


@pytest.mark.parametrize("line, what", [
    ("NOEQUALS", "expected NAME=value"), ("1A=x", "expected NAME=value"),
    ("A='open", "unterminated single quote"), ('A="open', "unterminated double quote"),
    ("A='x' junk", "unexpected text after the closing quote"),
])
def test_errors_name_file_and_line(line, what):
    with pytest.raises(UserError, match=rf"^f.env:2: {what}"):
        parse_env_file(f"OK=1\n{line}\n", "f.env")
