// The live page: ping every second, chart the round trip, list broadcasts, reconnect with backoff.
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
  };
  // Exposed for the browser test and for anyone poking at the page in devtools.
  const page = (window.pingpong = { state: "connecting", rtt: null, samples: [], drops: [], reconnects: 0, lastClose: null });
  let socket = null;
  let pingTimer = null;
  let sentAt = null;
  let attempt = 0;

  // `detail` is the small print under the state: the close code and what happens next.
  function setState(state, detail) {
    page.state = state;
    els.state.dataset.state = state;
    document.body.dataset.state = state; // the stylesheet greys out figures that went stale
    els.state.textContent = state;
    els.detail.textContent = detail || "";
  }

  function connect() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    setState("connecting");
    socket = page.socket = new WebSocket(scheme + "//" + location.host + config.ws_path);
    socket.onopen = function () {
      attempt = 0;
      setState("open");
      sentAt = null;
      sendPing();
      pingTimer = setInterval(sendPing, 1000);
      refreshOnline(); // count ourselves now rather than at the next 5 s tick
    };
    socket.onmessage = function (message) { receive(message.data); };
    socket.onclose = function (event) {
      clearInterval(pingTimer);
      page.lastClose = event.code;
      if (page.state === "open") {
        page.drops.push(Date.now());
        draw();
      }
      if (config.terminal_codes.indexOf(event.code) !== -1) {
        setState("stopped", "code " + event.code + ", not reconnecting");
        return;
      }
      // Exponential backoff with full jitter, capped at 30 s.
      const delay = Math.random() * Math.min(30000, 500 * Math.pow(2, attempt++));
      setState("closed", "code " + event.code + ", retry " + (page.reconnects + 1) + " in " + (delay / 1000).toFixed(1) + " s");
      setTimeout(function () { page.reconnects++; connect(); }, delay);
    };
  }

  function sendPing() {
    if (sentAt !== null && performance.now() - sentAt < 5000) return; // one ping in flight
    sentAt = performance.now();
    socket.send(config.ping);
  }

  function receive(data) {
    if (data === config.pong) {
      const rtt = performance.now() - sentAt;
      sentAt = null;
      page.rtt = rtt;
      page.samples.push({ at: Date.now(), rtt: rtt });
      els.rtt.textContent = rtt.toFixed(1) + " ms";
      draw();
      return;
    }
    let event;
    try { event = JSON.parse(data); } catch (e) { return; }
    if (event.type === "broadcast") {
      const item = document.createElement("li");
      const when = document.createElement("time");
      when.textContent = new Date((event.sent_at || Date.now() / 1000) * 1000).toLocaleTimeString();
      item.appendChild(when);
      item.appendChild(document.createTextNode(event.text));
      els.broadcasts.insertBefore(item, els.broadcasts.firstChild);
      while (els.broadcasts.children.length > 50) els.broadcasts.removeChild(els.broadcasts.lastChild);
    } else if (event.type === "error") {
      console.warn("pingpong error:", event.error, event.detail);
    }
  }

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

  connect();
  refreshOnline();
  setInterval(refreshOnline, 5000);
  draw();
  setInterval(draw, 1000); // keep the window scrolling while no pongs arrive
})();
