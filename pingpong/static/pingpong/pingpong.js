// pingpong.js: a dependency-free client for pingpong's /ws/ (see the README, "JS client").
//
//   const client = new PingPong("/ws/", { getToken: () => fetch("/token").then(r => r.text()) });
//   client.on("state", (state, detail) => ...);          // connecting, open, closed (retrying), stopped
//   await client.subscribe("user:42", (data, publication) => ...);
//   await client.publish("chat:room", { text: "hi" });
//
// Requests carry an id; each returned Promise settles on the server's reply to that id: resolved with
// the reply event, rejected with the error event ({type: "error", error: <code>, detail}). The client
// reconnects with exponential backoff and full jitter and subscribes again to every topic it holds, with
// `since` (the last offset and epoch it got) on topics with history: a "recovery" event says per topic
// whether every missed publication is replayed, or the history was lost and the application must reload.
"use strict";
(function (root) {
  // The README's close-code table: after these a client does not reconnect by itself (4401 only with a
  // new token). The page passes the server's own list as `terminalCodes`; this is the fallback.
  const TERMINAL_CODES = [4003, 4008, 4009, 4401];
  const UNAUTHORIZED = 4401;
  const BACKOFF_FIRST_MS = 500;
  const BACKOFF_MAX_MS = 30000;
  const RESUBSCRIBE_BATCH = 15;
  const REPLY_TYPES = ["pong", "subscribed", "unsubscribed", "published", "authenticated", "error"];

  function clientError(code, detail) {
    return { type: "error", error: code, detail: detail };
  }

  class PingPong {
    /**
     * Connect to `url` (absolute ws:// or wss://, or a path such as "/ws/" on this page's host).
     * Options: `token` (sent as ?token=), `getToken()` (returns a token or a Promise of one; asked for
     * the first token when `token` is not given, after a close 4401 and on token_expiring; null means
     * "no token": stop), `terminalCodes`, `requestTimeout` (ms, default 10000), `autoConnect` (default true).
     * Without a token the connection is the session cookie's user, or anonymous.
     */
    constructor(url, options) {
      options = options || {};
      this.url = PingPong.resolve(url);
      this.token = options.token || null;
      this.getToken = options.getToken || null;
      this.terminalCodes = (options.terminalCodes || TERMINAL_CODES).slice();
      this.requestTimeout = options.requestTimeout || 10000;
      this.state = "idle";
      this.socket = null;
      this.lastClose = null;
      this.reconnects = 0; // connections opened after the first
      this.user = null; // the token's subject, once the server answered auth or refresh
      this._attempt = 0; // backoff step; reset once the server answers anything but an error
      this._nextId = 1;
      this._pending = new Map(); // request id -> {resolve, reject, timer, kind, topic}
      this._topics = new Map(); // topic -> {onPublication, onRecovery}: what is subscribed again after a reconnect
      this._positions = new Map(); // topic -> {offset, epoch}: the last publication (or subscribed reply) seen
      this._listeners = new Map(); // event name -> [listener]
      this._retryTimer = null;
      this._opened = false; // a connection opened once: the next ones count as reconnects
      this._askedFirstToken = false;
      if (options.autoConnect !== false) this.connect();
    }

    /** A ws:// or wss:// URL for `url`: a path is taken on this page's host, with wss: under https:. */
    static resolve(url) {
      if (/^wss?:\/\//.test(url)) return url;
      const scheme = root.location.protocol === "https:" ? "wss:" : "ws:";
      return scheme + "//" + root.location.host + url;
    }

    /**
     * Listen to an event; returns a function that removes the listener. Events:
     * "state" (state, {code, delay}), "open", "close" (CloseEvent), "broadcast" (event),
     * "publication" (event), "recovery" ({topic, recovered, missed, offset, epoch}: the outcome of a
     * re-subscribe with `since`, or `recovered: false` when a publication came in a new epoch),
     * "authenticated" (event), "token_expiring" (event), "error" (error event not answered to a pending
     * request, or a client-side problem), "message" (every parsed event).
     */
    on(name, listener) {
      if (!this._listeners.has(name)) this._listeners.set(name, []);
      this._listeners.get(name).push(listener);
      return () => {
        const list = this._listeners.get(name) || [];
        const at = list.indexOf(listener);
        if (at !== -1) list.splice(at, 1);
      };
    }

    _emit(name) {
      const args = Array.prototype.slice.call(arguments, 1);
      (this._listeners.get(name) || []).slice().forEach(function (listener) {
        try {
          listener.apply(null, args);
        } catch (error) {
          setTimeout(function () { throw error; }); // a listener's bug must not break the client
        }
      });
    }

    _setState(state, detail) {
      this.state = state;
      this._emit("state", state, detail || {});
    }

    /** Open the connection (done by the constructor unless `autoConnect: false`). */
    connect() {
      clearTimeout(this._retryTimer);
      this._retryTimer = null;
      if (this.socket || this.state === "connecting") return;
      this._setState("connecting");
      if (!this.token && this.getToken && !this._askedFirstToken) {
        this._askedFirstToken = true;
        this._fetchToken().then((token) => {
          if (token === null) this._stop({ code: null, reason: "no token" });
          else this._open();
        });
        return;
      }
      this._open();
    }

    _open() {
      if (this.state === "stopped" || this.socket) return; // one socket at a time
      const url = this.token ? this.url + (this.url.indexOf("?") === -1 ? "?" : "&") + "token=" + encodeURIComponent(this.token) : this.url;
      const socket = (this.socket = new WebSocket(url));
      socket.onopen = () => {
        if (this._opened) this.reconnects++;
        this._opened = true;
        this._setState("open");
        this._emit("open");
        this._resubscribe(socket, Array.from(this._topics.keys()));
      };
      socket.onmessage = (message) => this._receive(message.data);
      socket.onclose = (event) => this._closed(socket, event);
    }

    // Subscribe again to every topic held, RESUBSCRIBE_BATCH a second: the server's rate limit (20/s
    // after a burst of 40, by default) closes with the terminal 4008 a client that sends more at once.
    _resubscribe(socket, topics) {
      if (socket !== this.socket || topics.length === 0) return;
      topics.slice(0, RESUBSCRIBE_BATCH).forEach((topic) => {
        if (this._topics.has(topic)) this._subscribeRequest(topic, true);
      });
      if (topics.length > RESUBSCRIBE_BATCH) {
        setTimeout(() => this._resubscribe(socket, topics.slice(RESUBSCRIBE_BATCH)), 1000);
      }
    }

    /** Close for good: no reconnect. Pending requests are rejected with error "closed". */
    close() {
      this._stop({ code: 1000, reason: "closed by the client" });
    }

    _stop(detail) {
      if (this.state === "stopped" && !this.socket) return;
      clearTimeout(this._retryTimer);
      this._retryTimer = null;
      const socket = this.socket;
      this.socket = null;
      this._setState("stopped", detail);
      this._rejectPending(true);
      if (socket) {
        socket.onclose = null;
        socket.close(1000);
      }
    }

    _closed(socket, event) {
      if (socket !== this.socket) return;
      this.socket = null;
      this.lastClose = event.code;
      this._emit("close", event);
      this._rejectPending(false);
      if (this.state === "stopped") return;
      if (event.code === UNAUTHORIZED && this.getToken) {
        this._setState("closed", { code: event.code, reason: "getting a new token" });
        this._fetchToken().then((token) => {
          if (token === null) this._stop({ code: event.code, reason: "no new token" });
          else this._retry(event.code);
        });
        return;
      }
      if (this.terminalCodes.indexOf(event.code) !== -1) {
        this._stop({ code: event.code, reason: "not reconnecting" });
        return;
      }
      this._retry(event.code);
    }

    // Exponential backoff with full jitter: a random delay up to 0.5 s, 1 s, 2 s, ... capped at 30 s.
    _retry(code) {
      if (this.state === "stopped") return;
      const delay = Math.random() * Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * Math.pow(2, this._attempt++));
      this._setState("closed", { code: code, delay: delay });
      this._retryTimer = setTimeout(() => {
        this._retryTimer = null;
        this._setState("connecting");
        this._open();
      }, delay);
    }

    // A new token from getToken, or null when there is none (it returned nothing, or failed).
    _fetchToken() {
      return Promise.resolve()
        .then(() => this.getToken())
        .then(
          (token) => {
            if (token) this.token = token;
            return token || null;
          },
          (error) => {
            this._emit("error", clientError("get_token_failed", String(error)));
            return null;
          }
        );
    }

    _receive(text) {
      let event;
      try {
        event = JSON.parse(text);
      } catch (error) {
        return; // "pong!" and anything else that is not an event
      }
      if (!event || typeof event !== "object") return;
      if (event.type !== "error") this._attempt = 0; // the server let us in: the next drop starts over
      this._emit("message", event);
      // Broadcasts and publications carry ids of their own: only replies settle requests.
      const pending = REPLY_TYPES.indexOf(event.type) !== -1 ? this._pending.get(event.id) : undefined;
      if (pending) {
        this._pending.delete(event.id);
        clearTimeout(pending.timer);
        if (event.type === "error") {
          if (pending.kind === "subscribe") this._forget(pending.topic);
          pending.reject(event);
        } else {
          pending.resolve(event);
        }
      }
      switch (event.type) {
        case "publication": {
          if (!this._advance(event)) break; // seen already: the application never gets a duplicate
          const held = this._topics.get(event.topic);
          if (held) held.onPublication(event.data, event);
          this._emit("publication", event);
          break;
        }
        case "broadcast":
          this._emit("broadcast", event);
          break;
        case "authenticated":
          this.user = event.user;
          this._emit("authenticated", event);
          break;
        case "token_expiring":
          this._emit("token_expiring", event);
          if (this.getToken) this._refresh();
          break;
        case "error":
          if (!pending) this._emit("error", event);
          break;
      }
    }

    // Move the topic's position to a publication's offset; false for one already seen (same epoch, an
    // offset not past the last). A publication in another epoch means the history was lost while
    // connected (Redis flushed or restarted): reported as a recovery that did not recover.
    _advance(event) {
      if (typeof event.offset !== "number" || typeof event.epoch !== "string") return true; // no history
      const position = this._positions.get(event.topic);
      if (position && position.epoch === event.epoch && event.offset <= position.offset) return false;
      this._positions.set(event.topic, { offset: event.offset, epoch: event.epoch });
      if (position && position.epoch !== event.epoch && this._topics.has(event.topic)) {
        this._recovered({ topic: event.topic, recovered: false, missed: null, offset: event.offset, epoch: event.epoch });
      }
      return true;
    }

    // The position a `subscribed` reply gives. After `recovered: true` the missed publications follow
    // the reply, so the position stays where it was and moves as they arrive; otherwise it is the
    // topic's current one (the server sends nothing at or before it).
    _subscribed(topic, since, reply) {
      if (!this._topics.has(topic)) return;
      const positioned = typeof reply.offset === "number" && typeof reply.epoch === "string";
      if (positioned && !(since && reply.recovered === true)) {
        this._positions.set(topic, { offset: reply.offset, epoch: reply.epoch });
      }
      if (!since) return;
      const recovered = reply.recovered === true;
      this._recovered({
        topic: topic,
        recovered: recovered,
        missed: recovered ? reply.offset - since.offset : null,
        offset: positioned ? reply.offset : null,
        epoch: positioned ? reply.epoch : null,
      });
    }

    _recovered(outcome) {
      const held = this._topics.get(outcome.topic);
      if (held && held.onRecovery) {
        try {
          held.onRecovery(outcome);
        } catch (error) {
          setTimeout(function () { throw error; }); // as for listeners
        }
      }
      this._emit("recovery", outcome);
    }

    _forget(topic) {
      this._topics.delete(topic);
      this._positions.delete(topic);
    }

    _refresh() {
      this._fetchToken().then((token) => {
        if (token !== null && this.state === "open") {
          this._request({ type: "refresh", token: token }).catch((error) => this._emit("error", error));
        }
      });
    }

    // Send a request with a fresh id; the Promise settles on the reply with that id.
    _request(request, extra) {
      if (!this.socket || this.socket.readyState !== WebSocket.OPEN) {
        return Promise.reject(clientError("disconnected", "Not connected; nothing was sent."));
      }
      const id = this._nextId++;
      request.id = id;
      return new Promise((resolve, reject) => {
        const timer = setTimeout(() => {
          this._pending.delete(id);
          reject(clientError("timeout", "No reply within " + this.requestTimeout + " ms."));
        }, this.requestTimeout);
        this._pending.set(id, Object.assign({ resolve: resolve, reject: reject, timer: timer }, extra || {}));
        this.socket.send(JSON.stringify(request));
      });
    }

    // On a drop, requests waiting for a reply are rejected, except subscribes the next connection
    // sends again (unless the client stopped).
    _rejectPending(stopping) {
      this._pending.forEach((pending, id) => {
        if (pending.kind === "subscribe" && !stopping) {
          clearTimeout(pending.timer); // parked until the next connection subscribes again
          pending.timer = null;
          return;
        }
        this._pending.delete(id);
        clearTimeout(pending.timer);
        pending.reject(
          stopping
            ? clientError("closed", "The client was closed before the reply.")
            : clientError("disconnected", "The connection closed before the reply; a publish may or may not have been sent.")
        );
      });
    }

    // Send a subscribe for `topic`. The callers still waiting for one (a subscribe() made while
    // disconnected, or one a drop interrupted) are settled by this request's reply; a re-subscribe
    // after a reconnect that nobody waits for reports a refusal as an "error" event. A re-subscribe
    // to a topic with a known position carries it as `since`.
    _subscribeRequest(topic, resubscribe) {
      const waiting = [];
      this._pending.forEach((pending, id) => {
        if (pending.kind === "subscribe" && pending.topic === topic) {
          waiting.push(pending);
          this._pending.delete(id);
          clearTimeout(pending.timer);
        }
      });
      const position = resubscribe ? this._positions.get(topic) : undefined;
      const since = position ? { offset: position.offset, epoch: position.epoch } : null;
      const request = since ? { type: "subscribe", topic: topic, since: since } : { type: "subscribe", topic: topic };
      const sent = this._request(request, { kind: "subscribe", topic: topic });
      sent.then(
        (reply) => {
          this._subscribed(topic, since, reply);
          waiting.forEach((pending) => pending.resolve(reply));
        },
        (error) => {
          if (error.error === "disconnected") return; // still waiting: sent again on the next connection
          if (resubscribe && waiting.length === 0 && error.error !== "timeout") this._emit("error", Object.assign({ topic: topic }, error));
          waiting.forEach((pending) => pending.reject(error));
        }
      );
      return sent;
    }

    /**
     * Subscribe to `topic`; `onPublication(data, event)` is called for every publication, never twice for
     * one offset. Resolves with the `subscribed` reply, rejects with the error (`forbidden`, ...) and
     * forgets the topic. While disconnected the subscribe is sent once connected. Every topic held is
     * subscribed again after a reconnect, with `since` where it has history; `options.onRecovery(outcome)`
     * gets the outcome, as the "recovery" event does.
     */
    subscribe(topic, onPublication, options) {
      this._topics.set(topic, {
        onPublication: onPublication || function () {},
        onRecovery: (options && options.onRecovery) || null,
      });
      if (this.socket && this.socket.readyState === WebSocket.OPEN) return this._subscribeRequest(topic);
      return new Promise((resolve, reject) => {
        // Parked without a timer until the next connection sends it (onopen).
        this._pending.set("parked:" + this._nextId++, { resolve: resolve, reject: reject, timer: null, kind: "subscribe", topic: topic });
      });
    }

    /** Stop receiving `topic`; resolves with the `unsubscribed` reply (at once when disconnected). */
    unsubscribe(topic) {
      this._forget(topic);
      this._pending.forEach((pending, id) => {
        if (pending.kind === "subscribe" && pending.topic === topic) {
          this._pending.delete(id);
          clearTimeout(pending.timer);
          pending.reject(clientError("unsubscribed", "unsubscribe() was called before the reply."));
        }
      });
      if (!this.socket || this.socket.readyState !== WebSocket.OPEN) {
        return Promise.resolve({ type: "unsubscribed", topic: topic });
      }
      return this._request({ type: "unsubscribe", topic: topic });
    }

    /** Publish `data` (any JSON) to `topic` where its namespace allows it; resolves with `published`. */
    publish(topic, data) {
      return this._request({ type: "publish", topic: topic, data: data });
    }

    /** A JSON ping; resolves with {rtt: <ms>, server_time: <epoch seconds>}. */
    ping() {
      const sentAt = root.performance ? root.performance.now() : Date.now();
      return this._request({ type: "ping" }).then(function (pong) {
        const now = root.performance ? root.performance.now() : Date.now();
        return { rtt: now - sentAt, server_time: pong.server_time };
      });
    }

    /** The offset and epoch of the last publication of `topic` seen (or of its reply), or null. */
    position(topic) {
      const position = this._positions.get(topic);
      return position ? { offset: position.offset, epoch: position.epoch } : null;
    }

    /** The topics this client holds (subscribed, or to be subscribed once connected). */
    topics() {
      return Array.from(this._topics.keys());
    }
  }

  root.PingPong = PingPong;
})(typeof window !== "undefined" ? window : globalThis);
