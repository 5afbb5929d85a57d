"""`manage.py token` and `manage.py publish`, in process (their delivery over Redis: tests/test_topics_e2e.py)."""

from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from pingpong import tokens

SECRET = "command-test-secret-0123456789abcdef0123456789"


def run(*args: str) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command(*args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def test_token_prints_one_token_that_verifies_with_its_user_ttl_and_topics(settings):
    settings.PINGPONG_TOKEN_SECRET = SECRET
    out, _ = run("token", "42", "--ttl", "120", "--topic", "public:a", "--topic", "team:7")
    assert len(out.splitlines()) == 1
    claims = tokens.verify(out.strip())
    assert (claims.user_id, claims.topics) == ("42", frozenset({"public:a", "team:7"}))


def test_token_without_a_secret_is_a_command_error_naming_the_setting(settings):
    settings.PINGPONG_TOKEN_SECRET = ""
    with pytest.raises(CommandError, match="PINGPONG_TOKEN_SECRET is not set"):
        run("token", "42")


@pytest.mark.parametrize("args", [("--topic", "bad topic"), ("--ttl", "0")], ids=["bad-topic", "zero-ttl"])
def test_token_with_a_bad_option_is_a_command_error(settings, args):
    settings.PINGPONG_TOKEN_SECRET = SECRET
    with pytest.raises(CommandError):
        run("token", "42", *args)


def test_publish_prints_the_publication_id_and_topic_and_notes_it_reached_no_other_process():
    out, err = run("publish", "public:x", '{"a": 1}', "--id", "cmd-1")
    assert out.strip() == "publication cmd-1 sent to public:x"
    assert "REDIS_URL is not set" in err


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (("public:x", "{not json"), "not JSON"),
        (("nowhere:x", "1"), "unknown_namespace"),
        (("bad topic", "1"), "bad_topic"),
        (("public:x", "1", "--id", "a b"), '"id"'),
    ],
    ids=["bad-json", "unknown-namespace", "bad-topic", "bad-id"],
)
def test_publish_with_a_bad_argument_is_a_command_error_saying_which(args, said):
    with pytest.raises(CommandError, match=said):
        run("publish", *args)
