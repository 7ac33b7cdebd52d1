"""One Trystero identity: a selfId, shared relays, and one connection per (app id, remote peer).

Structure (spec §2.4, §6.3, §7):

:class:`Session`
    Owns the selfId (Trystero: one per JS realm), the :class:`~signaling.relay_hub.RelayHub`
    (one relay per URL for all rooms) and an :class:`AppContext` per app id. ``join_room()`` uses a
    default session per event loop whose selfId is fixed for the process.

:class:`AppContext` (per app id)
    The app's rooms (by id and by room token), its :class:`~signaling.signaller.Negotiator`, and
    its :class:`PeerLink` per remote peer: one RTCPeerConnection shared by every room of the app,
    rooms told apart by token. When a channel opens we send a presence frame for each of our rooms;
    a remote's presence frame (or any room frame, or a relay message in one of our rooms) binds that
    room to the link. A link no room uses is closed after ``idle_connection`` (at once if the app
    has no rooms left).

:class:`Binding` (per (room, link): a peer in a room)
    Admission per room (§7): both sides send ``@_hsready`` once their local handshake passed (at
    once without a password; after the challenge/response with one). The peer becomes *active*
    (``on_peer_join``) when ours passed and theirs arrived, within ``handshake`` seconds or it is
    dropped from the room; if its channel brought nothing at all by then (a 0.25 peer sends
    presence and ``@_hsready`` the moment it opens), the connection is closed and the room
    announces again, so a new one is negotiated. While pending, only
    ``@_hsready``/``@_hsdata``/``@_leave`` are accepted.
    ``@_ping`` is answered with ``@_pong``; ``@_leave`` or presence(0) = the peer left the room; the
    connection closing = the peer left every room.

Wire 0.22 (:mod:`signaling.negotiation022`): a 0.22 room gets an AppContext of its own, so its links are
per (room, peer); the context skips presence frames, activates a peer as soon as its channel
opens (no ``@_hsready``), closes a link as soon as its peer left the room, and finishes every
chunk run it starts. Everything else (keepalive, ping, leave, caps) is the code above.

Bad input from a peer never raises out of here: a frame the decoder cannot take (FramingError,
e.g. a never-ending chunk stream past the reassembly caps) drops the connection; a bad JSON
payload (PayloadError) drops that one message. Both are counted.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, cast

from signaling import crypto, negotiation022, strategies
from signaling.background import BackgroundTasks, every
from signaling.bounded import LruSet
from signaling.config import RoomConfig
from signaling.errors import FramingError, HandshakeError, PayloadError
from signaling.foreign_wire import channel_wire
from signaling.framing import NO_METADATA
from signaling.peer import ChannelNotOpen, MessageTooLarge, Peer
from signaling.relay_hub import RelayHub
from signaling.room import Room
from signaling.signaller import RoomSignaller
from signaling.wire import wire_for
from signaling.wire.interface import Admission, Event, Presence, Progress, Received, Wire

log = logging.getLogger(__name__)

__all__ = [
    "PROCESS_SELF_ID",
    "AppContext",
    "Binding",
    "PeerLink",
    "Session",
    "close_default_session",
    "default_session",
    "join_room",
]

SELF_ID_LENGTH = 20
#: The selfId of every default session in this process (Trystero: one per JS realm).
PROCESS_SELF_ID = crypto.gen_id(SELF_ID_LENGTH)


# Seconds a 0.22 connection stays open after its peer left (the leaver closes after 0.099 s).
PEER_LEAVE_GRACE = 0.3


@dataclass(eq=False)
class Binding:
    """One remote peer in one room, over the app's shared connection: admission state and what the
    room reads of it (:class:`~signaling.room.RoomPeer`)."""

    room: Room
    link: PeerLink
    active: bool = False
    local_passed: bool = False
    remote_ready: bool = False
    challenge: str | None = None  # set when we are the password-check initiator
    joined_at: float = 0.0
    rtt_ms: float | None = None
    timer: asyncio.TimerHandle | None = None
    pong_waiters: deque[asyncio.Future[None]] = field(default_factory=deque)


class PeerLink:
    """The one connection to one remote peer of one app id, and which of our rooms use it."""

    def __init__(
        self, app: AppContext, peer_id: str, peer: Peer, token: str = "", *, wire_known: bool = False
    ) -> None:
        self.app = app
        self.peer_id = peer_id
        self.peer = peer
        limits = app.config.limits
        # Without room frames (0.22) the link serves one room: its decoder stamps that token on
        # every event, so dispatch by token below works for both wires.
        self.decoder = app.wire.new_decoder(
            token,
            max_action_bytes=limits.max_action_bytes,
            max_pending=limits.max_pending_actions,
            max_buffered_bytes=limits.max_buffered_bytes,
        )
        self.bindings: dict[str, Binding] = {}  # by room token
        self.remote_tokens: LruSet[str] = LruSet(limits.max_remote_tokens)
        # Wire bytes of unfinished messages by (token, action, nonce), so a completed message's
        # size is known for the receive queues' byte budget. Bounded like the decoder's pending
        # set (cleared if it ever outgrows it, e.g. after the decoder dropped messages).
        self._sizes: dict[tuple[str, str, int], int] = {}
        self._max_sizes = 2 * limits.max_pending_actions
        self.opened_at = time.time()
        self.last_seen = self.opened_at
        self.last_keepalive = 0.0
        self.closed = False
        self.close_reason = ""
        # 0.22: the connection served one room and the peer is out of it; JS 0.22 drops its end
        # then, so nothing on it counts any more (not even a pong still in flight).
        self.finished = False
        #: The room this connection was negotiated for (where a stranger is reported).
        self.via_token = token
        #: Whether the first message was checked for the other wire's framing (strangers).
        self.screened = False
        #: The signals this connection was negotiated with showed the peer speaks our wire
        #: (RoomSignaller.signals_show_wire), so its silence cannot make it a stranger.
        self.wire_known = wire_known
        self.idle_timer: asyncio.TimerHandle | None = None
        peer.on_close = self._on_close
        peer.on_message = self._on_message  # also delivers what arrived before this point

    def __repr__(self) -> str:
        return f"<PeerLink {self.peer_id} rooms={len(self.bindings)} {'closed' if self.closed else 'open'}>"

    @property
    def closing(self) -> bool:
        """Closed, or being closed by us."""
        return self.closed or bool(self.close_reason)

    def send_nowait(self, frame: bytes) -> bool:
        """Queue one small frame (control messages); False if the channel is gone."""
        try:
            self.peer.send_nowait(frame)
        except (ChannelNotOpen, MessageTooLarge):
            return False
        return True

    async def send_frames(self, frames: list[bytes]) -> bool:
        """All frames of one send(), in order, with back-pressure; False if the channel closed."""
        if self.app.traits.complete_runs and len(frames) > 1:
            # A 0.22 receiver never purges a half-received run: finish it even if our caller is
            # cancelled (bounded: this one send's frames), or it would corrupt a later send.
            return await asyncio.shield(self._send_all(frames))
        return await self._send_all(frames)

    async def _send_all(self, frames: list[bytes]) -> bool:
        peer = self.peer
        try:
            for frame in frames:
                await peer.send(frame)
        except (ChannelNotOpen, MessageTooLarge):
            return False
        return True

    def forget_room(self, token: str) -> None:
        """Drop half-received messages of a room this peer is no longer in."""
        before = self.decoder.buffered_bytes
        self.decoder.forget_room(token)
        self.app.buffered_total += self.decoder.buffered_bytes - before
        for key in [k for k in self._sizes if k[0] == token]:
            del self._sizes[key]

    def release(self) -> None:
        """Give back the reassembly memory (the link is closed)."""
        self.app.buffered_total -= self.decoder.buffered_bytes
        self.decoder.reset()
        self._sizes.clear()

    def _on_message(self, data: bytes | str) -> None:
        self.last_seen = time.time()
        app = self.app
        if not self.screened:
            self.screened = True
            foreign = channel_wire(data, app.traits.version)
            if foreign is not None:
                app.drop_stranger(self, *foreign)
                return
        before = self.decoder.buffered_bytes
        try:
            events = self.decoder.feed(data)
        except FramingError as exc:
            app.drop_link(self, f"bad frame: {exc}")
            return
        except PayloadError as exc:
            app.counters["dropped.bad_payload"] += 1
            log.info("peer %s: dropped one message: %s", self.peer_id, exc)
            return
        finally:
            app.buffered_total += self.decoder.buffered_bytes - before
        if app.buffered_total > app.config.limits.max_total_buffered_bytes:
            app.drop_link(self, "unfinished messages of all peers passed the app's reassembly budget")
            return
        size = len(data)
        for event in events:
            if isinstance(event, Progress):
                key = (event.token, event.action, event.nonce)
                if key not in self._sizes and len(self._sizes) >= self._max_sizes:
                    self._sizes.clear()
                self._sizes[key] = self._sizes.get(key, 0) + size
            elif isinstance(event, Received):
                size += self._sizes.pop((event.token, event.action, event.nonce), 0)
            app.on_event(self, event, size)

    def _on_close(self) -> None:
        self.app.link_closed(self, self.peer.close_reason or "closed")


class AppContext:
    """Rooms, negotiations and connections of one app id within a session."""

    def __init__(self, session: Session, config: RoomConfig) -> None:
        self.session = session
        self.app_id = config.app_id
        self.config = config  # the first room's: ICE settings and limits are per app (shared PCs)
        self.wire: Wire = wire_for(config.wire)
        self.traits = self.wire.traits
        #: Key in Session.apps (negotiation022.context_key): the app id, or per room for 0.22.
        self.key: negotiation022.ContextKey = config.app_id
        self.rooms: dict[str, Room] = {}
        self.rooms_by_token: dict[str, Room] = {}
        self.links: dict[str, PeerLink] = {}
        self.counters: Counter[str] = Counter()
        #: Bytes held in unfinished messages by all links (Limits.max_total_buffered_bytes).
        self.buffered_total = 0
        self.negotiator = negotiation022.negotiator_class(self.wire)(
            self_id=session.self_id,
            links=self,
            limits=config.limits,
            timeouts=config.timeouts,
        )
        self._tasks = BackgroundTasks(log)
        self._keepalive = asyncio.get_running_loop().create_task(
            every(
                min(1.0, config.timeouts.keepalive), self._keepalive_round, "app %s: keepalive", self.app_id
            ),
            name=f"keepalive {self.app_id}",
        )

    def stats(self) -> dict[str, Any]:
        """App-wide counters (connections are shared by the app's rooms), for ``Room.stats``."""
        counters = self.counters
        dropped = {k.removeprefix("dropped."): v for k, v in counters.items() if k.startswith("dropped.")}
        return {
            "connections": len(self.links),
            "negotiations": len(self.negotiator.pending),
            "dropped_peers": counters["dropped_peers"],
            "dropped": dropped,
        }

    # ------------------------------------------------------------------ rooms

    def add_room(self, config: RoomConfig, room_id: str) -> Room:
        if config.wire != self.config.wire:
            raise ValueError(f"app {self.app_id!r} already uses wire {self.config.wire}, not {config.wire}")
        counters: Counter[str] = Counter()
        signaller = strategies.get(config.strategy).signaller(config.wire)(
            app_id=self.app_id,
            room_id=room_id,
            self_id=self.session.self_id,
            password=config.password,
            strategy=config.strategy,
            relay_urls=config.effective_relay_urls,
            hub=self.session.hub,
            negotiator=self.negotiator,
            limits=self.config.limits,
            timeouts=config.timeouts,
            counters=counters,
        )
        room = Room(self, config, room_id, signaller, counters)
        signaller.has_active_peers = lambda: any(b.active for b in room.bindings.values())
        self.rooms[room_id] = room
        self.rooms_by_token[room.token] = room
        signaller.start()
        encode_presence = self.wire.encode_presence
        if encode_presence is not None:
            presence = encode_presence(room.token, True)
            for link in list(self.links.values()):
                link.send_nowait(presence)
                if room.token in link.remote_tokens:
                    self.bind(link, room)
        log.info("joined room %s of app %s as %s", room_id, self.app_id, self.session.self_id)
        return room

    async def leave_room(self, room: Room) -> None:
        """Trystero's leave: ``@_leave`` to the room's peers, wait 99 ms, then tear down."""
        if self.rooms.get(room.room_id) is not room:
            return
        self.negotiator.drop_room(room.signaller)
        leave = room.encoder.encode(self.wire.action_leave, "")
        for binding in list(room.bindings.values()):
            for frame in leave:
                binding.link.send_nowait(frame)
        await asyncio.sleep(room.config.timeouts.leave_grace)
        for binding in list(room.bindings.values()):
            # The room sees its peers as RoomPeer; the session put only Bindings there (bind()).
            self.unbind(cast(Binding, binding), "we left", notify=False)
        del self.rooms[room.room_id]
        self.rooms_by_token.pop(room.token, None)
        encode_presence = self.wire.encode_presence
        presence = encode_presence(room.token, False) if encode_presence is not None else None
        for link in list(self.links.values()):
            if presence is not None:
                link.send_nowait(presence)
            if not link.bindings:
                self._schedule_idle(link)
        await room.signaller.stop()
        log.info("left room %s of app %s", room.room_id, self.app_id)
        if not self.rooms:
            await self.session.app_done(self)

    async def close(self) -> None:
        """Close every connection and negotiation (the app has no rooms left)."""
        self._keepalive.cancel()
        await self.negotiator.close()
        for link in list(self.links.values()):
            self.drop_link(link, "session closed", quiet=True)
        await self._tasks.wait(timeout=5)

    # ------------------------------------------------------------------ LinkDirectory (negotiator)

    def is_connected(self, peer_id: str) -> bool:
        link = self.links.get(peer_id)
        return link is not None and not link.closing and not link.finished

    def on_signal_from_connected(self, peer_id: str, room: RoomSignaller) -> None:
        link = self.links.get(peer_id)
        target = self.rooms_by_token.get(room.token)
        if link is not None and target is not None and not target.left and target.token not in link.bindings:
            self.bind(link, target)

    def can_accept(self) -> bool:
        return len(self.links) < self.config.limits.max_connections

    def make_peer(self, initiator: bool, peer_id: str) -> Peer:
        config = self.config
        return Peer(
            initiator,
            ice_servers=config.effective_ice_servers,
            host_addresses=config.ice_host_addresses,
            name=f"{self.app_id}/{peer_id}",
        )

    def on_peer_open(self, peer_id: str, peer: Peer, room: RoomSignaller) -> None:
        existing = self.links.get(peer_id)
        if existing is not None and existing.finished:
            self.drop_link(existing, "replaced by a new connection", quiet=True)
        elif existing is not None and not existing.closing:
            # Two negotiations raced (e.g. one per room); like Trystero, the first open one wins.
            self._close_peer(peer, "duplicate connection")
            target = self.rooms_by_token.get(room.token)
            if target is not None and not target.left:
                self.bind(existing, target)
            return
        if not self.can_accept():
            self.counters["dropped.connection_cap"] += 1
            self._close_peer(peer, "connection cap")
            return
        link = self.links[peer_id] = PeerLink(
            self, peer_id, peer, room.token, wire_known=room.signals_show_wire
        )
        log.info("connected to peer %s (app %s, via room %s)", peer_id, self.app_id, room.room_id)
        encode_presence = self.wire.encode_presence
        if encode_presence is not None:
            for token in self.rooms_by_token:
                link.send_nowait(encode_presence(token, True))
        target = self.rooms_by_token.get(room.token)
        if target is not None and not target.left:
            self.bind(link, target)
        if not link.bindings:
            self._schedule_idle(link)

    # ------------------------------------------------------------------ links

    def drop_link(self, link: PeerLink, reason: str, *, quiet: bool = False) -> None:
        """Close a connection on purpose (bad input, idle, shutdown)."""
        if link.closing:
            return
        if not quiet:
            log.warning("dropped peer %s (app %s): %s", link.peer_id, self.app_id, reason)
            self.counters["dropped_peers"] += 1
        link.close_reason = reason
        link.peer.on_message = None  # nothing more from it, even before the close completes
        self._close_peer(link.peer, reason)  # on_close -> link_closed()

    def link_closed(self, link: PeerLink, reason: str) -> None:
        if link.closed:
            return
        link.closed = True
        reason = link.close_reason or reason
        if self.links.get(link.peer_id) is link:
            del self.links[link.peer_id]
        if link.idle_timer is not None:
            link.idle_timer.cancel()
        for binding in list(link.bindings.values()):
            self.unbind(binding, f"disconnected ({reason})")
        link.release()
        log.info("connection to peer %s closed (app %s): %s", link.peer_id, self.app_id, reason)

    def _keepalive_round(self) -> None:
        """Ping connections that went quiet; drop those that stay quiet (a vanished peer)."""
        timeouts = self.config.timeouts
        now = time.time()
        for link in list(self.links.values()):
            silence = now - link.last_seen
            active = next((b for b in link.bindings.values() if b.active), None)
            if active is None or link.closing:
                continue  # pending peers do not answer pings; idle links time out anyway
            if silence > timeouts.peer_timeout:
                self.drop_link(link, f"no traffic for {silence:.0f} s")
            elif silence >= timeouts.keepalive and now - link.last_keepalive >= timeouts.keepalive:
                link.last_keepalive = now
                active.room.refresh_rtt(link.peer_id)

    def _schedule_idle(self, link: PeerLink) -> None:
        if link.closed or link.bindings:
            return
        if not self.rooms:
            self.drop_link(link, "no rooms left", quiet=True)
            return
        # 0.22: a connection serves one room, so once the peer left it is done; but the leaver
        # sends @_leave and closes 99 ms later, and closing before it does makes its last sends
        # fail in JS with an unhandled "DataChannel is closed". So close just after it would.
        delay = self.config.timeouts.idle_connection if self.traits.shared_connections else PEER_LEAVE_GRACE
        if link.idle_timer is None:
            link.idle_timer = asyncio.get_running_loop().call_later(delay, self._idle_expired, link)

    def _idle_expired(self, link: PeerLink) -> None:
        link.idle_timer = None
        if not link.bindings:
            self.drop_link(link, "idle: in none of our rooms", quiet=True)

    def drop_stranger(self, link: PeerLink, version: str, evidence: str) -> None:
        """``link``'s peer speaks Trystero wire ``version``: report it in the rooms it reached
        (one log line each) and close the connection without it ever joining."""
        rooms = {b.room for b in link.bindings.values()}
        via = self.rooms_by_token.get(link.via_token)
        if via is not None and not via.left:
            rooms.add(via)
        for room in rooms:
            room.signaller.strangers.report(link.peer_id, version, evidence)
        for binding in list(link.bindings.values()):
            self.unbind(binding, f"speaks Trystero wire {version}")
        self.counters["dropped.foreign_wire_connection"] += 1
        self.drop_link(link, f"speaks Trystero wire {version}", quiet=True)

    def _close_peer(self, peer: Peer, reason: str) -> None:
        self.spawn(peer.close(reason))

    def spawn(self, coro: Any) -> asyncio.Future[Any]:
        return self._tasks.spawn(coro, "app %s: background task", self.app_id)

    # ------------------------------------------------------------------ frames from a link

    def on_event(self, link: PeerLink, event: Event, size: int) -> None:
        wire = self.wire
        if isinstance(event, Presence):
            self._on_presence(link, event.token, event.present)
            return
        room = self.rooms_by_token.get(event.token)
        if room is None or room.left:
            # JS buffers frames for rooms it has not joined yet; we drop them (a peer sends
            # presence + @_hsready again when we join that room).
            self.counters["dropped.unknown_room"] += 1
            return
        if isinstance(event, Progress):
            return
        room.counters["bytes_in"] += size
        action = event.action
        binding = link.bindings.get(event.token)
        if binding is None:
            if action == wire.action_leave:
                return  # leaving a room we never saw it in
            if link.finished:
                room.counters["dropped.after_leave"] += 1
                return
            # A room frame means the peer put us in that room on its side (Trystero binds a room
            # before it sends anything for it), so treat it like a presence frame.
            binding = self.bind(link, room)
        admission = wire.admission
        if not binding.active and admission is None:
            # 0.22: a well-formed 0.22 frame ends the stranger screen early (see bind()).
            binding.remote_ready = True
            self._maybe_activate(binding)
        if not binding.active and (admission is None or action not in admission.pending_actions):
            room.counters["dropped.pending_peer"] += 1
            return
        room.counters["actions_in"] += 1
        if action.startswith(wire.internal_prefix):
            self._on_internal(binding, action, event.payload, event.metadata)
            return
        metadata = None if event.metadata is NO_METADATA else event.metadata
        room.deliver(action, event.payload, link.peer_id, metadata, size)

    def _on_presence(self, link: PeerLink, token: str, present: bool) -> None:
        if present:
            link.remote_tokens.add(token)
            room = self.rooms_by_token.get(token)
            if room is not None and not room.left:
                self.bind(link, room)
            return
        link.remote_tokens.discard(token)
        binding = link.bindings.get(token)
        if binding is not None:
            self.unbind(binding, "left the room")

    def _on_internal(self, binding: Binding, action: str, payload: Any, metadata: Any) -> None:
        wire = self.wire
        admission = wire.admission
        room = binding.room
        if action == wire.action_ping:
            self._send_control(binding, wire.action_pong, "")
        elif action == wire.action_pong:
            while binding.pong_waiters:
                waiter = binding.pong_waiters.popleft()
                if not waiter.done():
                    waiter.set_result(None)
                    break
        elif action == wire.action_leave:
            self.unbind(binding, "left the room")
        elif admission is None:
            # 0.22 has no handshake actions; @_signal/@_stream/@_track are unsupported below.
            room.counters["dropped.unsupported_internal"] += 1
        elif action == admission.ready_action:
            binding.remote_ready = True
            self._maybe_activate(binding)
        elif action == admission.data_action:
            self._on_hsdata(binding, admission, payload)
        else:
            # @_signal (media renegotiation), @_stream, @_track, @_response: nothing to do for a
            # data-only peer without request actions.
            room.counters["dropped.unsupported_internal"] += 1

    # ------------------------------------------------------------------ admission

    def bind(self, link: PeerLink, room: Room) -> Binding:
        """Put ``link``'s peer into ``room`` as pending and start the admission handshake."""
        binding = link.bindings.get(room.token)
        if binding is not None:
            return binding
        binding = Binding(room, link)
        link.bindings[room.token] = binding
        room.bindings[link.peer_id] = binding
        if link.idle_timer is not None:
            link.idle_timer.cancel()
            link.idle_timer = None
        loop = asyncio.get_running_loop()
        admission = self.wire.admission
        if admission is None:
            # 0.22: active as soon as the channel is open; nothing to send (spec §9.6). Where
            # strangers can connect (torrent), only once the peer's first message shows 0.22
            # framing or it stayed silent for the screen time (a 0.25 peer speaks at once).
            screen = room.signaller.channel_screen
            binding.local_passed = True
            binding.remote_ready = link.screened or screen <= 0
            if not binding.remote_ready:
                binding.timer = loop.call_later(screen, self._screen_passed, binding)
            self._maybe_activate(binding)
            return binding
        binding.timer = loop.call_later(room.config.timeouts.handshake, self._handshake_expired, binding)
        if not room.config.password:
            binding.local_passed = True
            self._send_control(binding, admission.ready_action, "")
        elif admission.is_initiator(self.session.self_id, link.peer_id):
            binding.challenge = crypto.gen_id(admission.challenge_length)
            self._send_control(binding, admission.data_action, admission.challenge(binding.challenge))
        log.debug("peer %s pending in room %s", link.peer_id, room.room_id)
        return binding

    def unbind(self, binding: Binding, reason: str, *, notify: bool = True) -> None:
        """The peer is no longer in the room (left, failed admission, or disconnected)."""
        link, room = binding.link, binding.room
        if link.bindings.get(room.token) is not binding:
            return
        del link.bindings[room.token]
        if room.bindings.get(link.peer_id) is binding:
            del room.bindings[link.peer_id]
        if binding.timer is not None:
            binding.timer.cancel()
            binding.timer = None
        for waiter in binding.pong_waiters:
            if not waiter.done():
                waiter.set_exception(ConnectionError(f"peer {link.peer_id} {reason}"))
        binding.pong_waiters.clear()
        link.forget_room(room.token)
        if not self.traits.shared_connections:
            link.finished = True
        if binding.active and notify:
            room.peer_left(link.peer_id, reason)
        elif not binding.active:
            log.debug("peer %s removed from room %s before admission: %s", link.peer_id, room.room_id, reason)
        if not link.closed and not link.bindings:
            self._schedule_idle(link)

    def _send_control(self, binding: Binding, action: str, payload: Any) -> None:
        for frame in binding.room.encoder.encode(action, payload):
            if not binding.link.send_nowait(frame):
                return

    def _on_hsdata(self, binding: Binding, admission: Admission, payload: Any) -> None:
        room = binding.room
        password = room.config.password
        if binding.local_passed or not password:
            return  # nothing (more) expected; JS ignores it the same way
        try:
            if binding.challenge is not None:
                admission.check_response(payload, binding.challenge, password, self.app_id, room.room_id)
            else:
                challenge = admission.parse_challenge(payload)
                self._send_control(
                    binding,
                    admission.data_action,
                    admission.response(challenge, password, self.app_id, room.room_id),
                )
        except HandshakeError as exc:
            room.counters["dropped.handshake_failed"] += 1
            log.warning(
                "dropped peer %s from room %s: handshake failed: %s", binding.link.peer_id, room.room_id, exc
            )
            self.unbind(binding, f"handshake failed: {exc}")
            return
        binding.local_passed = True
        self._send_control(binding, admission.ready_action, "")
        self._maybe_activate(binding)

    def _maybe_activate(self, binding: Binding) -> None:
        if binding.active or not (binding.local_passed and binding.remote_ready):
            return
        binding.active = True
        binding.joined_at = time.time()
        if binding.timer is not None:
            binding.timer.cancel()
            binding.timer = None
        binding.room.peer_joined(binding.link.peer_id)

    def _screen_passed(self, binding: Binding) -> None:
        binding.timer = None
        if binding.link.bindings.get(binding.room.token) is binding:
            binding.remote_ready = True
            self._maybe_activate(binding)

    def _handshake_expired(self, binding: Binding) -> None:
        binding.timer = None
        if binding.active or binding.link.bindings.get(binding.room.token) is not binding:
            return
        room = binding.room
        link = binding.link
        timeout = room.config.timeouts.handshake
        silent = not link.screened and not link.closing
        if silent and not link.wire_known:
            # Not one message since the channel opened: what a Trystero 0.22 peer does (it has no
            # handshake), found on a tracker, where both wires' signals look the same.
            self.drop_stranger(link, "0.22", f"its channel opened but it sent nothing in {timeout:.0f} s")
            return
        room.counters["dropped.handshake_timeout"] += 1
        log.warning(
            "dropped peer %s from room %s: handshake timed out after %.0f s%s",
            link.peer_id,
            room.room_id,
            timeout,
            " (its channel stayed silent)" if silent else "",
        )
        if not silent:
            self.unbind(binding, "handshake timed out")
            return
        # A peer of our wire sends presence and @_hsready the moment its channel opens, so a
        # channel that brought nothing at all does not carry its data. Close it (the peer sees
        # it go and forgets us) and announce again, as JS does when it loses a connection: the
        # peer hears us and the two of us negotiate a new one.
        rooms = {b.room for b in link.bindings.values()}
        self.drop_link(link, f"its channel stayed silent for {timeout:.0f} s", quiet=True)
        for lost in rooms:
            if not lost.left:
                lost.signaller.announce_again()


class Session:
    """A Trystero identity (selfId) with its relays, rooms and connections. Create it inside a
    running event loop; ``await close()`` when done."""

    def __init__(self, self_id: str | None = None, *, id_prefix: str = "") -> None:
        """``self_id``: the peer id to use; without one, a random id that starts with
        ``id_prefix`` (who sorts lower leads on topic relays and gets answered on trackers)."""
        if len(id_prefix) >= SELF_ID_LENGTH:
            raise ValueError(f"id_prefix must be shorter than {SELF_ID_LENGTH} characters")
        self.self_id = self_id or id_prefix + crypto.gen_id(SELF_ID_LENGTH - len(id_prefix))
        self.hub = RelayHub()
        #: By negotiation022.context_key: the app id (0.25: connections shared by the app's rooms), or
        #: (app id, wire, room id) for a wire without shared connections (0.22).
        self.apps: dict[negotiation022.ContextKey, AppContext] = {}
        self._loop = asyncio.get_running_loop()
        self._closed = False

    def __repr__(self) -> str:
        return f"<Session {self.self_id} apps={list(self.apps)}>"

    def join(self, config: RoomConfig, room_id: str) -> Room:
        """Join ``room_id`` (or return the room if already joined). Returns at once."""
        if self._closed:
            raise RuntimeError("session is closed")
        if not isinstance(room_id, str) or not room_id:
            raise ValueError("room_id must be a non-empty string")
        key = negotiation022.context_key(config.app_id, room_id, wire_for(config.wire))
        app = self.apps.get(key)
        room = app.rooms.get(room_id) if app is not None else None
        if room is not None:
            return room
        for other in self.apps.values():
            # Both wires use the same topics for a room: one session cannot be in it twice.
            if other.app_id == config.app_id and room_id in other.rooms:
                raise ValueError(
                    f"room {room_id!r} of app {config.app_id!r} is already joined"
                    f" with wire {other.config.wire}"
                )
        if app is None:
            app = self.apps[key] = AppContext(self, config)
            app.key = key
        return app.add_room(config, room_id)

    def rooms(self) -> list[Room]:
        return [room for app in self.apps.values() for room in app.rooms.values()]

    def links(self, app_id: str, room_id: str | None = None) -> dict[str, PeerLink]:
        """Open connections of an app id by remote peer id (diagnostics and tests); with
        ``room_id``, those of the context serving that room (a 0.22 room has its own)."""
        if room_id is None:
            app = self.apps.get(app_id)
        else:
            app = next((a for a in self.apps.values() if a.app_id == app_id and room_id in a.rooms), None)
        return dict(app.links) if app is not None else {}

    async def app_done(self, app: AppContext) -> None:
        if self.apps.get(app.key) is app and not app.rooms:
            del self.apps[app.key]
            await app.close()

    async def close(self) -> None:
        """Leave every room (with Trystero's ``@_leave``), then close relays and connections."""
        if self._closed:
            return
        self._closed = True
        await asyncio.gather(*(room.leave() for room in self.rooms()), return_exceptions=True)
        for app in list(self.apps.values()):
            await app.close()
        self.apps.clear()
        await self.hub.close()


_default_sessions: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Session] = weakref.WeakKeyDictionary()


def default_session() -> Session:
    """The session ``join_room`` uses: one per event loop, all with :data:`PROCESS_SELF_ID`."""
    loop = asyncio.get_running_loop()
    session = _default_sessions.get(loop)
    if session is None or session._closed:
        session = _default_sessions[loop] = Session(PROCESS_SELF_ID)
    return session


async def close_default_session() -> None:
    """Close this loop's default session, if any (tests, orderly shutdown)."""
    session = _default_sessions.pop(asyncio.get_running_loop(), None)
    if session is not None:
        await session.close()


def join_room(config: RoomConfig, room_id: str, *, session: Session | None = None) -> Room:
    """Join a room like Trystero's ``joinRoom(config, roomId)``; call inside a running loop.

    Returns at once; relays connect and peers join in the background.
    """
    return (session or default_session()).join(config, room_id)
