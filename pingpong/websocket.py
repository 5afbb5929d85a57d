"""A lean base for websocket consumers that keeps `AsyncWebsocketConsumer`'s whole contract.

Channels' `AsyncConsumer` runs `await_many_dispatch`, which creates a task and an
`asyncio.wait` per message, and its `dispatch` hops to a thread per message to close
database connections. `LeanWebsocketConsumer` reads the client in one loop and the channel
layer in one task, and calls the same handlers the same way: `connect`, `receive`,
`disconnect`, `accept(subprotocol, headers)`, `close` (before `accept`: the handshake is
refused), `groups`, `channel_layer`, `channel_layer_alias`, `channel_name` and layer messages
dispatched by type. `tests/test_consumer_contract.py` runs each of these on the stock class
and on this one.

Deliberate differences, each tested:
- a layer message of a type with no handler is logged and dropped (stock: ValueError kills
  the consumer); a layer message posing as `websocket.*` is refused: only the server speaks
  for the client's socket;
- a handler that fails on a layer message is logged and the connection stays open;
- no `close_old_connections` per message: a handler that uses the database wraps its queries in
  `database_sync_to_async`, which closes stale connections itself;
- `send` and `close` after the connection closed do nothing, instead of reaching the server.

Layer messages whose handler needs no `await` (`direct_handlers`, e.g. a broadcast: check, then
send) are taken straight from the layer while the layer task waits with nothing queued, when the
server offers `send_nowait` (`pingpong.serving.SEND_NOWAIT`: pingpong's uvicorn does) and the layer takes a
direct receiver (`pingpong.layer_calls.DirectReceiver`, both of ours do): a broadcast to every
connection of a node then costs no task wake-up per connection.
"""

import asyncio
import enum
import functools
import logging
from typing import Any

from channels.consumer import get_handler_name
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncJsonWebsocketConsumer, AsyncWebsocketConsumer
from channels.layers import get_channel_layer

from pingpong.serving import SEND_NOWAIT

logger = logging.getLogger("pingpong.connections")

Message = dict[str, Any]


class State(enum.IntEnum):
    """Where a connection is in its life; it only moves forward."""

    CONNECTING = 0  # handshake received, not accepted yet
    OPEN = 1  # accepted
    CLOSING = 2  # close sent: later client frames and layer messages are dropped
    CLOSED = 3  # the client is gone and `disconnect` has run


