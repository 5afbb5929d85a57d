"""Connection tokens: what `issue` signs and what `verify` accepts or refuses, with a reason."""

import base64
import json
import time

import jwt
import pytest

from pingpong import protocol, tokens
from pingpong.tokens import TokenInvalid

SECRET = "token-test-secret-" + "0123456789abcdef" * 4  # 64+ bytes: PyJWT warns below the hash size


@pytest.fixture(autouse=True)
def secret(settings):
    settings.PINGPONG_TOKEN_SECRET = SECRET


def unsigned(claims: dict) -> str:
    """A token with `alg: none` and no signature."""
    part = lambda value: base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()  # noqa: E731
    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


def test_an_issued_token_verifies_to_its_user_expiry_and_topics():
    claims = tokens.verify(tokens.issue("42", ttl=60, topics=["team:7", "team:7"]))
    assert claims.user_id == "42"
    assert time.time() < claims.expires_at <= time.time() + 61
    assert claims.topics == {"team:7"}


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (jwt.encode({"sub": "1", "exp": int(time.time()) - 5}, SECRET, algorithm="HS256"), "expired"),
        (jwt.encode({"sub": "1", "exp": int(time.time()) + 86400}, "another-secret-" + "x" * 64, "HS256"), "signature"),
        (unsigned({"sub": "1", "exp": int(time.time()) + 86400}), "not valid"),
        (jwt.encode({"sub": "1", "exp": int(time.time()) + 86400}, SECRET, algorithm="HS512"), "not valid"),
        (jwt.encode({"exp": int(time.time()) + 86400}, SECRET, algorithm="HS256"), "not valid"),
        (jwt.encode({"sub": "1"}, SECRET, algorithm="HS256"), "not valid"),
        (jwt.encode({"sub": "", "exp": int(time.time()) + 86400}, SECRET, algorithm="HS256"), "sub"),
        (jwt.encode({"sub": "1", "exp": int(time.time()) + 86400, "topics": "public:x"}, SECRET, "HS256"), "topics"),
        (jwt.encode({"sub": "1", "exp": int(time.time()) + 86400, "topics": [1]}, SECRET, "HS256"), "topics"),
        ("not.a.token", "not valid"),
        ("", "non-empty"),
        (None, "non-empty"),
        (["a"], "non-empty"),
        ("a" * (protocol.TOKEN_MAX_CHARS + 1), "longer"),
    ],
    ids=[
        "expired", "wrong-secret", "alg-none", "other-algorithm", "no-sub", "no-exp", "empty-sub",
        "topics-not-a-list", "topics-not-strings", "garbage", "empty", "none", "a-list", "oversized",
    ],
)  # fmt: skip
def test_a_bad_token_is_refused_with_a_reason(token, reason):
    with pytest.raises(TokenInvalid, match=reason) as refused:
        tokens.verify(token)
    if isinstance(token, str) and token:
        assert token not in str(refused.value)  # the reason never repeats the token


def test_without_a_secret_no_token_is_accepted_or_issued(settings):
    token = tokens.issue("1")
    settings.PINGPONG_TOKEN_SECRET = ""
    with pytest.raises(TokenInvalid, match="PINGPONG_TOKEN_SECRET"):
        tokens.verify(token)
    with pytest.raises(RuntimeError, match="PINGPONG_TOKEN_SECRET"):
        tokens.issue("1")


def test_a_user_id_must_be_a_non_empty_string():
    with pytest.raises(ValueError, match="str"):
        tokens.issue(42)  # type: ignore[arg-type]
