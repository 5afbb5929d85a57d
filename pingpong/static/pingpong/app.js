// The live page on pingpong.js: ping every second, chart the round trip, list broadcasts, subscribe to topics
// and say, after a reconnect, whether each topic's missed publications were recovered.
"use strict";
(function () {
  const config = JSON.parse(document.getElementById("config").textContent);
  const WINDOW_MS = 60000;
  const els = {
    state: document.getElementById("state"),
    detail: document.getElementById("state-detail"),
    rtt: document.getElementById("rtt"),
    online: document.getElementById("online"),
    chart: document.getElementById("chart"),
    broadcasts: document.getElementById("broadcasts"),
    topicForm: document.getElementById("topic-form"),
    topic: document.getElementById("topic"),
    topicStatus: document.getElementById("topic-status"),
    subscriptions: document.getElementById("subscriptions"),
    publications: document.getElementById("publications"),
  };
  // Everything goes through pingpong.js: connection, backoff, close-code policy, topics.
  const client = new PingPong(config.ws_path, { terminalCodes: config.terminal_codes, autoConnect: false });
  // Exposed for the browser test and for anyone poking at the page in devtools.
  const page = (window.pingpong = {
    client: client,
    state: client.state,
    rtt: null,
    samples: [],
    drops: [],
    topics: {},
    recoveries: [], // every recovery outcome, oldest first
  });
  ["socket", "reconnects", "lastClose"].forEach(function (name) {
    Object.defineProperty(page, name, { get: function () { return client[name]; } });
  });
  let pingTimer = null;
  let pinging = false;

  // `detail` is the small print under the state: the close code and what happens next.
  client.on("state", function (state, detail) {
    if (page.state === "open" && state !== "open") {
      page.drops.push(Date.now());
      draw();
    }
    page.state = state;
    els.state.dataset.state = state;
    document.body.dataset.state = state; // the stylesheet greys out figures that went stale
    els.state.textContent = state;
    let small = "";
    if (state === "closed" && detail.delay !== undefined) {
      small = "code " + detail.code + ", retry " + (client.reconnects + 1) + " in " + (detail.delay / 1000).toFixed(1) + " s";
    } else if (state === "closed" || state === "stopped") {
      small = "code " + detail.code + (detail.reason ? ", " + detail.reason : "");
    }
    els.detail.textContent = small;
    clearInterval(pingTimer);
    if (state === "open") {
      pinging = false;
      sendPing();
      pingTimer = setInterval(sendPing, 1000);
      refreshOnline(); // count ourselves now rather than at the next 5 s tick
    }
  });

  function sendPing() {
    if (pinging) return; // one ping in flight; the client times it out
    pinging = true;
    client.ping().then(
      function (pong) {
        pinging = false;
        page.rtt = pong.rtt;
        page.samples.push({ at: Date.now(), rtt: pong.rtt });
        els.rtt.textContent = pong.rtt.toFixed(1) + " ms";
        draw();
      },
      function () { pinging = false; }
    );
  }

  client.on("broadcast", function (event) {
    prepend(els.broadcasts, event.sent_at, [document.createTextNode(event.text)]);
  });
  // After a reconnect: the missed publications follow (listed as they come), or the history is gone and
  // the page reloads what it shows of the topic: its publications so far may have a gap, so they go.
  client.on("recovery", function (outcome) {
    page.recoveries.push(outcome);
    if (!outcome.recovered) {
      els.publications.querySelectorAll('li[data-topic="' + CSS.escape(outcome.topic) + '"]').forEach(function (item) { item.remove(); });
    }
    const item = els.subscriptions.querySelector('li[data-topic="' + CSS.escape(outcome.topic) + '"]');
    if (!item) return;
    const label = item.querySelector(".topic-recovery");
    label.dataset.recovered = String(outcome.recovered);
    label.textContent = outcome.recovered ? "recovered " + outcome.missed + " missed" : "history lost, reloaded";
  });
  client.on("error", function (event) {
    if (event.topic) showTopic(event.topic, "refused", event.error); // a re-subscribe after a reconnect was refused
    console.warn("pingpong error:", event.error, event.detail);
  });

  // A list item that starts with the time; the list keeps the newest 50.
  function prepend(list, sentAt, nodes, topic) {
    const item = document.createElement("li");
    if (topic) item.dataset.topic = topic;
    const when = document.createElement("time");
    when.textContent = new Date((sentAt || Date.now() / 1000) * 1000).toLocaleTimeString();
    item.appendChild(when);
    nodes.forEach(function (node) { item.appendChild(node); });
    list.insertBefore(item, list.firstChild);
    while (list.children.length > 50) list.removeChild(list.lastChild);
  }

  // Topics: subscribe from the box, list each topic with its state, show publications as they come.
  function showTopic(topic, state, error) {
    page.topics[topic] = state;
    let item = els.subscriptions.querySelector('li[data-topic="' + CSS.escape(topic) + '"]');
    if (state === "gone") {
      if (item) item.remove();
      return;
    }
    if (!item) {
      item = document.createElement("li");
      item.dataset.topic = topic;
      const name = document.createElement("code");
      name.textContent = topic;
      const label = document.createElement("span");
      label.className = "topic-state";
      const recovery = document.createElement("small");
      recovery.className = "topic-recovery";
      const leave = document.createElement("button");
      leave.type = "button";
      leave.textContent = "unsubscribe";
      leave.onclick = function () {
        client.unsubscribe(topic).catch(function () {});
        showTopic(topic, "gone");
      };
      item.append(name, " ", label, " ", recovery, " ", leave);
      els.subscriptions.appendChild(item);
    }
    item.dataset.state = state;
    item.querySelector(".topic-state").textContent = error ? state + ": " + error : state;
    item.querySelector("button").hidden = state === "refused";
  }

  els.topicForm.addEventListener("submit", function (submitted) {
    submitted.preventDefault();
    const topic = els.topic.value.trim();
    if (!topic) return;
    els.topicStatus.textContent = "";
    showTopic(topic, "subscribing");
    client
      .subscribe(topic, function (data, event) {
        const name = document.createElement("code");
        name.textContent = event.topic;
        const text = document.createElement("span");
        text.className = "data";
        text.textContent = JSON.stringify(data);
        prepend(els.publications, event.sent_at, [name, document.createTextNode(" "), text], event.topic);
      })
      .then(
        function () { if (page.topics[topic] === "subscribing") showTopic(topic, "subscribed"); },
        function (error) {
          if (page.topics[topic] !== "subscribing") return; // unsubscribed meanwhile
          showTopic(topic, "refused", error.error);
          els.topicStatus.dataset.error = error.error;
          els.topicStatus.textContent = topic + ": " + error.error + (error.detail ? " (" + error.detail + ")" : "");
        }
      );
  });

  // Samples further apart than this, or either side of a drop, are two runs: the line breaks there.
  const GAP_MS = 3000;

  function draw() {
    const now = Date.now();
    page.samples = page.samples.filter(function (s) { return now - s.at <= WINDOW_MS; });
    page.drops = page.drops.filter(function (at) { return now - at <= WINDOW_MS; });
    // Draw in CSS pixels on a backing store sized for the screen, so lines stay crisp.
    const ratio = window.devicePixelRatio || 1;
    const w = els.chart.clientWidth || 640, h = els.chart.clientHeight || 180;
    if (els.chart.width !== Math.round(w * ratio)) {
      els.chart.width = Math.round(w * ratio);
      els.chart.height = Math.round(h * ratio);
    }
    const ctx = els.chart.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, w, h);
    const left = 48, right = 8, top = 10, bottom = 22;
    const plotW = w - left - right, plotH = h - top - bottom;
    const max = niceMax(Math.max.apply(null, [5].concat(page.samples.map(function (s) { return s.rtt; }))) * 1.15);
    const x = function (at) { return left + plotW * (1 - (now - at) / WINDOW_MS); };
    const y = function (rtt) { return top + plotH * (1 - rtt / max); };

    ctx.font = "11px system-ui, sans-serif";
    ctx.lineWidth = 1;
    ctx.textBaseline = "middle";
    [0, max / 2, max].forEach(function (v) {
      ctx.strokeStyle = v === 0 ? "#b9bfcc" : "#eceef3";
      ctx.beginPath();
      ctx.moveTo(left, Math.round(y(v)) + 0.5);
      ctx.lineTo(w - right, Math.round(y(v)) + 0.5);
      ctx.stroke();
      ctx.fillStyle = "#6b7385";
      ctx.textAlign = "right";
      ctx.fillText(formatMs(v), left - 6, y(v));
    });
    ctx.textBaseline = "alphabetic";
    ctx.textAlign = "left";
    ctx.fillText("-60 s", left, h - 6);
    ctx.textAlign = "right";
    ctx.fillText("now", w - right, h - 6);

    // A dashed red line where the connection dropped.
    ctx.strokeStyle = "#d0574f";
    ctx.setLineDash([3, 3]);
    page.drops.forEach(function (at) {
      ctx.beginPath();
      ctx.moveTo(Math.round(x(at)) + 0.5, top);
      ctx.lineTo(Math.round(x(at)) + 0.5, top + plotH);
      ctx.stroke();
    });
    ctx.setLineDash([]);

    ctx.strokeStyle = "#2f6fde";
    ctx.fillStyle = "#2f6fde";
    ctx.lineWidth = 2;
    ctx.lineJoin = "round";
    ctx.beginPath();
    page.samples.forEach(function (s, i) {
      const previous = page.samples[i - 1];
      const dropped = previous && page.drops.some(function (at) { return at > previous.at && at < s.at; });
      if (!previous || dropped || s.at - previous.at > GAP_MS) ctx.moveTo(x(s.at), y(s.rtt));
      else ctx.lineTo(x(s.at), y(s.rtt));
    });
    ctx.stroke();
    page.samples.forEach(function (s, i) {
      ctx.beginPath();
      ctx.arc(x(s.at), y(s.rtt), i === page.samples.length - 1 ? 3.5 : 2, 0, 2 * Math.PI);
      ctx.fill();
    });
  }

  // The next 1, 2 or 5 times a power of ten: axis labels that read at a glance.
  function niceMax(value) {
    const power = Math.pow(10, Math.floor(Math.log10(value)));
    const steps = [1, 2, 5, 10];
    for (let i = 0; i < steps.length; i++) if (value <= steps[i] * power) return steps[i] * power;
    return 10 * power;
  }

  function formatMs(v) {
    return (v < 10 && v !== 0 ? v.toFixed(1) : v.toFixed(0)) + " ms";
  }

  function refreshOnline() {
    fetch(config.stats_url, { headers: { Accept: "application/json" } })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (stats) { if (stats) els.online.textContent = stats.connections + " online"; })
      .catch(function () {});
  }

  client.connect();
  refreshOnline();
  setInterval(refreshOnline, 5000);
  draw();
  setInterval(draw, 1000); // keep the window scrolling while no pongs arrive
})();
