/*
 * client.js: the protocol client shared by the studio, overlay and watch pages.
 * It never touches the DOM; the widgets that draw with it are in ui.js (load this first).
 *
 * Speaks the wire contract in docs/protocol.md: HTTP with "Authorization: Bearer <token>",
 * and the room WebSocket /ws/{room}?token=...&since=<seq> with subprotocol "livegift.json".
 *
 *  - reconnects by itself with exponential backoff and jitter;
 *  - resumes with since = the last durable seq it saw, so no event is lost across a reconnect;
 *  - drops durable events it has already seen (seq <= last seen), so none is shown twice;
 *  - accepts a frame holding one event object or an array of events;
 *  - matches acks to ops by "req"; a gift op that was sent but not acked when the socket
 *    dropped is sent again with the same req after the reconnect (the server charges a
 *    gift req once), so a tap is never lost and never charged twice;
 *  - turns error codes into clear human messages (ERROR_TEXT);
 *  - follows a creator across streams on /ws/creator/{user}?key=... (the overlay's stable URL);
 *  - swaps in a new token on open sockets (op "refresh": LiveGift.refresh(token), or a
 *    postMessage {type: "livegift.token", token} from the embedding app), asks that app for
 *    one before the token expires, and stops with "token_expired" when it did expire;
 *  - keeps a room's running totals (Totals) and knows when two gifts are one streak.
 *
 * No dependencies, no build step. Exposes window.LiveGift.
 */
