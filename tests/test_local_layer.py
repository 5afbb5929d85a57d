"""LocalChannelLayer keeps InMemoryChannelLayer's contract: every shared behaviour runs on both.

Channels' sdist ships no tests, so this is the contract suite. Tests marked "ours only" cover the
deliberate differences listed in pingpong/local_layer.py, and the bounds.
"""

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import pytest
from channels.exceptions import ChannelFull
from channels.layers import BaseChannelLayer, InMemoryChannelLayer

from pingpong.local_layer import LocalChannelLayer

MakeLayer = Callable[..., Any]
NOTHING_WITHIN = 0.1  # seconds a receive waits to prove that nothing arrives


@pytest.fixture(params=[InMemoryChannelLayer, LocalChannelLayer], ids=["stock", "local"])
def make_layer(request) -> MakeLayer:
    """Build the parametrised layer class with the given config."""
    return request.param


@pytest.fixture
def layer(make_layer) -> BaseChannelLayer:
    return make_layer()


async def receive_within(layer, channel, seconds=1.0):
    async with asyncio.timeout(seconds):
        return await layer.receive(channel)


async def receives_nothing(layer, channel) -> bool:
    try:
        await receive_within(layer, channel, NOTHING_WITHIN)
    except TimeoutError:
        return True
    return False


# --- send and receive ---------------------------------------------------------------------


async def test_a_message_sent_to_a_channel_is_received_from_it(layer):
    await layer.send("test-channel", {"type": "test.message", "text": "hello"})
    assert await receive_within(layer, "test-channel") == {"type": "test.message", "text": "hello"}


async def test_a_waiting_receive_gets_the_next_message_sent(layer):
    channel = await layer.new_channel()
    receiving = asyncio.ensure_future(receive_within(layer, channel))
    await asyncio.sleep(0)
    await layer.send(channel, {"type": "test.message"})
    assert await receiving == {"type": "test.message"}


async def test_messages_are_received_in_the_order_they_were_sent(layer):
    channel = await layer.new_channel()
    for index in range(10):
        await layer.send(channel, {"type": "test.message", "index": index})
    received = [(await receive_within(layer, channel))["index"] for _ in range(10)]
    assert received == list(range(10))


async def test_the_receiver_gets_a_copy_not_the_senders_dict(layer):
    message = {"type": "test.message", "items": [1]}
    await layer.send("test-channel", message)
    message["items"].append(2)
    assert (await receive_within(layer, "test-channel"))["items"] == [1]


async def test_new_channel_names_are_valid_and_unique(layer):
    names = {await layer.new_channel() for _ in range(1000)}
    assert len(names) == 1000
    for name in names:
        assert layer.require_valid_channel_name(name)


async def test_new_channel_names_carry_the_prefix(layer):
    assert (await layer.new_channel("readyz.")).startswith("readyz.")


def test_the_layer_declares_the_groups_and_flush_extensions(layer):
    assert layer.extensions == ["groups", "flush"]


# --- capacity -----------------------------------------------------------------------------


async def test_a_send_beyond_capacity_raises_channel_full(make_layer):
    layer = make_layer(capacity=3)
    for _ in range(3):
        await layer.send("test-channel", {"type": "test.message"})
    with pytest.raises(ChannelFull):
        await layer.send("test-channel", {"type": "test.message"})


async def test_a_full_channel_takes_messages_again_once_one_is_received(make_layer):
    layer = make_layer(capacity=1)
    await layer.send("test-channel", {"type": "test.message", "n": 1})
    await receive_within(layer, "test-channel")
    await layer.send("test-channel", {"type": "test.message", "n": 2})
    assert (await receive_within(layer, "test-channel"))["n"] == 2


async def test_the_default_capacity_is_100(layer):
    assert layer.capacity == 100


# --- groups -------------------------------------------------------------------------------


async def test_group_send_reaches_every_member(layer):
    channels = [await layer.new_channel() for _ in range(3)]
    for channel in channels:
        await layer.group_add("test-group", channel)
    await layer.group_send("test-group", {"type": "test.message", "text": "all"})
    for channel in channels:
        assert await receive_within(layer, channel) == {"type": "test.message", "text": "all"}


async def test_a_discarded_channel_gets_no_more_group_messages(layer):
    stays, leaves = await layer.new_channel(), await layer.new_channel()
    await layer.group_add("test-group", stays)
    await layer.group_add("test-group", leaves)
    await layer.group_discard("test-group", leaves)
    await layer.group_send("test-group", {"type": "test.message"})
    assert await receive_within(layer, stays) == {"type": "test.message"}
    assert await receives_nothing(layer, leaves)


async def test_a_channel_added_twice_gets_a_group_message_once(layer):
    channel = await layer.new_channel()
    await layer.group_add("test-group", channel)
    await layer.group_add("test-group", channel)
    await layer.group_send("test-group", {"type": "test.message"})
    await receive_within(layer, channel)
    assert await receives_nothing(layer, channel)


async def test_discarding_a_channel_that_is_not_a_member_does_nothing(layer):
    await layer.group_discard("test-group", await layer.new_channel())
    assert "test-group" not in layer.groups


