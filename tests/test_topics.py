"""Topic names, namespaces and the rules that say who may subscribe or publish."""

import re

import pytest
from django.core.exceptions import ImproperlyConfigured

from pingpong import protocol, topics
from pingpong.topics import ANONYMOUS, Identity, Namespace, TopicRefused

ALICE = Identity(user_id="alice", via="token")


def refusal(topic) -> str:
    with pytest.raises(TopicRefused) as refused:
        topics.namespace_for(topic)
    return refused.value.error


@pytest.mark.parametrize("topic", ["public:news", "user:42", "user:a@b.c", "public:k=v_x-1.2", "public:" + "x" * 121])
def test_valid_topics_have_a_namespace(topic):
    assert topics.namespace_for(topic).name == topic.partition(":")[0]


@pytest.mark.parametrize(
    "topic", ["", "public:" + "x" * 122, "public:a b", "public:ü", "public/x", 7, None, ["public:x"]]
)
def test_malformed_topics_are_bad_topic(topic):
    assert refusal(topic) == protocol.ERROR_BAD_TOPIC


@pytest.mark.parametrize("topic", ["private:x", "users:1", "publicx", ":x"])
def test_a_topic_outside_the_namespaces_is_refused(topic):
    assert refusal(topic) == protocol.ERROR_UNKNOWN_NAMESPACE


def test_a_topic_without_a_colon_is_its_own_namespace():
    assert topics.namespace_for("public").name == "public"


def test_configured_namespaces_are_merged_over_the_defaults_and_null_removes_one():
    found = topics.namespaces_from({"chat": {"subscribe": "authenticated", "publish": "authenticated"}, "user": None})
    assert set(found) == {"public", "chat"}
    assert found["chat"] == Namespace(name="chat", subscribe="authenticated", publish="authenticated")


@pytest.mark.parametrize(
    "config",
    [{"chat": {"subscribe": "everyone"}}, {"chat": {"publish": "owner"}}, {"chat": "anyone"}, {"chat": {"extra": 1}}],
)
def test_a_misconfigured_namespace_stops_the_process_with_a_sentence(config):
    with pytest.raises(ImproperlyConfigured, match="chat"):
        topics.namespaces_from(config)


@pytest.mark.parametrize(
    ("rule", "identity", "topic", "allowed"),
    [
        ("anyone", ANONYMOUS, "ns:x", True),
        ("authenticated", ANONYMOUS, "ns:x", False),
        ("authenticated", ALICE, "ns:x", True),
        ("owner", ALICE, "ns:alice", True),
        ("owner", ALICE, "ns:bob", False),
        ("owner", ANONYMOUS, "ns:", False),
        ("token", ALICE, "ns:x", False),
        ("token", Identity(user_id="alice", via="token", topics=frozenset({"ns:x"})), "ns:x", True),
        ("owner", Identity(user_id="alice", via="token", topics=frozenset({"ns:bob"})), "ns:bob", True),
    ],
)
def test_subscribe_rules(rule, identity, topic, allowed):
    assert topics.may_subscribe(identity, Namespace(name="ns", subscribe=rule), topic) is allowed


@pytest.mark.parametrize(
    ("rule", "identity", "allowed"),
    [("server", ALICE, False), ("authenticated", ANONYMOUS, False), ("authenticated", ALICE, True), ("anyone", ANONYMOUS, True)],
)  # fmt: skip
def test_publish_rules(rule, identity, allowed):
    assert topics.may_publish(identity, Namespace(name="ns", publish=rule)) is allowed


def test_group_names_are_valid_channels_group_names_and_differ_per_topic():
    names = {topics.group_for(topic) for topic in ["user:1", "user:2", "public:" + "x" * 121, "public:@=:"]}
    assert len(names) == 4
    assert all(re.fullmatch(r"[a-zA-Z0-9_.-]{1,99}", name) for name in names)


@pytest.mark.parametrize("data", [float("nan"), {1j}, "\ud800", "x" * 20_000])
def test_publication_data_must_be_json_and_small(data):
    with pytest.raises(TopicRefused) as refused:
        topics.data_text(data)
    assert refused.value.error == protocol.ERROR_BAD_REQUEST