(function (global) {
  "use strict";

  // Durable event types: they carry a seq and are replayed on resume. The same set as
  // livegift.events.DURABLE; tests/test_contract_drift.py reads the block between the
  // contract markers, so keep one "type: true," a line there.
  // contract:DURABLE begin
  var DURABLE = {
    gift: true,
    shoutout: true,
    stream_ended: true
  };
  // contract:DURABLE end

  // Close codes after which reconnecting cannot help. 4401 with the reason "token_expired"
  // is the token running out on an open socket (the state "token_expired").
  var FINAL_CLOSE = { 4401: "unauthorized", 4403: "forbidden", 4404: "not_found" };
  var TOKEN_EXPIRED = "token_expired";
  // Ask the embedding app for a new token this long before the current one expires.
  var EXPIRY_NOTICE_MS = 60000;
  var BACKOFF_MIN_MS = 500;
  var BACKOFF_MAX_MS = 10000;
  var WELCOME_TIMEOUT_MS = 10000;
  var REQUEST_TIMEOUT_MS = 15000;

  // ---------------------------------------------------------------- helpers

  var pageContext = null;
  // Query parameters that are credentials: read once, then taken out of the address bar.
  var SECRET_PARAMS = ["token", "key"];

  /**
   * Room (last path segment), token and the other query parameters of this page, read once.
   * `creator` is set on /overlay/u/{user} (with `key`). The token and the key are taken out
   * of the address bar (history.replaceState) and kept for this tab in sessionStorage, so a
   * reload still works but the URL on screen, in the history and in a screenshot holds none.
   */
  function context() {
    if (pageContext) return pageContext;
    var parts = location.pathname.split("/").filter(Boolean);
    var room = "";
    try { room = decodeURIComponent(parts[parts.length - 1] || ""); } catch (e) { room = ""; }
    var params = new URLSearchParams(location.search);
    var found = {};
    SECRET_PARAMS.forEach(function (name) {
      found[name] = params.get(name) || remembered(name, null);
      if (params.has(name)) { remembered(name, found[name]); params.delete(name); }
    });
    if (found.token !== null || found.key !== null) {
      var query = params.toString();
      try {
        history.replaceState(history.state, "", location.pathname + (query ? "?" + query : "") + location.hash);
      } catch (e) { /* an opaque origin: nothing to tidy */ }
    }
    pageContext = { room: room, token: found.token || "", key: found.key || "", params: params,
      creator: parts.length === 3 && parts[1] === "u" ? room : "" };
    return pageContext;
  }

  /** This tab's copy of a credential for this page (value null: read it). */
  function remembered(name, value) {
    var slot = "livegift." + name + ":" + location.pathname;
    try {
      if (value === null) return global.sessionStorage.getItem(slot);
      global.sessionStorage.setItem(slot, value);
    } catch (e) { /* storage off: a reload then needs the link again */ }
    return value;
  }

  /** A token's exp claim in ms (0 when it cannot be read). */
  function tokenExpiry(token) {
    try {
      var part = String(token).split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      var exp = JSON.parse(global.atob(part + "===".slice((part.length + 3) % 4))).exp;
      return typeof exp === "number" ? exp * 1000 : 0;
    } catch (e) { return 0; }
  }

  /** A fresh client request id (1-64 chars). */
  function newReq() {
    if (global.crypto && typeof global.crypto.randomUUID === "function") {
      return global.crypto.randomUUID();
    }
    var bytes = new Uint8Array(16);
    if (global.crypto && global.crypto.getRandomValues) {
      global.crypto.getRandomValues(bytes);
    } else {
      for (var i = 0; i < 16; i++) bytes[i] = Math.floor(Math.random() * 256);
    }
    return Array.prototype.map.call(bytes, function (b) {
      return (b < 16 ? "0" : "") + b.toString(16);
    }).join("");
  }

  // ---------------------------------------------------------------- errors

  // A clear message for each error code: every code of livegift.errors.BY_CODE (docs/
  // protocol.md "Error codes"), then the ones this client makes itself. Checked by
  // tests/test_contract_drift.py: keep one 'code: "text",' a line between the markers.
  // contract:ERROR_TEXT begin
  var ERROR_TEXT = {
    not_adult: "You must be 18 or older to send gifts.",
    insufficient_funds: "Not enough coins for that gift. Recharge to keep gifting.",
    stream_not_live: "This stream has ended, so gifts can't be sent any more.",
    self_gift: "You can't send gifts to your own stream.",
    rate_limited: "You're sending gifts too fast. Wait a moment and try again.",
    unknown_gift: "That gift isn't available any more. Pick another one.",
    bad_request: "That request wasn't valid. Please try again.",
    idempotency_conflict: "That request clashed with an earlier one. Please try again.",
    unauthorized: "Your sign-in link has expired or is invalid. Open a fresh link.",
    token_expired: "Your session ended \u2014 reload with a new link.",
    forbidden: "You're not allowed to do that here.",
    not_found: "This stream doesn't exist or has ended.",
    unknown_package: "That coin package isn't sold in your region.",
    invalid_receipt: "The purchase couldn't be verified. You were not charged twice; try again.",
    price_mismatch: "The purchase price didn't match the price list. Please try again.",
    unavailable: "The service is busy right now. Please try again in a moment.",
    below_minimum: "That's below the minimum cash-out.",
    payout_limit: "That's over the daily cash-out limit. Try again tomorrow.",
    internal: "Something went wrong on our side. Please try again.",
    too_many_connections: "Too many open windows or devices on this account. Close one and try again.",
    // made by this client, never sent by the server:
    network: "Can't reach the server. Check your connection.",
    timeout: "No answer from the server yet. Check the feed before trying again.",
    connection_lost: "The connection dropped before the server answered. Check the feed before trying again.",
    dev_receipts_disabled: "Recharging from this page only works on a development server."
  };
  // contract:ERROR_TEXT end

  // Where an action needs other words than ERROR_TEXT's.
  var CONTEXT_TEXT = {
    recharge: { not_adult: "You must be 18 or older to buy coins." },
    shoutout: { forbidden: "Only the stream's creator can send shout-outs.",
                stream_not_live: "The stream has ended, so shout-outs can't be sent." },
    end: { forbidden: "Only the stream's creator can end it." }
  };

  /** A clear human message for an error code (docs/protocol.md, "Error codes"), optionally for a context. */
  function errorText(code, fallback, where) {
    var specific = where && CONTEXT_TEXT[where] && CONTEXT_TEXT[where][code];
    return specific || ERROR_TEXT[code] || fallback || "Something went wrong. Please try again.";
  }

  function ApiError(code, message, status) {
    this.name = "ApiError";
    this.code = code;
    this.message = message;
    this.status = status || 0;
  }
  ApiError.prototype = Object.create(Error.prototype);

  function codeForStatus(status) {
    return { 400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
      409: "idempotency_conflict", 429: "rate_limited", 503: "unavailable" }[status] || "internal";
  }

  /** JSON over HTTP. Resolves with the body; rejects with an ApiError {code, message, status}. */
  function api(method, path, body, token) {
    var headers = { Accept: "application/json" };
    if (token) headers.Authorization = "Bearer " + token;
    var init = { method: method, headers: headers, cache: "no-store" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    return fetch(path, init).then(function (res) {
      return res.text().then(function (text) {
        var data = null;
        if (text) { try { data = JSON.parse(text); } catch (e) { data = null; } }
        if (!res.ok) {
          var err = (data && data.error) || {};
          throw new ApiError(err.code || codeForStatus(res.status), err.message || res.statusText, res.status);
        }
        return data;
      });
    }, function () {
      throw new ApiError("network", ERROR_TEXT.network, 0);
    });
  }

  // ---------------------------------------------------------------- WebSocket client

  /**
   * connect({room, token, since, history, onEvent(ev, meta), onStatus(state, detail)}) -> Client
   * connect({creator, key, onEvent, onStatus}) -> Client following a creator's live stream
   *   (/ws/creator/{creator}?key=): the room changes with each new stream, "stream_ended"
   *   does not stop it, and "offline" says no stream is live.
   *
   * states: "connecting", "live", "offline", "reconnecting" (detail: {delay}), "ended",
   *         "unauthorized", "token_expired", "forbidden", "not_found", "closed".
   */
  function Client(opts) {
    this.room = opts.room || "";
    this.token = opts.token || "";
    this.creator = opts.creator || "";
    this.key = opts.key || "";
    this.onEvent = opts.onEvent || function () {};
    this.onStatus = opts.onStatus || function () {};
    this.lastSeq = (opts.since === undefined || opts.since === null) ? null : Number(opts.since);
    // history: on the first join replay what the room's history still holds (since=0);
    // onEvent(ev, {history: true}) then marks those older events.
    if (opts.history && this.lastSeq === null) this.lastSeq = 0;
    this.historyUpTo = null;      // the first welcome's seq when history was asked for
    this.wantHistory = !!opts.history;
    this.state = "idle";
    this.ws = null;
    this.welcomed = false;
    this.stopped = false;
    this.ended = false;
    this.attempt = 0;
    this.failuresBeforeWelcome = 0;
    this.holdUntil = 0;
    this.timer = null;
    this.welcomeTimer = null;
    this.pending = new Map();   // req -> {op, resolve, reject, timer, sent}
    this.stats = { connects: 0, duplicates: 0, gaps: 0, frames: 0 };
  }

  Client.prototype.start = function () { this._open(); return this; };

  Client.prototype._setState = function (state, detail) {
    this.state = state;
    try { this.onStatus(state, detail || {}); } catch (e) { reportError(e); }
  };

  Client.prototype._url = function () {
    var proto = location.protocol === "https:" ? "wss:" : "ws:";
    var q = new URLSearchParams();
    if (this.creator) {
      q.set("key", this.key);
      return proto + "//" + location.host + "/ws/creator/" + encodeURIComponent(this.creator) + "?" + q.toString();
    }
    q.set("token", this.token);
    if (this.lastSeq !== null) q.set("since", String(this.lastSeq));
    return proto + "//" + location.host + "/ws/" + encodeURIComponent(this.room) + "?" + q.toString();
  };

  Client.prototype._open = function () {
    var self = this;
    if (this.stopped) return;
    this.timer = null;
    this._setState(this.stats.connects ? "reconnecting" : "connecting", { attempt: this.attempt });
    var ws;
    try {
      ws = new WebSocket(this._url(), "livegift.json");
    } catch (e) {
      this._scheduleReconnect(null);
      return;
    }
    this.ws = ws;
    this.welcomed = false;
    ws.onmessage = function (m) { if (ws === self.ws) self._onFrame(m.data); };
    ws.onclose = function (e) { self._onClose(ws, e); };
    ws.onerror = function () { /* a close event always follows */ };
    clearTimeout(this.welcomeTimer);
    this.welcomeTimer = setTimeout(function () {
      if (ws === self.ws && !self.welcomed) { try { ws.close(4000, "no welcome"); } catch (e) { /* */ } }
    }, WELCOME_TIMEOUT_MS);
  };

  Client.prototype._onFrame = function (data) {
    if (typeof data !== "string") return;   // livegift.json only sends text frames
    var parsed;
    try { parsed = JSON.parse(data); } catch (e) { return; }
    this.stats.frames++;
    var events = Array.isArray(parsed) ? parsed : [parsed];
    for (var i = 0; i < events.length; i++) {
      var ev = events[i];
      if (ev && typeof ev === "object") this._onEvent(ev);
    }
  };

  Client.prototype._onEvent = function (ev) {
    if (ev.type === "welcome") {
      this.welcomed = true;
      clearTimeout(this.welcomeTimer);
      this.attempt = 0;
      this.failuresBeforeWelcome = 0;
      this.stats.connects++;
      // On a first join nothing is replayed: start after the room's latest seq. On a
      // resume keep our own lastSeq: the replay of what we missed follows this welcome.
      // Following a creator there is no resume, and each stream is a new room.
      if (this.creator) { this.room = ev.room; this.lastSeq = null; }
      if (this.lastSeq === null && typeof ev.seq === "number") this.lastSeq = ev.seq;
      if (this.wantHistory && this.historyUpTo === null && typeof ev.seq === "number") this.historyUpTo = ev.seq;
      this._setState("live", { welcome: ev });
      this._emit(ev);
      this._flushPending();
      return;
    }
    if (DURABLE[ev.type] && typeof ev.seq === "number") {
      if (this.lastSeq !== null && ev.seq <= this.lastSeq) {
        this.stats.duplicates++;
        return;                                   // already seen: drop
      }
      if (this.lastSeq !== null && ev.seq > this.lastSeq + 1) this.stats.gaps++;
      this.lastSeq = ev.seq;
      if (ev.type === "stream_ended" && !this.creator) this.ended = true;
    }
    if (ev.type === "offline") {
      this.welcomed = true;                       // the first frame of a creator with no stream
      clearTimeout(this.welcomeTimer);
      this.attempt = 0;
      this.failuresBeforeWelcome = 0;
      this.room = "";
      this._setState("offline", { creator: ev.creator });
    }
    if (ev.type === "ack" && ev.req !== undefined) {
      var p = this.pending.get(ev.req);
      if (p) {
        this.pending.delete(ev.req);
        clearTimeout(p.timer);
        if (ev.ok) p.resolve(ev);
        else {
          var err = ev.error || {};
          p.reject(new ApiError(err.code || "internal", err.message || "", 0));
        }
      }
    }
    this._emit(ev);
    if (ev.type === "stream_ended" && !this.creator) this._finish("ended");
  };

  Client.prototype._emit = function (ev) {
    var meta = { history: false };
    if (this.historyUpTo !== null) {
      if (DURABLE[ev.type] && typeof ev.seq === "number" && ev.seq <= this.historyUpTo) meta.history = true;
      if (ev.type === "resumed" && this.stats.connects === 1) meta.history = true;
    }
    try { this.onEvent(ev, meta); } catch (e) { reportError(e); }
  };

  Client.prototype._onClose = function (ws, e) {
    if (ws !== this.ws) return;
    this.ws = null;
    clearTimeout(this.welcomeTimer);
    if (this.stopped) return;
    if (this.ended) { this._finish("ended"); return; }
    if (e.code === 4401 && e.reason === TOKEN_EXPIRED) { this._finish(TOKEN_EXPIRED); return; }
    if (FINAL_CLOSE[e.code]) { this._finish(FINAL_CLOSE[e.code]); return; }
    this._failUnsafePending();
    if (!this.welcomed && !this.creator) {
      this.failuresBeforeWelcome++;
      // A refused handshake (401/403/404 before upgrading) shows up in browsers as a bare
      // 1006, so after a couple of failures ask the HTTP API whether retrying can help.
      if (this.failuresBeforeWelcome >= 2) this._probe();
    }
    this._scheduleReconnect(e.code);
  };

  Client.prototype._probe = function () {
    var self = this;
    api("GET", "/api/wallet", undefined, this.token).catch(function (err) {
      if (err.code === "unauthorized" && !self.stopped) self._finish("unauthorized");
    });
    api("GET", "/api/streams/" + encodeURIComponent(this.room)).then(function (s) {
      if (s && s.live === false && !self.stopped) { self.ended = true; self._finish("ended"); }
    }, function (err) {
      if (err.code === "not_found" && !self.stopped) self._finish("not_found");
    });
  };

  Client.prototype._scheduleReconnect = function (code) {
    var self = this;
    if (this.stopped || this.timer) return;
    var base = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * Math.pow(2, this.attempt));
    var delay = Math.round(base * (0.5 + Math.random() * 0.5));
    if (code === 4008 && this.attempt === 0) delay = 100;        // too slow: come straight back
    if (code === 1013) delay = Math.max(delay, 1000);           // try again later
    delay = Math.max(delay, this.holdUntil - Date.now());
    this.attempt++;
    this._setState("reconnecting", { delay: delay, code: code });
    this.timer = setTimeout(function () { self._open(); }, delay);
  };

  /** Stop for good (the stream ended, or the token/room can never work). */
  Client.prototype._finish = function (state) {
    if (this.stopped) return;
    this.stopped = true;
    clearTimeout(this.timer);
    clearTimeout(this.welcomeTimer);
    var code = state === "ended" ? "stream_not_live" : state;
    this.pending.forEach(function (p) {
      clearTimeout(p.timer);
      p.reject(new ApiError(code, errorText(code), 0));
    });
    this.pending.clear();
    if (this.ws) { try { this.ws.close(1000); } catch (e) { /* */ } this.ws = null; }
    this._setState(state);
  };

  /** Close the connection and stop reconnecting. */
  Client.prototype.close = function () { this._finish("closed"); };

  /**
   * Swap in a new token of the same user before the old one expires: sent as the
   * "refresh" op on an open socket (the server answers unauthorized, and keeps the old
   * token, for a bad token or another user's), else used for the next connect.
   */
  Client.prototype.refresh = function (token) {
    var self = this;
    if (this.creator) return Promise.resolve(null);     // an overlay key does not expire
    if (this.stopped) {
      var code = this.state === "closed" ? "connection_lost" : this.state;
      return Promise.reject(new ApiError(code, errorText(code), 0));
    }
    if (!this.ws || !this.welcomed) { this.token = token; return Promise.resolve(null); }
    return this.request({ op: "refresh", token: token }).then(function (ack) {
      self.token = token;
      return ack;
    }, function (err) {
      if (err.code === "connection_lost" || err.code === "timeout") self.token = token;
      throw err;
    });
  };

  /**
   * Test and debug hook: drop the socket as a network failure would and stay away for
   * at least holdMs before reconnecting (the client then resumes with since).
   */
  Client.prototype.drop = function (holdMs) {
    this.holdUntil = Date.now() + (holdMs || 0);
    if (this.ws) { try { this.ws.close(4000, "dropped"); } catch (e) { /* */ } }
  };

  /**
   * Send an op and wait for its ack. Resolves with the ack (ok: true); rejects with an
   * ApiError carrying the ack's error code. While disconnected the op waits and is sent
   * after the next welcome.
   */
  Client.prototype.request = function (op) {
    var self = this;
    if (!op.req) op.req = newReq();
    if (this.stopped) {
      var code = this.ended ? "stream_not_live" : (this.state === "closed" ? "connection_lost" : this.state);
      return Promise.reject(new ApiError(code, errorText(code), 0));
    }
    return new Promise(function (resolve, reject) {
      var entry = { op: op, resolve: resolve, reject: reject, sent: false, timer: null };
      entry.timer = setTimeout(function () {
        if (self.pending.get(op.req) === entry) {
          self.pending.delete(op.req);
          reject(new ApiError("timeout", ERROR_TEXT.timeout, 0));
        }
      }, REQUEST_TIMEOUT_MS);
      self.pending.set(op.req, entry);
      self._send(entry);
    });
  };

  Client.prototype._send = function (entry) {
    if (!this.ws || !this.welcomed || this.ws.readyState !== WebSocket.OPEN) return;
    try {
      this.ws.send(JSON.stringify(entry.op));
      entry.sent = true;
    } catch (e) { /* sent again after the reconnect */ }
  };

  Client.prototype._flushPending = function () {
    var self = this;
    this.pending.forEach(function (entry) { self._send(entry); });
  };

  /**
   * On a drop, ops that were sent but not answered: a gift is safe to send again with the
   * same req (charged once); anything else might run twice, so it fails instead.
   */
  Client.prototype._failUnsafePending = function () {
    var self = this;
    this.pending.forEach(function (entry, req) {
      if (entry.sent && entry.op.op !== "gift") {
        clearTimeout(entry.timer);
        self.pending.delete(req);
        entry.reject(new ApiError("connection_lost", ERROR_TEXT.connection_lost, 0));
      }
    });
  };

  function reportError(e) {
    if (global.console && console.error) console.error(e);
  }

  var clients = [];
  function connect(opts) {
    var client = new Client(opts);
    clients.push(client);
    watchExpiry();
    return client.start();
  }

  // ---------------------------------------------------------------- token refresh

  /**
   * Give the page a new token (the same user's): every client swaps it in with the refresh
   * op, then the page's HTTP calls use it too. Resolves true, or rejects with the ApiError
   * of a client that refused it (the page then keeps its old token).
   */
  function refresh(token) {
    var ctx = context();
    if (typeof token !== "string" || !token) {
      return Promise.reject(new ApiError("bad_request", errorText("bad_request"), 0));
    }
    var open = clients.filter(function (c) { return !c.stopped && !c.creator; });
    return Promise.all(open.map(function (c) { return c.refresh(token); })).then(function () {
      ctx.token = token;
      remembered("token", token);
      watchExpiry();
      return true;
    });
  }

  var expiryTimer = null;
  /** Ask the embedding app (parent frame or opener) for a new token before this one expires. */
  function watchExpiry() {
    clearTimeout(expiryTimer);
    var exp = tokenExpiry(context().token);
    if (!exp) return;
    var wait = Math.max(0, Math.min(exp - EXPIRY_NOTICE_MS - Date.now(), 0x7fffffff));
    expiryTimer = setTimeout(function () {
      var notice = { type: "livegift.token_expiring", exp: Math.round(exp / 1000) };
      [global.parent !== global ? global.parent : null, global.opener].forEach(function (w) {
        if (w) { try { w.postMessage(notice, "*"); } catch (e) { /* gone */ } }
      });
    }, wait);
  }

  // {type: "livegift.token", token} from the embedding app refreshes the page's token; the
  // answer goes back as {type: "livegift.token_refreshed", ok, code}.
  global.addEventListener("message", function (e) {
    var data = e.data;
    if (!data || data.type !== "livegift.token" || typeof data.token !== "string") return;
    if (e.source !== global.parent && e.source !== global.opener) return;
    var reply = function (ok, code) {
      if (e.source && e.source !== global) {
        try { e.source.postMessage({ type: "livegift.token_refreshed", ok: ok, code: code || null }, e.origin || "*"); } catch (x) { /* */ }
      }
    };
    refresh(data.token).then(function () { reply(true); }, function (err) { reply(false, err.code); });
  });

  // ---------------------------------------------------------------- room totals

  /**
   * Running totals of a room = the HTTP snapshot (GET /api/streams/{room}) + the gift events
   * after it. Gifts that arrive before the snapshot are buffered; when the snapshot has a
   * "seq" only the events after it are added, else the ones after the first welcome's seq.
   */
  function Totals(onChange) {
    this.onChange = onChange || function () {};
    this.snapshot = null;
    this.baseSeq = null;
    this.buffer = [];
    this.coins = 0;
    this.diamonds = 0;
    this.gifts = 0;
  }
  Totals.prototype.addGift = function (ev) {
    var coins = Number(ev.coins) || 0;
    if (!this.snapshot) {
      this.buffer.push({ seq: ev.seq, coins: coins });
      if (this.buffer.length > 5000) this.buffer.shift();
    } else if (this.baseSeq !== null && typeof ev.seq === "number" && ev.seq <= this.baseSeq) {
      return;                                     // already counted in the snapshot
    }
    this.coins += coins;
    this.diamonds += coins;                       // 1 diamond per coin received
    this.gifts += 1;
    this.onChange(this);
  };
  Totals.prototype.applySnapshot = function (s, welcomeSeq) {
    var base = typeof s.seq === "number" ? s.seq : (typeof welcomeSeq === "number" ? welcomeSeq : null);
    var received = Number(s.coins_received) || 0;
    var self = this;
    this.snapshot = s;
    this.baseSeq = base;
    this.coins = received;
    this.diamonds = typeof s.diamonds === "number" ? s.diamonds : received;
    this.gifts = typeof s.gifts === "number" ? s.gifts : 0;
    this.buffer.forEach(function (g) {
      if (base === null || typeof g.seq !== "number" || g.seq > base) {
        self.coins += g.coins;
        self.diamonds += g.coins;
        self.gifts += 1;
      }
    });
    this.buffer = [];
    this.onChange(this);
  };

  // ---------------------------------------------------------------- streaks

  var STREAK_WINDOW_MS = 6000;   // the server's is 5 s; allow for delivery jitter

  /** True when a gift event continues the streak prev ({combo, ts}: its latest gift). */
  function continuesStreak(prev, ev) {
    if (!prev) return false;
    var count = Number(ev.count) || 1;
    var combo = Number(ev.combo) || count;
    if (combo <= prev.combo || combo - count < 1) return false;
    if (typeof ev.ts === "number" && typeof prev.ts === "number" && ev.ts - prev.ts > STREAK_WINDOW_MS) return false;
    return true;
  }

  function streakKey(ev) {
    return String((ev.from && ev.from.id) || "") + "\u0000" + String((ev.gift && ev.gift.id) || "");
  }

  global.LiveGift = {
    context: context,
    api: api,
    connect: connect,
    refresh: refresh,
    tokenExpiry: tokenExpiry,
    clients: clients,
    Client: Client,
    ApiError: ApiError,
    errorText: errorText,
    newReq: newReq,
    Totals: Totals,
    continuesStreak: continuesStreak,
    streakKey: streakKey
  };
})(window);