async def test_the_last_member_leaving_removes_the_group(layer):
    channel = await layer.new_channel()
    await layer.group_add("test-group", channel)
    await layer.group_discard("test-group", channel)
    assert "test-group" not in layer.groups


async def test_group_send_to_a_group_without_members_does_nothing(layer):
    await layer.group_send("nobody-here", {"type": "test.message"})


async def test_group_send_skips_a_full_member_and_reaches_the_others(make_layer):
    layer = make_layer(capacity=1)
    full, other = await layer.new_channel(), await layer.new_channel()
    await layer.group_add("test-group", full)
    await layer.group_add("test-group", other)
    await layer.send(full, {"type": "test.message", "n": "first"})
    await layer.group_send("test-group", {"type": "test.message", "n": "group"})
    assert (await receive_within(layer, other))["n"] == "group"
    assert (await receive_within(layer, full))["n"] == "first"
    assert await receives_nothing(layer, full)


async def test_each_member_gets_its_own_copy_of_a_group_message(layer):
    first, second = await layer.new_channel(), await layer.new_channel()
    await layer.group_add("test-group", first)
    await layer.group_add("test-group", second)
    await layer.group_send("test-group", {"type": "test.message", "text": "a"})
    (await receive_within(layer, first))["text"] = "changed"
    assert (await receive_within(layer, second))["text"] == "a"


# --- flush --------------------------------------------------------------------------------


async def test_flush_forgets_queued_messages_and_groups(layer):
    channel = await layer.new_channel()
    await layer.send(channel, {"type": "test.message"})
    await layer.group_add("test-group", channel)
    await layer.flush()
    assert not layer.channels and not layer.groups
    await layer.group_send("test-group", {"type": "test.message"})
    assert await receives_nothing(layer, channel)


# --- expiry -------------------------------------------------------------------------------


async def test_a_message_older_than_expiry_is_never_received(make_layer):
    layer = make_layer(expiry=0.1)
    await layer.send("test-channel", {"type": "test.message", "n": "old"})
    await asyncio.sleep(0.2)
    await layer.send("test-channel", {"type": "test.message", "n": "new"})
    assert (await receive_within(layer, "test-channel"))["n"] == "new"


async def test_a_channel_with_an_expired_message_leaves_its_groups(make_layer):
    layer = make_layer(expiry=0.1)
    channel = await layer.new_channel()
    await layer.group_add("test-group", channel)
    await layer.send(channel, {"type": "test.message"})
    await asyncio.sleep(0.2)
    await layer.group_send("test-group", {"type": "test.message"})
    assert await receives_nothing(layer, channel)
    assert not layer.groups.get("test-group")  # the stock layer leaves the group's empty dict behind


@pytest.mark.slow
async def test_a_membership_older_than_group_expiry_ends(make_layer):
    # 2.1 s: the stock layer compares against whole seconds (int(time.time()) - group_expiry).
    layer = make_layer(group_expiry=1)
    old = await layer.new_channel()
    await layer.group_add("test-group", old)
    await asyncio.sleep(2.1)
    new = await layer.new_channel()
    await layer.group_add("test-group", new)
    await layer.group_send("test-group", {"type": "test.message"})
    assert await receive_within(layer, new) == {"type": "test.message"}
    assert await receives_nothing(layer, old)


# --- names --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["has space", "bad$char", "a" * 100, "", "ünicode", 42])
async def test_an_invalid_channel_name_is_refused_by_every_call(layer, name):
    with pytest.raises(TypeError):
        await layer.send(name, {"type": "test.message"})
    with pytest.raises(TypeError):
        await layer.receive(name)
    with pytest.raises(TypeError):
        await layer.group_add("test-group", name)
    with pytest.raises(TypeError):
        await layer.group_discard("test-group", name)


@pytest.mark.parametrize("name", ["has space", "with!bang", "a" * 100, "", 42])
async def test_an_invalid_group_name_is_refused_by_every_call(layer, name):
    with pytest.raises(TypeError):
        await layer.group_add(name, "test-channel")
    with pytest.raises(TypeError):
        await layer.group_discard(name, "test-channel")
    with pytest.raises(TypeError):
        await layer.group_send(name, {"type": "test.message"})


async def test_a_message_that_is_not_a_dict_is_refused(layer):
    with pytest.raises(AssertionError):
        await layer.send("test-channel", ["not", "a", "dict"])
    with pytest.raises(AssertionError):
        await layer.group_send("test-group", "not a dict")


# --- receive cancellation ------------------------------------------------------------------


async def test_a_cancelled_receive_leaves_no_channel_behind(layer):
    channel = await layer.new_channel()
    receiving = asyncio.ensure_future(layer.receive(channel))
    await asyncio.sleep(0)
    receiving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await receiving
    assert channel not in layer.channels


async def test_a_receive_that_times_out_lets_a_later_receive_get_later_messages(layer):
    channel = await layer.new_channel()
    assert await receives_nothing(layer, channel)
    await layer.send(channel, {"type": "test.message"})
    assert await receive_within(layer, channel) == {"type": "test.message"}


