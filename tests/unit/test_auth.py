"""The tokens file: validated line by line at startup (a bad line names the line, never the token), and
re-read when it changes."""

from __future__ import annotations

import os

import pytest

from patchscope.serve import auth as auth_module
from patchscope.serve.auth import TokenCheck
from patchscope.serve.config import Auth
from patchscope.serve.status import PermissionDenied, Unauthenticated


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        # Was an unrestricted key whose token is the method list itself.
        ("ListModels,ExplainActivations", "starts with method names"),
        ("ExplainActivations", "starts with method names"),
        ("prod-secret-1 Explain,Nope", "unknown method Nope"),
        ("prod-secret-1 Explain ListModels", "3 fields"),
        ("short", "at least 8"),
        ("alpha-secret-1", "repeats the token of an earlier line"),
    ],
)
def test_a_bad_line_is_a_startup_error_naming_the_line_not_the_token(tmp_path, line, problem):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# keys\nalpha-secret-1\n\n{line}\n")
    with pytest.raises(ValueError, match=problem) as error:
        TokenCheck.from_config(Auth(tokens_file=str(tokens)))
    assert f"{tokens} line 4" in str(error.value)
    assert "secret" not in str(error.value)


def test_the_tokens_file_is_re_read_when_it_changes(tmp_path, monkeypatch):
    monkeypatch.setattr(auth_module, "RECHECK_S", 0.0)
    tokens = tmp_path / "tokens"
    tokens.write_text("alpha-secret-1\n")
    check = TokenCheck.from_config(Auth(tokens_file=str(tokens)))
    assert check.check(bearer("alpha-secret-1"), "Explain")
    tokens.write_text("beta-secret-22 ListModels\n")
    os.utime(tokens, ns=(1, 1))  # a different time whatever the file system's resolution
    with pytest.raises(Unauthenticated):
        check.check(bearer("alpha-secret-1"), "Explain")
    assert check.check(bearer("beta-secret-22"), "ListModels")
    with pytest.raises(PermissionDenied):
        check.check(bearer("beta-secret-22"), "Explain")
    tokens.write_text("ListModels\n")  # a bad rotation is refused: the keys in force stay
    os.utime(tokens, ns=(2, 2))
    assert check.check(bearer("beta-secret-22"), "ListModels")
    tokens.unlink()
    assert check.check(bearer("beta-secret-22"), "ListModels")


def test_environment_tokens_join_the_file_and_are_validated_apart(tmp_path, monkeypatch):
    tokens = tmp_path / "tokens"
    tokens.write_text("alpha-secret-1\n")
    monkeypatch.setenv("MORE_TOKENS", "gamma-secret-3 ExplainActivations")
    check = TokenCheck.from_config(Auth(tokens_file=str(tokens), tokens_env="MORE_TOKENS"))
    assert check.check(bearer("gamma-secret-3"), "ExplainActivations")
    assert check.check(bearer("alpha-secret-1"), "Explain")
    monkeypatch.setenv("MORE_TOKENS", "Explain")
    with pytest.raises(ValueError, match=r"\$MORE_TOKENS line 1: starts with method names"):
        TokenCheck.from_config(Auth(tokens_file=str(tokens), tokens_env="MORE_TOKENS"))
