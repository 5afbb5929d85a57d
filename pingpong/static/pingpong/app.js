// The live page: ping every second, chart the round trip, list broadcasts, reconnect with backoff.
"use strict";
(function () {
  const config = JSON.parse(document.getElementById("config").textContent);
  const WINDOW_MS = 60000;
  const els = {
    state: document.getElementById("state"),
    rtt: document.getElementById("rtt"),
    online: document.getElementById("online"),
    chart: document.getElementById("chart"),
    broadcasts: document.getElementById("broadcasts"),
  };
  // Exposed for the browser test and for anyone poking at the page in devtools.
  const page = (window.pingpong = { state: "connecting", rtt: null, samples: [], reconnects: 0, lastClose: null });
  let socket = null;
  let pingTimer = null;
  let sentAt = null;
  let attempt = 0;

  function setState(state, text) {
    page.state = state;
    els.state.dataset.state = state;
    els.state.textContent = text || state;
  }

  function connect() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    setState("connecting");
    socket = new WebSocket(scheme + "//" + location.host + config.ws_path);
    socket.onopen = function () {
      attempt = 0;
      setState("open");
      sentAt = null;
      sendPing();
      pingTimer = setInterval(sendPing, 1000);
    };
    socket.onmessage = function (message) { receive(message.data); };
    socket.onclose = function (event) {
      clearInterval(pingTimer);
      page.lastClose = event.code;
      if (config.terminal_codes.indexOf(event.code) !== -1) {
        setState("stopped", "closed (" + event.code + "): not reconnecting");
        return;
      }
      // Exponential backoff with full jitter, capped at 30 s.
      const delay = Math.random() * Math.min(30000, 500 * Math.pow(2, attempt++));
      setState("closed", "closed (" + event.code + "), retrying in " + (delay / 1000).toFixed(1) + " s");
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

  function draw() {
    const now = Date.now();
    page.samples = page.samples.filter(function (s) { return now - s.at <= WINDOW_MS; });
    const ctx = els.chart.getContext("2d");
    const w = els.chart.width, h = els.chart.height, pad = 28;
    ctx.clearRect(0, 0, w, h);
    const max = Math.max(5, Math.max.apply(null, page.samples.map(function (s) { return s.rtt; })) * 1.2);
    ctx.fillStyle = "#6b7385";
    ctx.font = "11px system-ui, sans-serif";
    ctx.fillText(max.toFixed(0) + " ms", 2, 12);
    ctx.fillText("0", 2, h - pad + 4);
    ctx.fillText("-60 s", pad, h - 6);
    ctx.fillText("now", w - 26, h - 6);
    ctx.strokeStyle = "#d9dde5";
    ctx.strokeRect(pad, 4, w - pad - 4, h - pad - 4);
    ctx.strokeStyle = "#2f6fde";
    ctx.lineWidth = 2;
    ctx.beginPath();
    page.samples.forEach(function (s, i) {
      const x = pad + (w - pad - 4) * (1 - (now - s.at) / WINDOW_MS);
      const y = h - pad - (h - pad - 8) * (s.rtt / max);
      if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
    });
    ctx.stroke();
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
})();