# --- ours only: the deliberate differences and the bounds ----------------------------------


async def test_ours_a_cancelled_receive_forgets_the_channels_groups_and_messages():
    layer = LocalChannelLayer()
    channel = await layer.new_channel()
    await layer.group_add("test-group", channel)
    receiving = asyncio.ensure_future(layer.receive(channel))
    await asyncio.sleep(0)
    receiving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await receiving
    assert not layer.channels and not layer.groups and not layer.joins


async def test_ours_ten_thousand_abandoned_channels_leave_nothing_in_the_layers_tables():
    layer = LocalChannelLayer()
    channels = [await layer.new_channel() for _ in range(10_000)]
    for channel in channels:
        await layer.group_add("broadcast", channel)
        await layer.group_add(f"own-{channel.rsplit('!', 1)[1]}", channel)
    receiving = [asyncio.ensure_future(layer.receive(channel)) for channel in channels]
    await asyncio.sleep(0)
    await layer.group_send("broadcast", {"type": "test.message"})  # handed to the waiting receives
    for channel in channels[::2]:  # and a queued message on half of them
        await layer.send(channel, {"type": "test.message"})
    for task in receiving:
        task.cancel()
    await asyncio.gather(*receiving, return_exceptions=True)
    assert (layer.channels, layer.groups, dict(layer.pending), dict(layer.joins)) == ({}, {}, {}, {})


async def test_ours_a_channel_that_is_never_received_from_is_reclaimed_after_its_messages_expire():
    layer = LocalChannelLayer(expiry=0.1)
    for index in range(1000):
        await layer.group_add("test-group", f"dead-{index}")
        await layer.send(f"dead-{index}", {"type": "test.message"})
    await asyncio.sleep(0.2)
    await layer.send("live", {"type": "test.message"})  # any call sweeps what expired
    assert set(layer.channels) == {"live"} and not layer.groups and list(layer.pending) == ["live"]
    assert layer.dropped_expired == 1000


async def test_ours_without_group_expiry_a_membership_never_ends():
    layer = LocalChannelLayer(group_expiry=None)
    channel = await layer.new_channel()
    await layer.group_add("test-group", channel)
    assert not layer.joins  # nothing recorded to expire
    layer._sweep(float("inf"))
    assert layer.groups == {"test-group": {channel: layer.groups["test-group"][channel]}}


async def test_ours_members_skipped_because_full_are_counted_and_logged_once_per_interval(caplog):
    layer = LocalChannelLayer(capacity=1)
    channels = [await layer.new_channel() for _ in range(3)]
    for channel in channels:
        await layer.group_add("test-group", channel)
    with caplog.at_level(logging.WARNING, logger="pingpong.local_layer"):
        for _ in range(5):
            await layer.group_send("test-group", {"type": "test.message"})
    assert layer.dropped_full == 4 * 3
    assert len(caplog.records) == 1
    assert "skipped 3 member(s)" in caplog.records[0].getMessage()


async def test_ours_channel_capacity_patterns_set_a_channels_capacity():
    layer = LocalChannelLayer(capacity=5, channel_capacity={"small.*": 1})
    await layer.send("small.one", {"type": "test.message"})
    with pytest.raises(ChannelFull):
        await layer.send("small.one", {"type": "test.message"})
    for _ in range(5):
        await layer.send("large.one", {"type": "test.message"})


async def test_ours_a_direct_receiver_takes_a_group_message_while_its_receiver_waits_with_nothing_queued():
    layer = LocalChannelLayer()
    channel = await layer.new_channel()
    await layer.group_add("room", channel)
    taken: list[Any] = []
    assert layer.direct_receiver_set(channel, lambda message: taken.append(message) or True)
    await layer.group_send("room", {"type": "queued"})  # no receiver waits: queued
    assert await receive_within(layer, channel) == {"type": "queued"}
    receiver = asyncio.ensure_future(layer.receive(channel))
    await asyncio.sleep(0)
    await layer.group_send("room", {"type": "direct"})
    assert taken == [{"type": "direct"}] and not receiver.done()
    layer.direct_receiver_set(channel, lambda message: False)  # declined: to the waiting receiver
    await layer.group_send("room", {"type": "declined"})
    assert await asyncio.wait_for(receiver, 1) == {"type": "declined"}


async def test_ours_a_direct_receiver_is_not_offered_a_message_behind_queued_ones():
    layer = LocalChannelLayer()
    channel = await layer.new_channel()
    taken: list[Any] = []
    layer.direct_receiver_set(channel, lambda message: taken.append(message) or True)
    await layer.send(channel, {"type": "first"})
    await layer.send(channel, {"type": "second"})
    assert taken == []
    assert [await receive_within(layer, channel), await receive_within(layer, channel)] == [
        {"type": "first"},
        {"type": "second"},
    ]


async def test_ours_a_channel_whose_direct_receiver_is_removed_is_forgotten():
    layer = LocalChannelLayer()
    channel = await layer.new_channel()
    layer.direct_receiver_set(channel, lambda message: True)
    assert channel in layer.channels
    layer.direct_receiver_set(channel, None)
    assert channel not in layer.channels