class LeanWebsocketConsumer(AsyncWebsocketConsumer):
    """`AsyncWebsocketConsumer` with one read loop and one layer task instead of a task per message."""

    #: Layer message types taken without waking the layer task: type -> a method that handles one
    #: synchronously with `self.send_nowait` (see the module docstring).
    direct_handlers: dict[str, str] = {}

    async def __call__(self, scope: Message, receive: Any, send: Any) -> None:  # type: ignore[override]
        self.scope = scope
        self.base_send = send
        self.state = State.CONNECTING
        self.channel_layer = get_channel_layer(self.channel_layer_alias)
        layer_task: asyncio.Task[None] | None = None
        if self.channel_layer is not None and await self.channel_open():
            self.channel_receive = functools.partial(self.channel_layer.receive, self.channel_name)
            layer_task = asyncio.ensure_future(self._read_layer())
        try:
            while True:
                await self.dispatch(await receive())
        except StopConsumer:
            pass
        finally:
            if layer_task is not None:
                layer_task.cancel()
                try:
                    await layer_task
                except asyncio.CancelledError:
                    pass
            # However the loop ended (the server cancelled us, a handler failed), the connection is
            # finished exactly once; after a `websocket.disconnect` this does nothing.
            await self.finish(code=1006)

    async def channel_open(self) -> bool:
        """Get this consumer's channel name from the layer; a subclass may catch an unreachable layer."""
        assert self.channel_layer is not None
        self.channel_name = await self.channel_layer.new_channel()
        return True

    async def _read_layer(self) -> None:
        """Pass channel-layer messages to their handlers until cancelled."""
        while True:
            message = await self.channel_receive()
            if self.state >= State.CLOSING:
                continue  # the client will not read it; nothing to log
            kind = str(message.get("type", ""))
            if kind.startswith("websocket."):
                logger.warning("dropped channel-layer message posing as %r", kind)
                continue
            try:
                await self.dispatch(message)
            except StopConsumer:
                raise
            except Exception:
                logger.exception("handler for %r failed; the connection stays open", kind)

    async def dispatch(self, message: Message) -> None:
        """Call the handler for the message type; log and drop types no handler takes."""
        if message["type"] == "websocket.receive":  # the per-message case, without the name lookup
            await self.websocket_receive(message)
            return
        try:
            handler = getattr(self, get_handler_name(message), None)
        except ValueError:  # a type starting with "_"
            handler = None
        if handler is None:
            logger.warning("dropped message of unknown type %r", message.get("type"))
            return
        await handler(message)

    async def websocket_disconnect(self, message: Message) -> None:
        """The client is gone: finish (leave groups, `disconnect`) and stop."""
        await self.finish(code=message.get("code", 1006))
        raise StopConsumer()

    async def finish(self, *, code: int) -> None:
        """Leave the groups and call `disconnect(code)`, once, whatever ended the connection."""
        if self.state is State.CLOSED:
            return
        self.state = State.CLOSED
        if hasattr(self, "send_nowait"):
            self.channel_layer.direct_receiver_set(self.channel_name, None)  # type: ignore[union-attr]
        if self.groups and self.channel_layer is not None and hasattr(self, "channel_name"):
            for group in self.groups:
                await self.group_leave(group)
        await self.disconnect(code)

    async def group_leave(self, group: str) -> None:
        """Leave one group; a subclass may bound the call in time."""
        assert self.channel_layer is not None
        await self.channel_layer.group_discard(group, self.channel_name)

    async def accept(self, subprotocol: str | None = None, headers: Any = None) -> None:
        await super().accept(subprotocol=subprotocol, headers=headers)
        if self.state is State.CONNECTING:
            self.state = State.OPEN
            self.direct_open()

    def direct_open(self) -> None:
        """Take `direct_handlers`' messages straight from the layer, where the server and layer allow it."""
        send_nowait = self.scope.get("extensions", {}).get(SEND_NOWAIT)
        set_receiver = getattr(self.channel_layer, "direct_receiver_set", None)
        if self.direct_handlers and send_nowait and set_receiver and hasattr(self, "channel_name"):
            self.send_nowait = send_nowait
            set_receiver(self.channel_name, self.layer_message_now)

    def layer_message_now(self, message: Message) -> bool:
        """The direct receiver: True when the message was handled (or dropped, the connection closing) here."""
        name = self.direct_handlers.get(message.get("type"))  # type: ignore[arg-type]
        if name is None:
            return False
        if self.state < State.CLOSING:
            try:
                getattr(self, name)(message)
            except Exception:
                logger.exception("handler for %r failed; the connection stays open", message.get("type"))
        return True

    async def send(  # type: ignore[override]
        self, text_data: str | None = None, bytes_data: bytes | None = None, close: bool | int = False
    ) -> None:
        """Send a text or binary frame (then close, if asked); nothing once the connection is closing."""
        if self.state >= State.CLOSING:
            return
        # Straight to the server: the stock path adds two calls per message on the hot path.
        if text_data is not None:
            await self.base_send({"type": "websocket.send", "text": text_data})
        elif bytes_data is not None:
            await self.base_send({"type": "websocket.send", "bytes": bytes_data})
        else:
            raise ValueError("You must pass one of bytes_data or text_data")
        if close:
            await self.close(close)

    async def close(self, code: int | bool | None = None, reason: str | None = None) -> None:
        """Close once; before `accept` this refuses the handshake (HTTP 403)."""
        if self.state >= State.CLOSING:
            return
        self.state = State.CLOSING
        if isinstance(code, int) and not isinstance(code, bool):
            code = int(code)  # a plain int: autobahn refuses an int subclass such as protocol.CloseCode
        await super().close(code=code, reason=reason)


class LeanJsonWebsocketConsumer(LeanWebsocketConsumer, AsyncJsonWebsocketConsumer):
    """`AsyncJsonWebsocketConsumer` on the lean base: `receive_json` and `send_json`."""
