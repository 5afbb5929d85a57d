"""Connection tokens: HS256 JWTs signed with PINGPONG_TOKEN_SECRET.

A Django app gives a client one with `pingpong.tokens.issue(str(request.user.pk))`, and the
client presents it as `/ws/?token=...` or as `{"type": "auth", "token": ...}`. Claims: `sub` (the
user id), `exp`, and optionally `topics` (topics this token may subscribe to beyond what its
namespace allows). Without a secret no token is issued or accepted.
"""

import time
from collections.abc import Iterable
from dataclasses import dataclass

import jwt

from pingpong import protocol
from pingpong.conf import setting

ALGORITHM = "HS256"
DEFAULT_TTL_SECONDS = 3600


class TokenInvalid(ValueError):
    """The token cannot be accepted; the message is a sentence for the client."""


@dataclass(frozen=True)
class Claims:
    """What a valid token says: who, until when, and which extra topics."""

    user_id: str
    expires_at: float
    topics: frozenset[str]


def secret() -> str:
    return str(setting("PINGPONG_TOKEN_SECRET") or "")


def issue(user_id: str, *, ttl: float = DEFAULT_TTL_SECONDS, topics: Iterable[str] = ()) -> str:
    """A token for `user_id`, valid for `ttl` seconds, that may also subscribe to `topics`."""
    key = secret()
    if not key:
        raise RuntimeError("PINGPONG_TOKEN_SECRET is not set: no token can be issued.")
    if not isinstance(user_id, str) or not user_id:
        raise ValueError("user_id must be a non-empty string (for a Django user: str(user.pk)).")
    claims: dict[str, object] = {"sub": user_id, "exp": int(time.time() + ttl)}
    extra = sorted(set(topics))
    if extra:
        claims["topics"] = extra
    return jwt.encode(claims, key, algorithm=ALGORITHM)


def verify(token: object) -> Claims:
    """The claims of a valid token, or TokenInvalid saying why not (never the token itself)."""
    key = secret()
    if not key:
        raise TokenInvalid("Tokens are not accepted here: the server has no PINGPONG_TOKEN_SECRET.")
    if not isinstance(token, str) or not token:
        raise TokenInvalid("The token must be a non-empty string.")
    if len(token) > protocol.TOKEN_MAX_CHARS:
        raise TokenInvalid(f"The token is longer than {protocol.TOKEN_MAX_CHARS} characters.")
    try:
        claims = jwt.decode(token, key, algorithms=[ALGORITHM], options={"require": ["sub", "exp"]})
    except jwt.ExpiredSignatureError:
        raise TokenInvalid("The token has expired.") from None
    except jwt.InvalidSignatureError:
        raise TokenInvalid("The token's signature is not valid.") from None
    except jwt.InvalidTokenError as error:  # malformed, alg none or another algorithm, missing claims
        raise TokenInvalid(f"The token is not valid: {error}.") from None
    except (ValueError, TypeError, RecursionError):  # decoding problems PyJWT does not wrap
        raise TokenInvalid("The token is not valid.") from None
    user_id, topics = claims.get("sub"), claims.get("topics", [])
    if not isinstance(user_id, str) or not user_id:
        raise TokenInvalid('The token\'s "sub" must be a non-empty string.')
    if not (isinstance(topics, list) and all(isinstance(topic, str) for topic in topics)):
        raise TokenInvalid('The token\'s "topics" must be a list of topic names.')
    return Claims(user_id=user_id, expires_at=float(claims["exp"]), topics=frozenset(topics))
